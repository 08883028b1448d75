"""A callable class for Ray Data's ``map_batches``: each actor loads the model once and
embeds batches of images or texts.

Usage (Ray is not a dependency of fastclip; install it yourself)::

    import ray
    from fastclip.embed.ray import ClipEmbedder

    dataset = ray.data.read_parquet("s3://bucket/images.parquet")   # a column of image bytes
    embedded = dataset.map_batches(
        ClipEmbedder, fn_constructor_kwargs=dict(model="ViT-B/32", image_column="jpg"),
        batch_format="numpy", batch_size=256, concurrency=8, num_gpus=1)
    embedded.write_parquet("s3://bucket/embeddings/")

A batch is a dict of numpy arrays. Images may be encoded bytes, file paths, or decoded
``(H, W, C)`` uint8 arrays (``ray.data.read_images``). The output batch is the input batch
plus ``embedding`` (``(n, embed_dim)``) and ``error``: an empty string for rows that worked;
for rows that did not (a corrupt image, say), the reason, with a row of NaNs as embedding,
so that no row disappears silently.
"""

import numpy as np
import torch
from PIL import Image

from ..images import DEFAULT_MAX_PIXELS, InputError, decode_image, read_image
from ..loading import load
from ..model import unit_norm
from ..tokenizer import tokenize
from .reader import preprocess_bounded


class ClipEmbedder:
    def __init__(self, model="ViT-B/32", image_column=None, text_column=None,
                 output_column="embedding", device=None, backend="auto", normalize=True,
                 dtype="fp32", max_pixels=DEFAULT_MAX_PIXELS):
        if (image_column is None) == (text_column is None):
            raise ValueError("ClipEmbedder embeds one column: give image_column or "
                             "text_column (not both; use two map_batches for pairs).")
        if dtype not in ("fp16", "fp32"):
            raise ValueError(f"dtype must be 'fp16' or 'fp32', got {dtype!r}.")
        self.model, self.preprocess = load(model, device=device, backend=backend)
        self.device = self.model.logit_scale.device
        self.image_column = image_column
        self.text_column = text_column
        self.output_column = output_column
        self.normalize = normalize
        self.dtype = np.float16 if dtype == "fp16" else np.float32
        self.max_pixels = max_pixels

    def __call__(self, batch):
        column = self.image_column or self.text_column
        if column not in batch:
            raise KeyError(f"The batch has no column {column!r}; its columns are "
                           f"{list(batch)}. Pass map_batches(..., batch_format='numpy') and "
                           "the right column name.")
        values = list(batch[column])
        inputs, errors = [], [""] * len(values)
        for i, value in enumerate(values):
            try:
                inputs.append(self._image(value) if self.image_column else self._text(value))
            except InputError as error:
                errors[i] = str(error)
        embedding = np.full((len(values), self.model.text_projection.shape[1]), np.nan,
                            dtype=self.dtype)
        worked = [i for i, error in enumerate(errors) if not error]
        if worked:
            embedding[worked] = self._embed(inputs)
        return {**batch, self.output_column: embedding, "error": np.array(errors, dtype=object)}

    def _image(self, value):
        if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim in (2, 3):
            image = Image.fromarray(value)
        elif isinstance(value, str):
            image = read_image(value, self.max_pixels)
        elif isinstance(value, (bytes, bytearray, np.bytes_)):
            image = decode_image(bytes(value), self.max_pixels)
        else:
            raise InputError(f"cannot read an image from a {type(value).__name__}; "
                                    "give bytes, a path, or an (H, W, C) uint8 array")
        return preprocess_bounded(self.preprocess, image, self.max_pixels)

    def _text(self, value):
        if not isinstance(value, str):
            raise InputError(f"not a text: {type(value).__name__}")
        return value

    def _embed(self, inputs):
        with torch.inference_mode():
            if self.image_column:
                features = self.model.encode_image(torch.stack(inputs).to(self.device))
            else:
                tokens = tokenize(inputs, self.model.context_length, truncate=True)
                features = self.model.encode_text(tokens.to(self.device))
            features = features.float()
            if self.normalize:
                features = unit_norm(features)
        return features.cpu().numpy().astype(self.dtype)
