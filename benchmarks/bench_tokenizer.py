"""Tokenizer throughput: ``fastclip.tokenize`` against open_clip's copy of OpenAI's Python
tokenizer and instant-clip-tokenizer (Rust), on captions of unseen words.

    pytest benchmarks/bench_tokenizer.py --benchmark-json=benchmarks/results/tokenizer_cpu.json

Before each round, outside the timing, new captions of random lowercase words are generated
and open_clip's tokenizer is built afresh, so no contender has met the words (OpenAI's
tokenizer keeps a cache of words). fastclip's ids must equal open_clip's on every round's
captions. Rounds rotate the order of the contenders (``timing.Rounds``); items/s and the
ratios to open_clip come from the medians.
"""

import random
import string

import pytest
import torch

import fastclip

from timing import Rounds

CAPTIONS = {"cpu": 20_000, "gpu": 20_000, "tiny": 500}
ROUNDS = {"cpu": 5, "gpu": 5, "tiny": 2}


def random_captions(count, seed):
    """Captions of 5 to 14 random lowercase words of 2 to 10 letters, with punctuation."""
    rng = random.Random(seed)
    captions = []
    for _ in range(count):
        words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 10)))
                 for _ in range(rng.randint(5, 14))]
        captions.append(" ".join(words) + rng.choice(["", ".", ",", "!"]))
    return captions


class UnseenCaptions:
    """The contenders' inputs and state, renewed before each round: new captions, a new
    open_clip tokenizer (its cache of words emptied). fastclip needs no renewal: a batch of
    this size takes its array path, which caches no words."""

    def __init__(self, count):
        import open_clip.tokenizer
        self.open_clip_tokenizer = open_clip.tokenizer.SimpleTokenizer
        self.count = count
        self.seed = 0
        self.outputs = {}

    def renew(self):
        self.captions = random_captions(self.count, seed=self.seed)
        self.seed += 1
        self.open_clip = self.open_clip_tokenizer()

    def contenders(self):
        def run_fastclip():
            self.outputs["fastclip"] = fastclip.tokenize(self.captions)

        def run_open_clip():
            self.outputs["open_clip"] = self.open_clip(self.captions)

        found = {"fastclip": run_fastclip, "open_clip": run_open_clip}
        try:
            import instant_clip_tokenizer
            instant = instant_clip_tokenizer.Tokenizer()
            found["instant-clip-tokenizer"] = lambda: instant.tokenize_batch(self.captions, 77)
        except ImportError:
            pass
        return found

    def check(self):
        """fastclip's ids equal open_clip's on this round's captions."""
        ours, theirs = self.outputs["fastclip"], self.outputs["open_clip"]
        assert ours.dtype == torch.int32
        assert torch.equal(ours.long(), theirs.long()), "fastclip's ids differ from open_clip's"


def test_tokenizer_throughput(benchmark, sizes):
    pytest.importorskip("open_clip")
    state = UnseenCaptions(CAPTIONS[sizes])
    fastclip.get_tokenizer()  # reads the vocabulary once, before the timing
    rounds = Rounds(state.contenders())

    def one_round():
        state.renew()  # outside the contenders' timings
        rounds.run_round()
        state.check()

    benchmark.group = "tokenizer"
    benchmark.pedantic(one_round, rounds=ROUNDS[sizes], iterations=1)
    benchmark.extra_info.update(task="tokenize", captions=state.count, model="-", dtype="-",
                                batch=state.count)
    benchmark.extra_info.update(rounds.summary(state.count, baseline="open_clip"))
