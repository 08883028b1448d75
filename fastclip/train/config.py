"""A training run's settings: one frozen dataclass, built by ``fastclip train`` and by Python
callers alike."""

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

DEMO_MODEL = "fastclip-shapes-rn"
# The bundled model's architecture: OpenAI's ResNet CLIP (ModifiedResNet: three-convolution
# stem, anti-aliased strided blocks, attention pooling) at a small size, with a narrow text
# transformer. The text width is a multiple of 64 because loading infers heads as
# width // 64. The context length stays 77 so that ``fastclip.tokenize``'s default output
# works; training feeds only the tokens up to the longest caption, which gives the same
# features (the text transformer is causal).
DEMO_CONFIG = dict(embed_dim=128, image_resolution=64, vision_layers=(1, 1, 1, 1),
                   vision_width=16, vision_patch_size=None, context_length=77,
                   vocab_size=49408, transformer_width=128, transformer_heads=2,
                   transformer_layers=2)

# Fields marked so must be the same to resume a run: other values would not continue it.
_SAME_ON_RESUME = {"same_on_resume": True}


@dataclass(frozen=True)
class TrainConfig:
    """The settings of one run. Those marked ``same_on_resume`` define the run: a checkpoint
    resumes only under the same values (see :meth:`resume_conflicts`)."""
    # The model: an architecture trained from scratch, or a model to fine-tune.
    model: str = DEMO_MODEL
    init: Optional[str] = None  # a name or checkpoint fastclip.load reads
    # The data: "shapes" (the procedural dataset) or a TSV of image_path<TAB>caption lines.
    data: str = dataclasses.field(default="shapes", metadata=_SAME_ON_RESUME)
    # Optimization.
    steps: int = dataclasses.field(default=1600, metadata=_SAME_ON_RESUME)
    batch_size: int = dataclasses.field(default=64, metadata=_SAME_ON_RESUME)
    lr: float = dataclasses.field(default=2e-3, metadata=_SAME_ON_RESUME)
    warmup: int = dataclasses.field(default=100, metadata=_SAME_ON_RESUME)
    weight_decay: float = dataclasses.field(default=0.1, metadata=_SAME_ON_RESUME)
    max_grad_norm: float = dataclasses.field(default=1.0, metadata=_SAME_ON_RESUME)
    precision: str = dataclasses.field(default="auto", metadata=_SAME_ON_RESUME)
    seed: int = dataclasses.field(default=0, metadata=_SAME_ON_RESUME)
    # Where it runs.
    device: str = "cpu"
    threads: int = 0  # CPU threads; 0 leaves torch's choice
    backend: str = "torch"
    # Output.
    checkpoint: Optional[str] = None
    checkpoint_every: int = 250
    resume: bool = False
    export: Optional[str] = None
    log: Optional[str] = None
    log_every: int = 50
    eval_images: int = 1024
    quiet: bool = False

    def __post_init__(self):
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, "
                                 f"not {getattr(self, name)}.")
        if self.batch_size < 2:
            raise ValueError("--batch-size must be at least 2: the contrastive loss needs "
                             "negatives.")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"--precision must be auto, fp32 or bf16, not {self.precision!r}.")
        if self.resume and not self.checkpoint:
            raise ValueError("--resume needs --checkpoint PATH: the run to continue.")
        if self.data != "shapes" and not os.path.isfile(self.data):
            raise ValueError(f"--data {self.data!r} is neither 'shapes' nor a file.")

    def as_dict(self):
        return dataclasses.asdict(self)

    def resume_conflicts(self, saved):
        """The ``same_on_resume`` settings whose values differ from those in ``saved`` (the
        dict a checkpoint recorded), as ``--option saved (now current)`` strings."""
        return [f"--{f.name.replace('_', '-')} {saved[f.name]} (now {getattr(self, f.name)})"
                for f in dataclasses.fields(self)
                if f.metadata.get("same_on_resume") and f.name in saved
                and saved[f.name] != getattr(self, f.name)]
