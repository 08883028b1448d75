"""``fastclip train``: train or fine-tune a CLIP contrastively (``fastclip.train``).

``fastclip train`` trains the architecture of the bundled demo model ``fastclip-shapes-rn``
on the procedural shapes dataset; ``--init NAME_OR_PATH`` fine-tunes a model that
``fastclip.load`` reads, ``--data FILE.tsv`` trains on your own image-caption pairs.
"""

import dataclasses
import json

from ..model import CONFIGS
from ..train import DEMO_MODEL, TrainConfig
from ..train import run as run_training

DEFAULTS = TrainConfig()


def add_arguments(parser):
    """The options of ``fastclip train``: one per field of :class:`TrainConfig`."""
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=DEFAULTS.model, choices=[DEMO_MODEL, *CONFIGS],
                       help=f"architecture trained from scratch (default {DEMO_MODEL})")
    model.add_argument("--init", metavar="NAME_OR_PATH",
                       help="fine-tune this model (a name or checkpoint fastclip.load reads) "
                            "instead of training --model from scratch")
    data = parser.add_argument_group("data")
    data.add_argument("--data", default=DEFAULTS.data, metavar="shapes|FILE.tsv",
                      help="'shapes' (default): the procedural dataset; or a TSV file of "
                           "image_path<TAB>caption lines")
    run = parser.add_argument_group("optimization")
    run.add_argument("--steps", type=int, default=DEFAULTS.steps,
                     help=f"optimizer steps (default {DEFAULTS.steps})")
    run.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    run.add_argument("--lr", type=float, default=DEFAULTS.lr, help="peak learning rate")
    run.add_argument("--warmup", type=int, default=DEFAULTS.warmup,
                     help="linear warmup steps")
    run.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay)
    run.add_argument("--max-grad-norm", type=float, default=DEFAULTS.max_grad_norm,
                     help="clip the gradient norm (0 disables)")
    run.add_argument("--precision", choices=("auto", "fp32", "bf16"),
                     default=DEFAULTS.precision,
                     help="auto: bf16 autocast on CUDA, fp32 on the CPU")
    run.add_argument("--seed", type=int, default=DEFAULTS.seed)
    run.add_argument("--device", default=DEFAULTS.device)
    run.add_argument("--threads", type=int, default=DEFAULTS.threads,
                     help="CPU threads (default: torch's choice); on a CPU shared with other "
                          "jobs, 1 thread avoids threads waiting on each other")
    run.add_argument("--backend", default=DEFAULTS.backend,
                     choices=["torch", "triton", "reference"],
                     help="fastclip backend for training (default torch; triton's backward "
                          "recomputes the reference, unfused)")
    out = parser.add_argument_group("output")
    out.add_argument("--checkpoint", metavar="PATH",
                     help="where to save resumable checkpoints")
    out.add_argument("--checkpoint-every", type=int, default=DEFAULTS.checkpoint_every)
    out.add_argument("--resume", action="store_true",
                     help="continue the run saved in --checkpoint, if it exists")
    out.add_argument("--export", metavar="PATH",
                     help="write the trained model as an fp16 state dict (fastclip.load "
                          "reads it) and its description as PATH with .json")
    out.add_argument("--log", metavar="FILE", help="append JSON lines of the run to FILE")
    out.add_argument("--log-every", type=int, default=DEFAULTS.log_every)
    out.add_argument("--eval-images", type=int, default=DEFAULTS.eval_images,
                     help="held-out shapes evaluated at the end (0 skips)")
    out.add_argument("--quiet", action="store_true", help="no progress bar")


def config_from(args):
    """The :class:`TrainConfig` that parsed arguments describe."""
    return TrainConfig(**{f.name: getattr(args, f.name)
                          for f in dataclasses.fields(TrainConfig)})


def run(args):
    """Train; print the final metrics as JSON."""
    print(json.dumps(run_training(config_from(args))))
    return 0
