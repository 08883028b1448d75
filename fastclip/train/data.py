"""What a run trains on: batches as a pure function of the step, so a resumed run sees the
batches an uninterrupted one would."""

import os

import numpy as np
import torch

from ..images import read_image
from ..tokenizer import tokenize
from ..transform import Preprocess
from . import shapes


class ShapesBatches:
    """Batches of the procedural shapes dataset: ``(images, tokens)`` for a step."""

    def __init__(self, seed, batch_size, image_size, context_length,
                 group_size=shapes.TRAIN_GROUP_SIZE):
        self.seed, self.batch_size, self.group_size = seed, batch_size, group_size
        self.image_size, self.context_length = image_size, context_length
        self.tokens = {}  # caption -> its tokens; the dataset has only a few hundred captions

    def __call__(self, step):
        images, captions, _ = shapes.make_batch(self.seed, step, self.batch_size,
                                                self.image_size, group_size=self.group_size)
        new = [c for c in dict.fromkeys(captions) if c not in self.tokens]
        if new:
            self.tokens.update(zip(new, tokenize(new, self.context_length, truncate=True)))
        return images, torch.stack([self.tokens[c] for c in captions])


class CaptionFileBatches:
    """Batches from a TSV file of ``image_path<TAB>caption`` lines (paths relative to the
    file). Each epoch is a fresh permutation drawn from ``(seed, epoch)``."""

    def __init__(self, path, seed, batch_size, image_size, context_length):
        folder = os.path.dirname(os.path.abspath(path))
        self.pairs = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                image, tab, caption = line.rstrip("\n").partition("\t")
                if not tab or not caption.strip():
                    raise ValueError(f"{path}, line {number}: expected "
                                     "'image_path<TAB>caption'.")
                self.pairs.append((os.path.join(folder, image), caption))
        if len(self.pairs) < batch_size:
            raise ValueError(f"{path} has {len(self.pairs)} image-caption pairs, fewer than "
                             f"the batch size {batch_size}; lower --batch-size.")
        self.seed, self.batch_size, self.context_length = seed, batch_size, context_length
        self.preprocess = Preprocess(image_size)

    def __call__(self, step):
        per_epoch = len(self.pairs) // self.batch_size
        epoch, index = divmod(step, per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs))
        batch = [self.pairs[i] for i in order[index * self.batch_size:
                                              (index + 1) * self.batch_size]]
        images = torch.stack([self.preprocess(read_image(p)) for p, _ in batch])
        return images, tokenize([c for _, c in batch], self.context_length, truncate=True)


def make_batches(config, model):
    """The batches of ``config.data`` at ``model``'s input resolution and context length."""
    size, context = model.visual.input_resolution, model.context_length
    if config.data == "shapes":
        return ShapesBatches(config.seed, config.batch_size, size, context)
    return CaptionFileBatches(config.data, config.seed, config.batch_size, size, context)
