"""Safe reading of inputs: every bad input becomes an InputError with a reason."""

import os

import pytest

from fastclip import images as decode
from fastclip.embed import reader

from embed_helpers import corrupt_inputs, image_bytes, png_header_only, write_tar_shard


@pytest.mark.parametrize("name", sorted(corrupt_inputs()))
def test_bad_images_raise_input_error_with_reason(name):
    data, reason = corrupt_inputs()[name]
    with pytest.raises(decode.InputError, match=reason):
        decode.decode_image(data)


def test_good_image_decodes_fully():
    image = decode.decode_image(image_bytes(0, size=(30, 20)))
    assert image.size == (30, 20)


def test_pixel_limit_is_checked_before_decoding():
    with pytest.raises(decode.InputError, match="decompression bomb: 20x20 = 400"):
        decode.decode_image(image_bytes(0, size=(20, 20), format="PNG"), max_pixels=399)
    # A header that claims 3 billion pixels is refused from its header alone.
    with pytest.raises(decode.InputError, match="decompression bomb"):
        decode.decode_image(png_header_only(60_000, 50_000))


def test_read_file_reports_missing_and_oversized_files(tmp_path):
    with pytest.raises(decode.InputError, match="unreadable: FileNotFoundError"):
        decode.read_file(str(tmp_path / "missing.jpg"))
    os.mkfifo(tmp_path / "pipe.jpg")  # reading it would block forever
    with pytest.raises(decode.InputError, match="not a regular file"):
        decode.read_file(str(tmp_path / "pipe.jpg"))
    (tmp_path / "big.jpg").write_bytes(b"x" * 100)
    with pytest.raises(decode.InputError, match="larger than the 99-byte limit"):
        decode.read_file(str(tmp_path / "big.jpg"), max_bytes=99)


def test_webdataset_groups_members_by_key(tmp_path):
    path = tmp_path / "shard.tar"
    write_tar_shard(path, [("a/000", {"jpg": b"1", "txt": b"cap 0"}),
                           ("a/001", {"png": b"2", "json": b"{}"}),
                           ("a/002.x", {"txt": b"no image"})])
    samples = list(reader.iter_webdataset(str(path)))
    assert [key for key, _ in samples] == ["a/000", "a/001", "a/002"]
    assert reader.sample_image(samples[0][1]) == b"1"
    assert reader.sample_caption(samples[0][1]) == "cap 0"
    assert reader.sample_image(samples[1][1]) == b"2"
    assert reader.sample_caption(samples[1][1]) is None
    with pytest.raises(decode.InputError, match="no image in the sample"):
        reader.sample_image(samples[2][1])


def test_truncated_tar_yields_complete_samples_then_raises(tmp_path):
    path = tmp_path / "shard.tar"
    write_tar_shard(path, [(f"{i:03d}", {"jpg": image_bytes(i)}) for i in range(4)])
    data = path.read_bytes()
    # Cut inside the third sample's data.
    cut = data[:data.index(image_bytes(2)) + 100]
    path.write_bytes(cut)
    seen = []
    with pytest.raises(decode.InputError, match="cut short or corrupt at sample '002'"):
        for key, fields in reader.iter_webdataset(str(path)):
            seen.append(key)
    assert seen == ["000", "001"]


def test_garbage_tar_is_an_input_error(tmp_path):
    path = tmp_path / "shard.tar"
    path.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(decode.InputError, match="tar shard"):
        list(reader.iter_webdataset(str(path)))
