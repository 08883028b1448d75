"""fastclip's tokenizer against open_clip's copy of OpenAI's tokenizer."""

import random

import numpy as np
import pytest
import torch

import fastclip
from fastclip.tokenizer import SimpleTokenizer, get_tokenizer

open_clip = pytest.importorskip("open_clip")

WORDS = ["a", "photo", "of", "the", "cat", "dog's", "they're", "we'll", "I'd", "CLIP",
         "running", "unbelievable", "antidisestablishmentarianism", "x-ray", "e-mail",
         "naïve", "café", "résumé", "über", "façade", "smörgåsbord", "Ελληνικά", "русский",
         "日本語", "中文字符", "한국어", "ภาษาไทย", "עברית", "العربية", "हिन्दी",
         "🙂", "🐈‍⬛", "👍🏽", "🇫🇷", "❤️",
         "&amp;", "&lt;b&gt;", "&#39;", "&quot;quoted&quot;", "&amp;amp;", "&nbsp;", "&#x1F600;",
         "Ã©", "â€™", "Ã¼ber", "cafÃ©", "â€œsmartâ€\x9d",
         "1", "42", "3.14159", "2026-11-28", "$100", "100%", "#hashtag", "@user", "C++",
         "...", "!!!", "?!", "---", "(parenthesis)", "[brackets]", "{braces}", "«guillemets»",
         "ﬁ", "Ⅻ", "²", "½", "ＡＢＣ", "\u200bzero\u200bwidth", "e\u0301", "ǅ"]
# OpenAI's special-token strings are left out: open_clip renamed them (<start_of_text>), so
# the two tokenizers differ on them by design; test_special_tokens covers OpenAI's behaviour.
SPACES = [" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u2003", "\u3000", " \t \n "]


def random_text(rng):
    kind = rng.random()
    length = rng.randint(0, 12) if kind < 0.9 else rng.randint(60, 200)
    parts = []
    for _ in range(length):
        choice = rng.random()
        if choice < 0.55:
            parts.append(rng.choice(WORDS))
        elif choice < 0.75:  # unseen words: random letters, sometimes accented or mixed case
            alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZéüßøñç"
            parts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 14))))
        elif choice < 0.85:
            parts.append(chr(rng.randint(0x20, 0x2FFF)))  # any printable-ish code point
        else:
            parts.append("".join(chr(rng.randint(0x4E00, 0x9FFF))
                                 for _ in range(rng.randint(1, 4))))
        parts.append(rng.choice(SPACES) if rng.random() < 0.3 else " ")
    text = "".join(parts)
    if rng.random() < 0.05:  # mojibake of the whole text
        text = text.encode("utf-8").decode("latin-1")
    return text


@pytest.fixture(scope="module")
def texts():
    rng = random.Random(20261128)
    return [random_text(rng) for _ in range(10_000)]


def test_ids_match_open_clip(texts):
    peer = open_clip.tokenizer._tokenizer
    ours = get_tokenizer()
    mismatches = [t for t in texts if ours.encode(t) != peer.encode(t)]
    assert not mismatches, f"{len(mismatches)} texts differ, first: {mismatches[0]!r}"


def test_tokenize_matches_open_clip_with_truncation(texts):
    ours = fastclip.tokenize(texts, truncate=True)
    peer = open_clip.tokenize(texts)  # open_clip always truncates
    assert ours.dtype == torch.int32  # OpenAI's dtype
    rows = (ours.long() != peer).any(dim=1).nonzero().flatten().tolist()
    assert not rows, f"{len(rows)} rows differ, first text: {texts[rows[0]]!r}"


def test_special_tokens():
    """OpenAI's tokenizer maps the literal strings of its special tokens (any case) to them."""
    tokenizer = get_tokenizer()
    assert tokenizer.encode("<|startoftext|>a cat<|EndOfText|>") == [
        tokenizer.sot_token, *tokenizer.encode("a cat"), tokenizer.eot_token]
    assert (tokenizer.sot_token, tokenizer.eot_token) == (49406, 49407)


