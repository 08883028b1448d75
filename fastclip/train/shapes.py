"""A procedural image-caption dataset: shapes in colors, sizes and positions on varied
backgrounds, generated on the fly with no download.

Each scene is one shape (circle, square, triangle, ...) of one color and size, placed at a
random position with a small random rotation, on a white, black or gray background with a
random tint and gradient. Its caption names the attributes, for example "a small red circle
on a white background". Some (shape, color) pairs, ``HELD_OUT_PAIRS``, never appear in the
training split: the held-out split is made of them only, so a model evaluated on it
recognizes combinations it was never shown.

Batches are a pure function of ``(seed, step)``, so training is reproducible and a resumed
run sees exactly the batches an uninterrupted one would.

``fastclip shapes FOLDER`` writes sample images (named after what they show).
"""

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..tokenizer import tokenize
from ..transform import center_crop, normalize, resize_shorter_side

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
COLORS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "cyan": (40, 200, 220),
    "blue": (40, 70, 220),
    "purple": (140, 50, 190),
    "pink": (245, 130, 190),
}
SIZES = {"small": (0.18, 0.24), "large": (0.3, 0.4)}  # radius, as a fraction of the side
BACKGROUNDS = {"white": (240, 240, 240), "black": (20, 20, 20), "gray": (128, 128, 128)}

# One (shape, color) pair per shape, each in another color (i -> 3*i+1 mod 8 is one-to-one),
# so every shape and every color is still seen in training, only not together.
HELD_OUT_PAIRS = frozenset(
    (shape, list(COLORS)[(3 * i + 1) % len(COLORS)]) for i, shape in enumerate(SHAPES))

# Caption templates, with their probabilities. Shorter forms teach the model that a prompt
# naming only some attributes ("a red circle") matches.
TEMPLATES = (
    ("a {size} {color} {shape} on a {background} background", 0.4),
    ("a {color} {shape}", 0.2),
    ("a {size} {color} {shape}", 0.2),
    ("a {color} {shape} on a {background} background", 0.2),
)

SPLITS = ("train", "held_out")
TRAIN_GROUP_SIZE = 6  # scenes per group of a training batch (see sample_group)
RENDER_SCALE = 2  # scenes are drawn at twice the model's resolution, then resized (bicubic)


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    size: str
    background: str
    center: tuple  # (x, y), fractions of the side
    radius: float  # fraction of the side
    angle: float  # degrees
    color_jitter: tuple  # added to the color's RGB
    tint: tuple  # added to the background's RGB
    gradient: tuple  # (direction in radians, amplitude)

    def caption(self, template="a {size} {color} {shape} on a {background} background"):
        return template.format(shape=self.shape, color=self.color, size=self.size,
                               background=self.background)

    @property
    def label(self):
        """The zero-shot class: ``"a {color} {shape}"``."""
        return class_prompt(self.shape, self.color)


def class_prompt(shape, color):
    return f"a {color} {shape}"


def classes():
    """All (shape, color) classes, as (shape, color) pairs and their prompts."""
    pairs = [(shape, color) for shape in SHAPES for color in COLORS]
    return pairs, [class_prompt(shape, color) for shape, color in pairs]


_SPLIT_PAIRS = {split: [p for p in classes()[0] if (p in HELD_OUT_PAIRS) == (split == "held_out")]
                for split in SPLITS}


def _pairs(split):
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose one of {', '.join(SPLITS)}.")
    return _SPLIT_PAIRS[split]


def sample_scene(rng, split="train", shape=None, color=None, size=None, background=None):
    """One random scene of ``split`` ("train" or "held_out"), drawn with numpy's ``rng``;
    the attributes given are kept."""
    if shape is None or color is None:
        pairs = [p for p in _pairs(split) if shape in (None, p[0]) and color in (None, p[1])]
        shape, color = pairs[rng.integers(len(pairs))]
    if size is None:
        size = list(SIZES)[rng.integers(len(SIZES))]
    if background is None:
        background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    radius = rng.uniform(*SIZES[size])
    # Keep the whole shape inside the image.
    center = tuple(rng.uniform(radius + 0.02, 1 - radius - 0.02, size=2))
    return Scene(
        shape=shape, color=color, size=size, background=background,
        center=center, radius=radius, angle=rng.uniform(-12, 12),
        color_jitter=tuple(rng.integers(-20, 21, size=3)),
        tint=tuple(rng.integers(-15, 16, size=3)),
        gradient=(rng.uniform(0, 2 * math.pi), rng.uniform(0, 30)),
    )


