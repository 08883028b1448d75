"""OpenAI's CLIP tokenizer: ftfy and HTML clean-up, lowercase, OpenAI's regex, byte-level BPE
with the 49,408-token vocabulary (``bpe_simple_vocab_16e6.txt.gz``, shipped with fastclip).

The ids are identical to OpenAI's ``clip.simple_tokenizer.SimpleTokenizer``. The merge loop
applies the best-ranked pair everywhere in one pass and words are cached, so the same
vocabulary is tokenized several times faster than OpenAI's Python loop.
"""

import gzip
import html
import os
from functools import lru_cache

import ftfy
import regex as re
import torch

_VOCAB_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")

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


def basic_clean(text):
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return text.strip()


_WHITESPACE = re.compile(r"\s+")


def whitespace_clean(text):
    return _WHITESPACE.sub(" ", text).strip()


class SimpleTokenizer:
    """Encode text to BPE ids and decode ids back to text, as OpenAI's tokenizer does."""

    pattern = re.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        re.IGNORECASE)

    def __init__(self, bpe_path=_VOCAB_PATH, cache_size=1_000_000):
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
        self.cache_size = cache_size
        # word (already byte-encoded) -> its ids
        self._cache = {START_OF_TEXT: [self.sot_token], END_OF_TEXT: [self.eot_token]}

    def bpe(self, token):
        """The BPE pieces of one byte-encoded word, the last one ending in ``</w>``.

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

    def _word_ids(self, word):
        ids = self._cache.get(word)
        if ids is None:
            ids = [self.encoder[piece] for piece in self.bpe(word)]
            if len(self._cache) < self.cache_size:
                self._cache[word] = ids
        return ids

    def encode(self, text):
        text = whitespace_clean(basic_clean(text)).lower()
        byte_encoder = self.byte_encoder
        ids = []
        for token in self.pattern.findall(text):
            if token not in (START_OF_TEXT, END_OF_TEXT):
                token = "".join(byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self._word_ids(token))
        return ids

    def decode(self, ids):
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        text = "".join(self.decoder[int(i)] for i in ids)
        data = bytearray(self.byte_decoder[c] for c in text)
        return data.decode("utf-8", errors="replace").replace("</w>", " ")


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
    if isinstance(texts, str):
        texts = [texts]
    tokenizer = get_tokenizer()
    sot, eot = tokenizer.sot_token, tokenizer.eot_token
    result = torch.zeros(len(texts), context_length, dtype=torch.int)
    for i, text in enumerate(texts):
        tokens = [sot] + tokenizer.encode(text) + [eot]
        if len(tokens) > context_length:
            if not truncate:
                raise RuntimeError(f"Input {text} is too long for context length {context_length}")
            tokens = tokens[:context_length]
            tokens[-1] = eot
        result[i, :len(tokens)] = torch.tensor(tokens, dtype=torch.int)
    return result