def test_over_long_text_raises_without_truncate(texts):
    long_text = " ".join(["word"] * 100)
    with pytest.raises(RuntimeError, match="too long for context length 77"):
        fastclip.tokenize(long_text)
    truncated = fastclip.tokenize(long_text, truncate=True)[0]
    assert truncated[-1].item() == get_tokenizer().eot_token
    assert truncated[0].item() == get_tokenizer().sot_token


def test_context_length_and_layout():
    tokens = fastclip.tokenize(["a cat", "a dog on a mat"], context_length=10)
    tokenizer = get_tokenizer()
    assert tokens.shape == (2, 10)
    assert tokens[0, :4].tolist() == [tokenizer.sot_token, *tokenizer.encode("a cat"),
                                      tokenizer.eot_token]
    assert tokens[0, 4:].eq(0).all()
    assert tokens.argmax(dim=-1).tolist() == [3, 6]  # the end-of-text token has the largest id


def test_decode_round_trips(texts):
    tokenizer = get_tokenizer()
    for text in texts[:2000]:
        ids = tokenizer.encode(text)
        decoded = tokenizer.decode(ids)
        # Decoding gives the cleaned, lowercased words, each followed by a space.
        assert tokenizer.encode(decoded) == ids, repr(text)
    assert tokenizer.decode(tokenizer.encode("Hello,   World!")) == "hello , world ! "
    assert tokenizer.decode(torch.tensor(tokenizer.encode("a cat"))) == "a cat "


def test_plain_ascii_fast_path_cleans_like_ftfy():
    """Plain ASCII text skips ftfy; it must come out as ftfy and html.unescape leave it."""
    from fastclip.tokenizer import _PLAIN_ASCII, basic_clean, clean, whitespace_clean
    rng = random.Random(7)
    alphabet = "\t\n !\"#$%'()*+,-./0123456789:;<=>?@ABCXYZ[\\]^_`abcxyz{|}~"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
             for _ in range(3000)]
    for text in texts:
        assert _PLAIN_ASCII.fullmatch(text)
        assert clean(text) == whitespace_clean(basic_clean(text)).lower(), repr(text)


def test_both_engines_give_the_same_ids(texts):
    """The compiled class (where built) and OpenAI's Python loop, which runs where it is not,
    give the same ids for whole batches, special tokens included."""
    batch = texts[:300] + ["<|startoftext|> a <|endoftext|> " * 40]
    python_only = SimpleTokenizer()
    python_only._native = None
    assert python_only.bpe_implementation == "python"
    assert get_tokenizer().encode_batch(batch) == python_only.encode_batch(batch)
    assert torch.equal(fastclip.tokenize(batch, truncate=True),
                       tokenize_with(python_only, batch))


def tokenize_with(tokenizer, texts):
    """``fastclip.tokenize(texts, truncate=True)`` through another tokenizer instance."""
    from unittest import mock
    with mock.patch("fastclip.tokenizer.get_tokenizer", lambda: tokenizer):
        return fastclip.tokenizer.tokenize(texts, truncate=True)


def test_bpe_is_openai_compatible():
    tokenizer = get_tokenizer()
    assert tokenizer.bpe("<|startoftext|>") == "<|startoftext|>"
    pieces = tokenizer.bpe("photography")
    assert isinstance(pieces, str) and pieces.endswith("</w>")
    assert [tokenizer.encoder[p] for p in pieces.split(" ")] == tokenizer.encode("photography")


def test_native_merges_equal_openais_loop(texts):
    """The compiled class merges words as OpenAI's Python loop does: the generated texts'
    words, and words made to stress the merge loop."""
    tokenizer = get_tokenizer()
    if tokenizer.bpe_implementation != "native":
        pytest.skip("fastclip._C is not built: the Python loop is the only engine")
    words = [w for text in texts[:2000]
             for w in tokenizer.pattern.findall(fastclip.tokenizer.clean(text))]
    rng = random.Random(3)
    words += ["a", "aa", "aaa", "a" * 17, "ab" * 40, "e" * 300, "x", "é", "中文字符" * 20, "🙂" * 5,
              "".join(chr(rng.randint(0x20, 0x2FFF)) for _ in range(500))]
    words += ["".join(rng.choice("abcdeéß中") for _ in range(rng.randint(1, 30)))
              for _ in range(3000)]
    native_ids, native_counts = tokenizer._words_ids(words)
    ends = native_counts.cumsum()
    for i, word in enumerate(words):
        assert native_ids[ends[i] - native_counts[i]:ends[i]].tolist() == \
            tokenizer._python_word_ids(word), repr(word)
    empty_ids, empty_counts = tokenizer._words_ids([])
    assert len(empty_ids) == 0 and len(empty_counts) == 0


