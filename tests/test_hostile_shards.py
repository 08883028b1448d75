"""WebDataset shards fastclip did not make: a lying, damaged or crafted tar ends its shard
quickly, keeps the good samples before the damage, and never stops or hangs the job."""


import pytest

from fastclip.embed import embed


def lying_tar(path, claimed, good_samples=1, compress=False):
    """A WebDataset shard: ``good_samples`` real samples, then a member whose header claims
    ``claimed`` bytes followed by only 10 KB."""
    import gzip
    import io
    import tarfile

    from embed_helpers import image_bytes

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for i in range(good_samples):
            data = image_bytes(i)
            info = tarfile.TarInfo(f"{i:03d}.jpg")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        end = archive.offset  # where the end-of-archive blocks begin
    body = buffer.getvalue()[:end]
    liar = tarfile.TarInfo("999.jpg")
    liar.size = claimed
    data = body + liar.tobuf(format=tarfile.GNU_FORMAT) + b"\0" * 10_240
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


@pytest.mark.parametrize("claimed", [100 << 30, 1 << 40, 1 << 60])
@pytest.mark.parametrize("compress", [False, True])
def test_a_tar_header_claiming_terabytes_ends_its_shard_at_once(tmp_path, claimed, compress):
    import time

    from embed_helpers import read_failures

    shard = lying_tar(tmp_path / "shard.tar", claimed, compress=compress)
    start = time.perf_counter()
    summary = embed(str(tmp_path / "out"), images=[str(shard)], model="random:tiny",
                    num_workers=0, progress=False)
    assert time.perf_counter() - start < 30
    assert summary["rows"] == 1 and summary["manifest"] is not None  # the sample before it
    reason = read_failures(tmp_path / "out")[str(shard)]
    assert f"claims {claimed} bytes" in reason


def test_one_sample_may_not_hold_more_than_the_byte_limit(tmp_path):
    import io
    import tarfile

    from fastclip.embed.reader import iter_webdataset
    path = tmp_path / "big.tar"
    with tarfile.open(path, "w:gz") as archive:
        for extension in ("jpg", "png", "webp", "json"):
            info = tarfile.TarInfo(f"000.{extension}")
            info.size = 600
            archive.addfile(info, io.BytesIO(b"\0" * 600))
    [(key, fields)] = list(iter_webdataset(str(path), max_bytes=1000, wanted={"jpg", "png"}))
    assert fields["jpg"] == b"\0" * 600
    assert "past the 1000-byte limit" in str(fields["png"])
    assert fields["webp"] is None and fields["json"] is None  # listed, never read


def test_a_huge_long_name_ends_its_shard_with_a_short_record(tmp_path):
    import io
    import tarfile

    from embed_helpers import image_bytes, read_failures
    path = tmp_path / "names.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as archive:
        # The sample before a damaged header may be incomplete, so it goes with it: 001.
        for name in ("000.jpg", "001.jpg", "x" * 200_000 + ".jpg"):
            data = image_bytes(0)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    summary = embed(str(tmp_path / "out"), images=[str(path)], model="random:tiny",
                    num_workers=0, progress=False)
    assert summary["rows"] == 1
    reason = read_failures(tmp_path / "out")[str(path)]
    assert "extended header of" in reason and len(reason) < 1000


def test_a_repeated_tar_key_is_a_failure_not_a_second_row(tmp_path):
    import io
    import tarfile

    from embed_helpers import image_bytes, read_failures
    path = tmp_path / "dup.tar"
    with tarfile.open(path, "w") as archive:
        for i, key in enumerate(["a", "b", "a"]):
            data = image_bytes(i)
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    summary = embed(str(tmp_path / "out"), images=[str(path)], model="random:tiny",
                    num_workers=0, progress=False)
    assert summary["rows"] == 2 and summary["failures"] == 1
    assert "duplicate key" in read_failures(tmp_path / "out")[f"{path}:a"]


def crafted_shard(path, headers):
    """A shard: two good samples, then the raw ``headers`` (and 10 KB), then a good sample.
    The sample just before damage may be incomplete, so only the first one is kept."""
    import tarfile

    from embed_helpers import image_bytes

    def member(name):
        data = image_bytes(0)
        info = tarfile.TarInfo(name)
        info.size = len(data)
        padding = b"\0" * (-len(data) % tarfile.BLOCKSIZE)
        return info.tobuf(format=tarfile.GNU_FORMAT) + data + padding

    path.write_bytes(member("000.jpg") + member("001.jpg") + headers + b"\0" * 10_240
                     + member("003.jpg")
                     + b"\0" * 1024)
    return path


def long_name_chain(count):
    import tarfile
    return b"".join(tarfile.TarInfo._create_gnu_long_header("x" * 100, tarfile.GNUTYPE_LONGNAME,
                                                            "utf-8", "strict")
                    for _ in range(count))


def unknown_type_member(claimed):
    import tarfile
    info = tarfile.TarInfo("002.jpg")
    info.type = b"Z"
    info.size = claimed
    return info.tobuf(format=tarfile.GNU_FORMAT)


def sparse_map_member():
    import tarfile
    info = tarfile.TarInfo("002.jpg")
    info.size = 10
    info.pax_headers = {"GNU.sparse.map": "x,y", "GNU.sparse.size": "10"}
    return info.tobuf(format=tarfile.PAX_FORMAT)


@pytest.mark.parametrize("headers", [
    pytest.param(lambda: unknown_type_member(1 << 60), id="unknown-type-claiming-an-exabyte"),
    pytest.param(lambda: long_name_chain(1500), id="1500-chained-long-names"),
    pytest.param(sparse_map_member, id="garbled-sparse-map"),
])
def test_crafted_tar_headers_end_the_shard_not_the_job(tmp_path, headers):
    import time

    from embed_helpers import read_failures

    shard = crafted_shard(tmp_path / "shard.tar", headers())
    start = time.perf_counter()
    summary = embed(str(tmp_path / "out"), images=[str(shard)], model="random:tiny",
                    num_workers=0, progress=False)
    assert time.perf_counter() - start < 30
    assert summary["manifest"] is not None and summary["rows"] >= 1
    assert str(shard) in read_failures(tmp_path / "out")


def test_a_member_repeated_inside_a_sample_fails_the_sample(tmp_path):
    import io
    import tarfile

    from embed_helpers import image_bytes, read_failures
    path = tmp_path / "repeat.tar"
    with tarfile.open(path, "w") as archive:
        for i in range(2):
            data = image_bytes(i)
            info = tarfile.TarInfo("000.jpg")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    summary = embed(str(tmp_path / "out"), images=[str(path)], model="random:tiny",
                    num_workers=0, progress=False)
    assert summary["rows"] == 0
    assert "two members named 000.jpg" in read_failures(tmp_path / "out")[f"{path}:000"]
