"""Timing several implementations against each other, fairly on a shared machine.

Every comparison is a ratio measured in one run: each round calls every contender once, in
an order that rotates from round to round, so a slow spell of the machine (other processes
on its few cores) falls on all of them rather than on whichever ran last.
"""

import statistics
import time

import torch


def synchronize(device):
    """Wait for the device's queued work, so that a timer sees it finish."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Rounds:
    """Calls each contender once per call of ``run_round`` and keeps its times.

    ``contenders`` maps a name to a function of no arguments. Pass ``run_round`` to
    ``benchmark.pedantic`` so that pytest-benchmark records the rounds too.
    """

    def __init__(self, contenders, device="cpu"):
        self.contenders = dict(contenders)
        self.device = device
        self.seconds = {name: [] for name in self.contenders}
        self._rounds = 0

    def run_round(self):
        names = list(self.contenders)
        shift = self._rounds % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(self.device)
            start = time.perf_counter()
            self.contenders[name]()
            synchronize(self.device)
            self.seconds[name].append(time.perf_counter() - start)
        self._rounds += 1

    def warm_up(self, rounds=1):
        """Run rounds whose times are dropped (first calls allocate, compile, capture)."""
        for _ in range(rounds):
            self.run_round()
        self.seconds = {name: [] for name in self.contenders}

    def median_seconds(self):
        return {name: statistics.median(times) for name, times in self.seconds.items()}

    def summary(self, items, baseline):
        """items/s of each contender, and each one's speed as a ratio to ``baseline``'s
        (above 1: faster), from the medians of the rounds."""
        median = self.median_seconds()
        return {
            "rounds": len(next(iter(self.seconds.values()))),
            "median_seconds": median,
            "items_per_second": {name: items / s for name, s in median.items()},
            "baseline": baseline,
            "speedup_vs_baseline": ({name: median[baseline] / s for name, s in median.items()}
                                    if baseline in median else {}),
            "seconds": self.seconds,
        }