def test_native_class_checks_its_inputs():
    tokenizer = get_tokenizer()
    if tokenizer.bpe_implementation != "native":
        pytest.skip("fastclip._C is not built")
    native = tokenizer._native
    data = torch.tensor(list(b"catdog"), dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="word lengths add up to 5 bytes but 6 were given"):
        native.encode_words(data, torch.tensor([3, 2]))
    with pytest.raises(RuntimeError, match="word 1 has length 0"):
        native.encode_words(data, torch.tensor([6, 0]))
    # Lengths that would read past the buffer: too long, negative, or wrapping around int64.
    for lengths in ([7], [8, -2], [2 ** 62] * 3 + [2 ** 62 + 6]):
        for encode in (native.encode_words, native.encode_plain_ascii):
            with pytest.raises(RuntimeError, match="which does not fit in the"):
                encode(data, torch.tensor(lengths))
    with pytest.raises(RuntimeError, match="bytes must be a 1-D uint8 CPU tensor"):
        native.encode_words(data.long(), torch.tensor([6]))
    with pytest.raises(RuntimeError, match="text 0 has byte 38 at 3"):
        native.encode_plain_ascii(torch.tensor(list(b"cat&dog"), dtype=torch.uint8),
                                  torch.tensor([7]))
    with pytest.raises(RuntimeError, match="byte_ids has 255 entries"):
        _native_with_short_byte_table(tokenizer)
    ids, counts = native.encode_words(data, torch.tensor([3, 3]))
    assert ids.tolist() == tokenizer.encode("cat dog") and counts.tolist() == [1, 1]


def _native_with_short_byte_table(tokenizer):
    tables = [torch.from_numpy(t) for t in (
        tokenizer._merge_keys, tokenizer._merge_ranks, tokenizer._merged_ids,
        tokenizer._byte_ids[:255], tokenizer._end_byte_ids)]
    return torch.classes.fastclip.BPE(*tables, tokenizer.vocab_size, tokenizer.sot_token,
                                      tokenizer.eot_token)


def random_ascii_text(rng):
    """Plain ASCII that stresses OpenAI's regex: contractions and lone apostrophes, runs of
    punctuation, digits, special tokens in any case, partial special tokens, tabs, newlines."""
    pieces = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'", "''s", "'S", "'LL", "'x", "'",
              "<|startoftext|>", "<|EndOfText|>", "<|endoftext", "<|", "|>", "<", "!!", "...",
              "?!", "--", "12345", "3.14", "x2", "cat", "Dog's", "HELLO", "they're", "we've",
              "a", "I", "i'd", "don't", "(", ")", "[x]", "#tag", "@me", "~", "^_^", "\\", "\"",
              "`", "$100", "50%", "c++"]
    parts = []
    for _ in range(rng.randint(0, 20)):
        parts.append(rng.choice(pieces) if rng.random() < 0.8 else
                     "".join(chr(rng.randint(0x21, 0x7e)) for _ in range(rng.randint(1, 8))
                             ).replace("&", "and"))
        parts.append(rng.choice([" ", "", "  ", "\t", "\n", " \n\t "]))
    return "".join(parts)


