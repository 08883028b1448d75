"""OpenAI's CLIP tokenizer: ftfy and HTML clean-up, lowercase, OpenAI's regex, byte-level BPE
with the 49,408-token vocabulary (``bpe_simple_vocab_16e6.txt.gz``, shipped with fastclip).

The ids are identical to OpenAI's ``clip.simple_tokenizer.SimpleTokenizer``. Two engines
merge the words' bytes:

- OpenAI's merge loop in Python (``SimpleTokenizer._bpe_pieces``), with a cache of words: the
  reference, and what runs where the compiled extension ``fastclip._C`` is not built;
- the class ``fastclip.BPE`` of ``fastclip._C`` (``csrc/bpe.cpp``): the same loop on ids in
  C++, and for plain ASCII texts the whole pipeline (lowercase, OpenAI's regex, merges).

Plain ASCII text (no ``&``, no control characters) is left unchanged by ftfy and
``html.unescape``, so it skips them; ``tokenize`` fills its tensor from the flat ids without
a Python loop over texts.
"""

import gzip
import html
import os
from functools import lru_cache
from itertools import chain

import numpy as np
import regex as re
import torch

from .ops import extension

_VOCAB_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "bpe_simple_vocab_16e6.txt.gz")

START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"


@lru_cache()
def bytes_to_unicode():
    """A reversible map from the 256 byte values to printable unicode characters, so that
    BPE works on strings without whitespace or control characters (GPT-2's scheme)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# Printable ASCII, tabs and newlines, without "&": text that ftfy and html.unescape return
# unchanged (their fixes need non-ASCII characters, control characters or HTML entities).
_PLAIN_ASCII = re.compile(r"[\t\n\x20-\x25\x27-\x7e]*")


def _ftfy():
    """ftfy, imported when a text first needs it: plain ASCII never does (see ``clean``), so
    fastclip imports, and tokenizes such texts, where ftfy is not installed."""
    try:
        import ftfy
    except ImportError as error:
        raise RuntimeError(
            "Tokenizing text that is not plain ASCII needs ftfy (OpenAI's text clean-up), "
            "which is not installed: pip install ftfy.") from error
    return ftfy


def basic_clean(text):
    text = _ftfy().fix_text(text)
    text = html.unescape(html.unescape(text))
    return text.strip()


_WHITESPACE = re.compile(r"\s+")


def whitespace_clean(text):
    return _WHITESPACE.sub(" ", text).strip()


def clean(text):
    """``whitespace_clean(basic_clean(text)).lower()``: the text the regex splits into words."""
    if _PLAIN_ASCII.fullmatch(text):
        # ftfy and html.unescape would return it unchanged, and its only whitespace
        # characters (" ", "\t", "\n") are the ones str.split splits on, as \s+ does.
        return " ".join(text.split()).lower()
    return whitespace_clean(basic_clean(text)).lower()


class SimpleTokenizer:
    """Encode text to BPE ids and decode ids back to text, as OpenAI's tokenizer does."""

    pattern = re.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        re.IGNORECASE)

    def __init__(self, bpe_path=_VOCAB_PATH, cache_size=100_000):
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        with gzip.open(bpe_path) as f:
            merges = f.read().decode("utf-8").split("\n")
        merges = [tuple(m.split()) for m in merges[1:49152 - 256 - 2 + 1]]
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab]
        vocab += ["".join(m) for m in merges]
        vocab += [START_OF_TEXT, END_OF_TEXT]
        self.encoder = dict(zip(vocab, range(len(vocab))))
        self.decoder = {v: k for k, v in self.encoder.items()}
        self.bpe_ranks = dict(zip(merges, range(len(merges))))
        self.sot_token = self.encoder[START_OF_TEXT]
        self.eot_token = self.encoder[END_OF_TEXT]
        self.vocab_size = len(self.encoder)
        self._special_ids = {START_OF_TEXT: self.sot_token, END_OF_TEXT: self.eot_token}
        self.cache_size = cache_size
        self._cache = {}  # word (as the regex found it) -> its ids, for the Python loop
        self._build_merge_arrays(merges)

    def _build_merge_arrays(self, merges):
        """The tables of the compiled class: ids of the bytes (and of the bytes that end a
        word, which carry "</w>"), and the merges keyed by id pairs, sorted."""
        encoder = self.encoder
        self._byte_ids = np.array([encoder[self.byte_encoder[b]] for b in range(256)], np.int64)
        self._end_byte_ids = np.array(
            [encoder[self.byte_encoder[b] + "</w>"] for b in range(256)], np.int64)
        left = np.array([encoder[a] for a, _ in merges], np.int64)
        right = np.array([encoder[b] for _, b in merges], np.int64)
        keys = left * self.vocab_size + right
        order = np.argsort(keys)
        self._merge_keys = keys[order]
        self._merge_ranks = order  # the rank (line in the merges file) of each sorted key
        self._merged_ids = np.array([encoder["".join(m)] for m in merges], np.int64)
        self._native = self._build_native()

    def _build_native(self):
        native = extension.native_class("BPE")
        if native is None:
            return None
        tables = [torch.from_numpy(np.ascontiguousarray(table)) for table in (
            self._merge_keys, self._merge_ranks, self._merged_ids, self._byte_ids,
            self._end_byte_ids)]
        return native(*tables, self.vocab_size, self.sot_token, self.eot_token)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_native"] = None  # a C++ object: rebuilt from the tables when unpickled
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._native = self._build_native()

    @property
    def bpe_implementation(self):
        """``"native"`` (the compiled class ``fastclip.BPE``) or ``"python"``."""
        return "python" if self._native is None else "native"

    def bpe(self, token):
        """OpenAI's ``bpe``: the pieces of one byte-encoded word, space-separated, the last
        ending in ``</w>``; a special token is itself."""
        if token in self._special_ids:
            return token
        return " ".join(self._bpe_pieces(token))

    def _bpe_pieces(self, token):
        """The BPE pieces of one byte-encoded word, as a list.

        Merging the lowest-ranked adjacent pair everywhere it occurs, left to right, until no
        pair has a rank, gives the same pieces as OpenAI's loop.
        """
        word = list(token[:-1]) + [token[-1] + "</w>"]
        ranks = self.bpe_ranks
        while len(word) > 1:
            best, best_rank = None, None
            for pair in zip(word, word[1:]):
                rank = ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best, best_rank = pair, rank
            if best is None:
                break
            first, second = best
            merged = first + second
            out = []
            i, n = 0, len(word)
            while i < n:
                if i < n - 1 and word[i] == first and word[i + 1] == second:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = out
        return word

    def _python_word_ids(self, word):
        """The ids of one word (as the regex found it), by the Python merge loop, cached."""
        if word in self._special_ids:
            return [self._special_ids[word]]
        ids = self._cache.get(word)
        if ids is None:
            token = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids = [self.encoder[piece] for piece in self._bpe_pieces(token)]
            if len(self._cache) >= self.cache_size:
                self._cache.clear()  # start afresh rather than grow without bound
            self._cache[word] = ids
        return ids

    def _words_ids(self, words):
        """The ids of ``words`` one after the other (int64), and how many each has: by the
        compiled class where ``fastclip._C`` is built, else by the Python loop. Special
        tokens are one id each."""
        if self._native is None:
            ids_per_word = [self._python_word_ids(w) for w in words]
            return (np.fromiter(chain.from_iterable(ids_per_word), np.int64),
                    np.fromiter(map(len, ids_per_word), np.int64, len(words)))
        special_at = []
        if not self._special_ids.keys().isdisjoint(words):
            special_at = [i for i, w in enumerate(words) if w in self._special_ids]
            special_ids = [self._special_ids[words[i]] for i in special_at]
            words = list(words)
            for i in special_at:
                words[i] = "a"  # one byte, so one id, replaced below
        data, lengths = _utf8(words)
        ids, counts = self._native.encode_words(_byte_tensor(bytearray(data)),
                                                torch.from_numpy(lengths))
        ids, counts = ids.numpy(), counts.numpy()
        if special_at:
            ids[(np.cumsum(counts) - counts)[special_at]] = special_ids
        return ids, counts

    def encode_flat(self, texts):
        """The ids of all ``texts`` one after the other (an int64 array), and how many
        belong to each text: ``encode`` of a batch, without a list per text."""
        texts = list(texts)  # positions, whatever the sequence (a pandas Series indexes by label)
        if self._native is None:
            return self._encode_flat_python(texts)
        joined = "".join(texts)
        if _PLAIN_ASCII.fullmatch(joined):  # one pass over all texts: the usual case
            return self._encode_plain_ascii(texts, joined)
        plain = np.fromiter((_PLAIN_ASCII.fullmatch(t) is not None for t in texts), bool,
                            len(texts))
        if not plain.any():
            return self._encode_flat_python(texts)
        # Both kinds: each part encoded its way, then the ids interleaved back in order.
        parts = [np.flatnonzero(plain), np.flatnonzero(~plain)]
        results = [self._encode_plain_ascii([texts[i] for i in parts[0]]),
                   self._encode_flat_python([texts[i] for i in parts[1]])]
        counts = np.empty(len(texts), np.int64)
        for index, (_, part_counts) in zip(parts, results):
            counts[index] = part_counts
        starts = np.cumsum(counts) - counts
        ids = np.empty(int(counts.sum()), np.int64)
        for index, (part_ids, part_counts) in zip(parts, results):
            part_starts = np.cumsum(part_counts) - part_counts
            ids[np.repeat(starts[index] - part_starts, part_counts)
                + np.arange(len(part_ids))] = part_ids
        return ids, counts

    def _encode_plain_ascii(self, texts, joined=None):
        """``encode_flat`` of texts that ``_PLAIN_ASCII`` matches, all in C++."""
        data = bytearray(("".join(texts) if joined is None else joined).encode("ascii"))
        lengths = torch.from_numpy(np.fromiter(map(len, texts), np.int64, len(texts)))
        ids, counts = self._native.encode_plain_ascii(_byte_tensor(data), lengths)
        return ids.numpy(), counts.numpy()

    def _encode_flat_python(self, texts):
        """``encode_flat`` with the cleaning and the regex in Python."""
        words_per_text = [self.pattern.findall(clean(text)) for text in texts]
        words = list(chain.from_iterable(words_per_text))
        ids, counts = self._words_ids(words)
        ids_before_word = np.r_[0, np.cumsum(counts)]
        word_ends = np.cumsum(np.fromiter(map(len, words_per_text), np.int64, len(texts)))
        return ids, np.diff(ids_before_word[np.r_[0, word_ends]])

    def encode_batch(self, texts):
        """``[encode(text) for text in texts]``, faster."""
        ids, lengths = self.encode_flat(texts)
        ids, ends = ids.tolist(), np.cumsum(lengths).tolist()
        return [ids[start:end] for start, end in zip([0] + ends[:-1], ends)]

    def encode(self, text):
        return self.encode_batch([text])[0]

    def decode(self, ids):
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        text = "".join(self.decoder[int(i)] for i in ids)
        data = bytearray(self.byte_decoder[c] for c in text)
        return data.decode("utf-8", errors="replace").replace("</w>", " ")