def sample_group(rng, split, group_size):
    """``group_size`` scenes of one color, size and background, with different shapes.

    Telling them apart needs the shape. A batch of independent scenes rarely holds two of
    the same color, size and background (there are 48 such combinations), so the
    contrastive loss would barely reward learning shapes.
    """
    first = sample_scene(rng, split)
    shapes = [s for s, c in _pairs(split) if c == first.color and s != first.shape]
    picked = rng.choice(len(shapes), size=min(group_size - 1, len(shapes)), replace=False)
    return [first] + [sample_scene(rng, split, shapes[i], first.color, first.size,
                                   first.background) for i in picked]


def _polygon(center, radius, sides, angle, inner=None):
    """Vertices of a regular polygon (or a star, when ``inner`` is the inner radius), first
    vertex pointing up."""
    cx, cy = center
    points = []
    steps = sides * 2 if inner else sides
    for k in range(steps):
        r = inner if inner and k % 2 else radius
        theta = math.radians(angle) - math.pi / 2 + 2 * math.pi * k / steps
        points.append((cx + r * math.cos(theta), cy + r * math.sin(theta)))
    return points


def _rotate(points, center, angle):
    cx, cy = center
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c)
            for x, y in points]


def _outline(shape, center, radius, angle):
    """The shape's polygon (None for a circle), in pixels."""
    cx, cy = center
    if shape == "square":
        half = radius / math.sqrt(2)  # the square's corners lie on the circle of `radius`
        return _rotate([(cx - half, cy - half), (cx + half, cy - half),
                        (cx + half, cy + half), (cx - half, cy + half)], center, angle)
    if shape == "diamond":
        return _polygon(center, radius, 4, angle)
    if shape == "triangle":
        return _polygon(center, radius, 3, angle)
    if shape == "pentagon":
        return _polygon(center, radius, 5, angle)
    if shape == "hexagon":
        return _polygon(center, radius, 6, angle)
    if shape == "star":
        return _polygon(center, radius, 5, angle, inner=radius * 0.42)
    if shape == "cross":
        a, b = radius, radius * 0.36
        return _rotate([(cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b),
                        (cx + a, cy + b), (cx + b, cy + b), (cx + b, cy + a), (cx - b, cy + a),
                        (cx - b, cy + b), (cx - a, cy + b), (cx - a, cy - b), (cx - b, cy - b)],
                       center, angle)
    return None


def _background(scene, side):
    base = np.array(BACKGROUNDS[scene.background], dtype=np.float32) + scene.tint
    direction, amplitude = scene.gradient
    ramp = np.linspace(-0.5, 0.5, side, dtype=np.float32)
    along = math.cos(direction) * ramp[None, :] + math.sin(direction) * ramp[:, None]
    pixels = base + amplitude * along[:, :, None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def render(scene, side=128):
    """The scene as a ``side`` x ``side`` RGB PIL image."""
    image = _background(scene, side)
    center = (scene.center[0] * side, scene.center[1] * side)
    radius = scene.radius * side
    fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLORS[scene.color],
                                                             scene.color_jitter))
    draw = ImageDraw.Draw(image)
    outline = _outline(scene.shape, center, radius, scene.angle)
    if outline is None:
        draw.ellipse([center[0] - radius, center[1] - radius, center[0] + radius,
                      center[1] + radius], fill=fill)
    else:
        draw.polygon(outline, fill=fill)
    return image


def _caption(scene, rng):
    templates, weights = zip(*TEMPLATES)
    return scene.caption(templates[rng.choice(len(templates), p=weights)])


def batch_rng(seed, step, split="train"):
    """The generator of batch ``step`` of a run with ``seed``; independent of other steps."""
    return np.random.default_rng([seed, step, SPLITS.index(split)])