def test_native_plain_ascii_pipeline_equals_python():
    """The C++ pipeline for plain ASCII (lowercase, regex, merges) gives the ids of the Python
    cleaning and regex, text by text; mixed batches are put back in order."""
    tokenizer = get_tokenizer()
    if tokenizer.bpe_implementation != "native":
        pytest.skip("fastclip._C is not built")
    rng = random.Random(11)
    texts = [random_ascii_text(rng) for _ in range(5000)] + ["", " ", "\t\n", "<|endoftext|>"]
    assert all(fastclip.tokenizer._PLAIN_ASCII.fullmatch(t) for t in texts)
    native_ids, native_counts = tokenizer._encode_plain_ascii(texts)
    python_ids, python_counts = tokenizer._encode_flat_python(texts)
    mismatch = [t for t, a, b in zip(texts, np.split(native_ids, native_counts.cumsum()[:-1]),
                                      np.split(python_ids, python_counts.cumsum()[:-1]))
                if a.tolist() != b.tolist()]
    assert not mismatch, f"{len(mismatch)} texts differ, first: {mismatch[0]!r}"
    assert native_counts.tolist() == python_counts.tolist()
    # A batch of both kinds, in a random order: encode_flat interleaves them back.
    mixed = texts[:300] + ["café &amp; crème", "naïve", "a & b", "x\x07y", "日本語"] * 20
    rng.shuffle(mixed)
    ids, counts = tokenizer.encode_flat(mixed)
    expected_ids, expected_counts = tokenizer._encode_flat_python(mixed)
    assert counts.tolist() == expected_counts.tolist()
    assert ids.tolist() == expected_ids.tolist()


def test_any_sequence_of_texts():
    """Texts are taken by position from any sequence: a reversed view, dict keys, a tuple,
    a numpy array (a pandas Series indexes by label: position must not depend on it)."""
    texts = ["a cat", "un café", "a dog", "x & y"]
    expected = fastclip.tokenize(texts)
    assert torch.equal(fastclip.tokenize(tuple(texts)), expected)
    assert torch.equal(fastclip.tokenize(dict.fromkeys(texts).keys()), expected)
    assert torch.equal(fastclip.tokenize(np.array(texts)), expected)

    class Labelled(list):  # indexes by label, as a pandas Series with a reversed index does
        def __getitem__(self, label):
            return list.__getitem__(self, len(self) - 1 - label)

    assert torch.equal(fastclip.tokenize(Labelled(texts)), expected)


def test_tokenizer_pickles():
    import pickle
    tokenizer = pickle.loads(pickle.dumps(get_tokenizer()))
    assert tokenizer.bpe_implementation == get_tokenizer().bpe_implementation
    assert tokenizer.encode("a photo of a cat") == get_tokenizer().encode("a photo of a cat")


def _tokenize_shape(texts, queue):
    queue.put(tuple(fastclip.tokenize(texts, truncate=True).shape))


def test_tokenize_in_a_forked_child_after_parallel_torch_ops():
    """A forked child cannot use the parent's OpenMP pool: a tokenizer that ran an ATen
    reduction on a large batch would hang there (multiprocessing's fork pools do this)."""
    import multiprocessing
    texts = ["a photo of a cat"] * 40_000 + ["un café"] * 40_000
    fastclip.tokenize(texts[:10])
    torch.nn.functional.gelu(torch.randn(1_000_000))  # starts the parent's thread pool
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_tokenize_shape, args=(texts, queue))
    child.start()
    child.join(60)
    if child.exitcode is None:
        child.kill()
        pytest.fail("tokenize hung in a forked child")
    assert queue.get(timeout=5) == (80_000, 77)


def test_fastclip_imports_and_tokenizes_ascii_without_ftfy(tmp_path):
    """On a machine without ftfy (the GPU image has none), plain ASCII needs no ftfy; other
    text says what to install."""
    import subprocess
    import sys
    import textwrap
    script = textwrap.dedent("""
        import importlib.abc, sys

        class NoFtfy(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "ftfy" or name.startswith("ftfy."):
                    raise ModuleNotFoundError("No module named 'ftfy'", name=name)

        sys.meta_path.insert(0, NoFtfy())
        import fastclip
        ids = fastclip.tokenize(["a photo of a dog"])
        print(ids[0, :7].tolist())
        try:
            fastclip.tokenize(["caf\\u00e9"])
        except RuntimeError as error:
            print("refused:", error)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = fastclip.tokenize(["a photo of a dog"])[0, :7].tolist()
    assert str(expected) in result.stdout
    assert "refused:" in result.stdout and "pip install ftfy" in result.stdout