def _utf8(words):
    """The UTF-8 bytes of ``words`` one after the other, and each word's byte count."""
    data = "".join(words).encode("utf-8")
    lengths = np.fromiter(map(len, words), np.int64, len(words))
    if len(data) != lengths.sum():  # some characters take several bytes
        lengths = np.fromiter((len(w.encode("utf-8")) for w in words), np.int64, len(words))
    return data, lengths


def _byte_tensor(data):
    """A uint8 tensor over a bytearray (empty when it is)."""
    return torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


@lru_cache()
def get_tokenizer():
    """The shared tokenizer instance (its vocabulary is loaded once)."""
    return SimpleTokenizer()


def tokenize(texts, context_length=77, truncate=False):
    """Token ids of ``texts`` (a string or a list of strings), as OpenAI's ``clip.tokenize``.

    Returns an int32 tensor of shape ``(len(texts), context_length)``: start-of-text, the
    text's ids, end-of-text, then zeros. A text that does not fit raises ``RuntimeError``
    unless ``truncate=True``, which cuts it and ends it with end-of-text.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    if context_length < 2:
        raise ValueError(f"context_length={context_length} leaves no room for the start- and "
                         "end-of-text tokens; it must be at least 2.")
    tokenizer = get_tokenizer()
    ids, lengths = tokenizer.encode_flat(texts)
    room = context_length - 2
    if not truncate and (lengths > room).any():
        text = texts[int(np.argmax(lengths > room))]
        raise RuntimeError(f"Input {text} is too long for context length {context_length}")
    kept = np.minimum(lengths, room)
    # Row and column of each id; ids past the room of their row are cut.
    row = np.repeat(np.arange(len(texts)), lengths)
    column = 1 + np.arange(len(ids)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    fits = column <= kept[row]
    result = np.zeros((len(texts), context_length), np.int32)
    result[:, 0] = tokenizer.sot_token
    result[row[fits], column[fits]] = ids[fits]
    result[np.arange(len(texts)), 1 + kept] = tokenizer.eot_token
    return torch.from_numpy(result)
