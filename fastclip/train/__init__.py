"""Contrastive training: the loop (``loop``), its settings (``config.TrainConfig``), what it
reads (``data``, and the procedural dataset ``shapes``) and writes (``checkpoints``).

``fastclip train`` (or ``python -m fastclip.train``) runs it from the command line;
``fastclip.train.run(TrainConfig(...))`` from Python.
"""

from .checkpoints import export_model, load_checkpoint, save_checkpoint, untouched_token_rows
from .config import DEMO_CONFIG, DEMO_MODEL, TrainConfig
from .data import CaptionFileBatches, ShapesBatches, make_batches
from .loop import (
                   WarmupCosine,
                   contrastive_loss,
                   make_optimizer,
                   parameter_groups,
                   run,
                   train,
                   train_step,
                   trim_padding,
)

__all__ = ["DEMO_CONFIG", "DEMO_MODEL", "CaptionFileBatches", "ShapesBatches", "TrainConfig",
           "WarmupCosine", "contrastive_loss", "export_model", "load_checkpoint",
           "make_batches", "make_optimizer", "parameter_groups", "run", "save_checkpoint",
           "train", "train_step", "trim_padding", "untouched_token_rows"]