def make_batch(seed, step, batch_size, image_size=64, split="train", rng=None, group_size=1):
    """Batch ``step`` of a run with ``seed``: ``(images, captions, scenes)``.

    ``images`` is a (batch_size, 3, image_size, image_size) float32 tensor preprocessed exactly
    as ``fastclip.load``'s preprocess does for the rendered images; ``captions`` are strings.
    With ``group_size`` > 1 the scenes come in groups that differ only in shape (see
    ``sample_group``); training uses ``TRAIN_GROUP_SIZE``.
    """
    rng = rng if rng is not None else batch_rng(seed, step, split)
    scenes = []
    while len(scenes) < batch_size:
        scenes += (sample_group(rng, split, group_size) if group_size > 1
                   else [sample_scene(rng, split)])
    scenes = scenes[:batch_size]
    # Preprocess's resize and crop per image, then its normalization once for the batch.
    pixels = np.stack([np.asarray(center_crop(resize_shorter_side(
        render(s, image_size * RENDER_SCALE), image_size), image_size)) for s in scenes])
    images = normalize(torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
                       .float())
    return images, [_caption(s, rng) for s in scenes], scenes


@torch.no_grad()
def evaluate(model, n=512, seed=0, split="held_out", batch_size=256):
    """Zero-shot classification and retrieval on ``n`` freshly generated scenes of ``split``.

    Returns a dict:
    - ``accuracy``: the image's (shape, color) class is the best of all 48 prompts
      ``"a {color} {shape}"`` (chance 1/48);
    - ``shape_accuracy``, ``color_accuracy``: the best prompt has the right shape, color;
    - ``recall_at_1``: image-to-caption retrieval among the ``n`` full captions ("a small red
      circle on a white background"); a hit is a retrieved caption equal to the image's own
      (scenes that share a caption are indistinguishable by it).
    """
    image_size = model.visual.input_resolution
    device = model.logit_scale.device
    rng = np.random.default_rng([seed, 10**6, SPLITS.index(split)])
    image_features, scenes = [], []
    for start in range(0, n, batch_size):
        images, _, batch_scenes = make_batch(seed, 0, min(batch_size, n - start), image_size,
                                             split, rng=rng)
        image_features.append(model.encode_image(images.to(device), normalize=True).float())
        scenes += batch_scenes
    image_features = torch.cat(image_features)

    pairs, prompts = classes()
    class_features = model.encode_text(tokenize(prompts).to(device), normalize=True).float()
    predicted = [pairs[i] for i in (image_features @ class_features.T).argmax(dim=1).tolist()]
    truth = [(s.shape, s.color) for s in scenes]

    captions = [s.caption() for s in scenes]
    caption_features = model.encode_text(tokenize(captions).to(device), normalize=True).float()
    retrieved = (image_features @ caption_features.T).argmax(dim=1).tolist()

    def mean(hits):
        return sum(hits) / len(hits)

    return dict(
        n=n, split=split,
        accuracy=mean([p == t for p, t in zip(predicted, truth)]),
        shape_accuracy=mean([p[0] == t[0] for p, t in zip(predicted, truth)]),
        color_accuracy=mean([p[1] == t[1] for p, t in zip(predicted, truth)]),
        recall_at_1=mean([captions[j] == c for j, c in zip(retrieved, captions)]),
        chance=1 / len(pairs),
    )


def write_samples(folder, n=len(SHAPES), seed=0, side=128, split="held_out"):
    """Write ``n`` sample images of ``split`` to ``folder`` as PNGs named after what they show
    (``red_circle.png``; a number is added when two show the same) and return their paths.

    The default split is the held-out one: combinations the bundled model never saw. The
    images cycle through the shapes, so the first six show the six shapes.
    """
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng([seed, 2 * 10**6, SPLITS.index(split)])
    pairs = _pairs(split)
    paths = []
    for k in range(n):
        scene = sample_scene(rng, split)
        shape = SHAPES[k % len(SHAPES)]
        colors = [c for s, c in pairs if s == shape]
        scene = Scene(**{**scene.__dict__, "shape": shape,
                         "color": colors[rng.integers(len(colors))]})
        name = f"{scene.color}_{scene.shape}"
        path = os.path.join(folder, f"{name}.png")
        copy = 1
        while path in paths:
            copy += 1
            path = os.path.join(folder, f"{name}_{copy}.png")
        render(scene, side).save(path)
        paths.append(path)
    return paths
