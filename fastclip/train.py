"""Contrastive training of any fastclip CLIP: from scratch, or fine-tuning a loaded model.

The loss is CLIP's symmetric InfoNCE with the learnable temperature ``logit_scale``, clamped
at ln(100) as in CLIP. AdamW decays only the matrices (not gains, biases, embeddings or
``logit_scale``); the learning rate warms up linearly, then follows a cosine to zero;
gradients are clipped by norm. Checkpoints hold the model, optimizer, scheduler, step and RNG
states, are written atomically (a temporary file, then a rename) and resume the same run:
a batch is a pure function of ``(seed, step)``, so a resumed run sees the batches an
uninterrupted one would.

``python -m fastclip.train`` trains the architecture of the bundled demo model
``fastclip-shapes-rn`` on the procedural shapes dataset (``fastclip.shapes``); ``--init
NAME_OR_PATH`` fine-tunes a model that ``fastclip.load`` reads, ``--data FILE.tsv`` trains on
your own image-caption pairs. The bundled model is that run followed by a second one,
``--init`` from the first with ``--steps 1000 --lr 1e-3 --warmup 50`` (the commands are in
``fastclip/pretrained/fastclip-shapes-rn.json``).
"""

import argparse
import io
import json
import math
import os
import platform
import time
import zipfile
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from . import shapes
from .model import CLIP, CONFIGS, build_model, infer_config
from .tokenizer import tokenize
from .transform import Preprocess

DEMO_MODEL = "fastclip-shapes-rn"
# OpenAI's ResNet CLIP (ModifiedResNet: three-convolution stem, anti-aliased strided blocks,
# attention pooling) at a small size, with a narrow text transformer. It learns shapes faster
# than a ViT: in 150-step pilots on this data, it named 31% of shapes right against 20% for a
# ViT of width 128, 4 layers and 8-pixel patches (chance 17%), at two thirds of the step time.
# The text width is a multiple of 64 because loading infers heads as width // 64. The
# context length stays 77 so that ``fastclip.tokenize``'s default output works; training
# feeds only the tokens up to the longest caption, which gives the same features (the text
# transformer is causal).
DEMO_CONFIG = dict(embed_dim=128, image_resolution=64, vision_layers=(1, 1, 1, 1),
                   vision_width=16, vision_patch_size=None, context_length=77,
                   vocab_size=49408, transformer_width=128, transformer_heads=2,
                   transformer_layers=2)
MAX_LOGIT_SCALE = math.log(100)


# ---------------------------------------------------------------------------- the loss

def contrastive_loss(logits_per_image):
    """Symmetric InfoNCE: image i matches caption i, among the batch, in both directions."""
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, labels)
            + F.cross_entropy(logits_per_image.t(), labels)) / 2


def trim_padding(tokens):
    """Drop the padding columns after the longest sequence's end-of-text token. The text
    transformer is causal, so the end-of-text features do not change; the work shrinks
    from 77 positions to the captions' length."""
    return tokens[:, : int(tokens.argmax(dim=-1).max()) + 1]


# ----------------------------------------------------------- optimizer and schedule

def parameter_groups(model, weight_decay):
    """AdamW groups: weight decay on matrices only; none on gains, biases, embeddings and
    ``logit_scale`` (CLIP's recipe)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim < 2 or "embedding" in name
        (no_decay if exempt else decay).append(param)
    return [dict(params=decay, weight_decay=weight_decay),
            dict(params=no_decay, weight_decay=0.0)]


class WarmupCosine:
    """Linear warmup over ``warmup`` steps, then a cosine from 1 to 0 at ``total`` steps; a
    picklable callable, so ``LambdaLR`` saves it with the scheduler."""

    def __init__(self, warmup, total):
        self.warmup, self.total = warmup, total

    def __call__(self, step):
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model, args):
    """AdamW with CLIP's betas and epsilon, and the warmup-cosine schedule. The fused AdamW
    (one kernel over all parameters) halves the optimizer's time on the CPU, where the
    49,408-row token embedding is a large share of the parameters."""
    fused = model.logit_scale.device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(parameter_groups(model, args.weight_decay), lr=args.lr,
                                  betas=(0.9, 0.98), eps=1e-6, fused=fused)
    schedule = WarmupCosine(args.warmup, args.steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


# --------------------------------------------------------------------------- data

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
        images = torch.stack([self.preprocess(Image.open(p)) for p, _ in batch])
        return images, tokenize([c for _, c in batch], self.context_length, truncate=True)


# ----------------------------------------------------------------------- checkpoints

def model_config(model):
    """The ``CLIP(...)`` arguments of ``model``, read back from its parameters."""
    return infer_config(model.state_dict())


def save_checkpoint(path, model, optimizer, scheduler, step, args):
    """Write a resumable checkpoint atomically: to a temporary file in the same folder, then
    renamed over ``path``, so an interrupted write never leaves a truncated checkpoint."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    state = dict(
        state_dict=model.state_dict(), optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(), step=step, args=_plain_args(args),
        quick_gelu=_uses_quick_gelu(model),
        rng=dict(torch=torch.get_rng_state(),
                 cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []),
    )
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        torch.save(state, temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a file it cannot read
        raise ValueError(f"{path} is not a readable training checkpoint "
                         f"({type(error).__name__}: {error}).") from error


# Options that define a run: resuming with other values would not continue the same run.
RUN_OPTIONS = ("steps", "batch_size", "lr", "warmup", "weight_decay", "max_grad_norm", "seed",
               "data", "precision")


def check_resumable(checkpoint, args, path):
    saved = checkpoint["args"]
    changed = [f"--{k.replace('_', '-')} {saved[k]} (now {getattr(args, k)})"
               for k in RUN_OPTIONS if k in saved and saved[k] != getattr(args, k)]
    if changed:
        raise ValueError(f"{path} was saved by a run with {', '.join(changed)}; resume with "
                         "the same options, or start a new run with another --checkpoint.")


def _plain_args(args):
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}


def _uses_quick_gelu(model):
    return next(m for m in model.modules() if hasattr(m, "activation")).activation \
        == "quick_gelu"


def export_model(model, path, dtype=torch.float16, unused_token_rows=None):
    """Write ``model``'s weights (its floating-point tensors in ``dtype``) as a state dict that
    ``fastclip.load`` reads.

    ``unused_token_rows`` (a bool mask over the vocabulary) marks token-embedding rows that
    training never updated; they are written as zeros instead of their random initial values,
    and the archive is compressed (deflate, which ``torch.load`` reads), so the 49,408-row
    embedding costs almost nothing on disk.
    """
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype)
             for k, v in model.state_dict().items()}  # BatchNorm's step counts stay integers
    if unused_token_rows is not None:
        state["token_embedding.weight"][unused_token_rows.cpu()] = 0
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    temporary = f"{path}.{os.getpid()}.tmp"
    with zipfile.ZipFile(buffer) as source, \
            zipfile.ZipFile(temporary, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info.filename))
    os.replace(temporary, path)


def untouched_token_rows(optimizer, model):
    """Token-embedding rows whose gradient was always zero (Adam's second moment is zero):
    the tokens that never occurred in training."""
    state = optimizer.state.get(model.token_embedding.weight, {})
    if "exp_avg_sq" not in state:
        return None
    return (state["exp_avg_sq"] == 0).all(dim=1)


# --------------------------------------------------------------------------- training

def autocast_for(device, precision):
    """The mixed-precision context for ``precision`` ("fp32" or "bf16") on ``device``."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def resolve_precision(precision, device):
    """``auto``: bf16 autocast on a CUDA device that supports it, fp32 elsewhere (on the
    2-core development CPU, bf16 autocast steps of a small ViT CLIP were slower than fp32)."""
    if precision != "auto":
        return precision
    if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def train_step(model, optimizer, scheduler, images, tokens, precision, max_grad_norm):
    """One optimizer step; returns the loss before the step."""
    model.train()
    with autocast_for(images.device, precision):
        logits_per_image, _ = model(images, tokens)
        loss = contrastive_loss(logits_per_image.float())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    return loss.item()


def train(model, batches, args, start_step=0, optimizer=None, scheduler=None, log=None):
    """Train ``model`` from ``start_step`` to ``args.steps`` on ``batches(step)``.

    ``args`` holds the hyperparameters (see ``add_arguments``). Checkpoints go to
    ``args.checkpoint`` every ``args.checkpoint_every`` steps and at the end, when set.
    ``log``, a callable, receives a dict every ``args.log_every`` steps. Returns
    ``(losses, optimizer)``: the loss of every step run here.
    """
    device = model.logit_scale.device
    precision = resolve_precision(args.precision, device)
    if optimizer is None:
        optimizer, scheduler = make_optimizer(model, args)
    losses = []
    bar = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps,
               desc="training", unit="step", mininterval=1.0, disable=args.quiet)
    started, images_seen = time.perf_counter(), 0
    for step in bar:
        images, tokens = batches(step)
        images, tokens = images.to(device), trim_padding(tokens).to(device)
        loss = train_step(model, optimizer, scheduler, images, tokens, precision,
                          args.max_grad_norm)
        if not math.isfinite(loss):
            raise FloatingPointError(f"The loss is {loss} at step {step}; lower --lr or use "
                                     "--precision fp32.")
        losses.append(loss)
        images_seen += images.shape[0]
        throughput = images_seen / (time.perf_counter() - started)
        bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{throughput:.0f}", refresh=False)
        done = step + 1
        if log is not None and (done % args.log_every == 0 or done == args.steps):
            log(dict(step=done, loss=round(loss, 5), lr=scheduler.get_last_lr()[0],
                     logit_scale=round(model.logit_scale.exp().item(), 3),
                     images_per_s=round(throughput, 1),
                     elapsed_s=round(time.perf_counter() - started, 1)))
        if args.checkpoint and (done % args.checkpoint_every == 0 or done == args.steps):
            save_checkpoint(args.checkpoint, model, optimizer, scheduler, done, args)
    bar.close()
    return losses, optimizer


# ------------------------------------------------------------------- the command line

def add_arguments(parser):
    """Add the training options to ``parser`` (``python -m fastclip.train`` and
    ``fastclip train`` share them)."""
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=DEMO_MODEL, choices=[DEMO_MODEL, *CONFIGS],
                       help=f"architecture trained from scratch (default {DEMO_MODEL})")
    model.add_argument("--init", metavar="NAME_OR_PATH",
                       help="fine-tune this model (a name or checkpoint fastclip.load reads) "
                            "instead of training --model from scratch")
    data = parser.add_argument_group("data")
    data.add_argument("--data", default="shapes", metavar="shapes|FILE.tsv",
                      help="'shapes' (default): the procedural dataset; or a TSV file of "
                           "image_path<TAB>caption lines")
    run = parser.add_argument_group("optimization")
    run.add_argument("--steps", type=int, default=1600, help="optimizer steps (default 1600)")
    run.add_argument("--batch-size", type=int, default=64)
    run.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    run.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
    run.add_argument("--weight-decay", type=float, default=0.1)
    run.add_argument("--max-grad-norm", type=float, default=1.0,
                     help="clip the gradient norm (0 disables)")
    run.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                     help="auto: bf16 autocast on CUDA, fp32 on the CPU")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", default="cpu")
    run.add_argument("--threads", type=int, default=0,
                     help="CPU threads (default: torch's choice); on a CPU shared with other "
                          "jobs, 1 thread avoids threads waiting on each other")
    run.add_argument("--backend", default="torch", choices=["torch", "triton", "reference"],
                     help="fastclip backend for training (default torch; triton's backward "
                          "recomputes the reference, unfused)")
    out = parser.add_argument_group("output")
    out.add_argument("--checkpoint", metavar="PATH",
                     help="where to save resumable checkpoints")
    out.add_argument("--checkpoint-every", type=int, default=250)
    out.add_argument("--resume", action="store_true",
                     help="continue the run saved in --checkpoint, if it exists")
    out.add_argument("--export", metavar="PATH",
                     help="write the trained model as an fp16 state dict (fastclip.load "
                          "reads it) and its description as PATH with .json")
    out.add_argument("--log", metavar="FILE", help="append JSON lines of the run to FILE")
    out.add_argument("--log-every", type=int, default=50)
    out.add_argument("--eval-images", type=int, default=1024,
                     help="held-out shapes evaluated at the end (0 skips)")
    out.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def check_arguments(args):
    for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, "
                             f"not {getattr(args, name)}.")
    if args.batch_size < 2:
        raise ValueError("--batch-size must be at least 2: the contrastive loss needs "
                         "negatives.")
    if args.resume and not args.checkpoint:
        raise ValueError("--resume needs --checkpoint PATH: the run to continue.")
    if args.data != "shapes" and not os.path.isfile(args.data):
        raise ValueError(f"--data {args.data!r} is neither 'shapes' nor a file.")


def new_model(args):
    """The model a run starts from: ``--init`` loaded in fp32, or ``--model`` initialized
    with the seed."""
    torch.manual_seed(args.seed)
    if args.init:
        from .loading import load
        model, _ = load(args.init, device="cpu", dtype=torch.float32)
        return model
    config = DEMO_CONFIG if args.model == DEMO_MODEL else CONFIGS[args.model]
    return CLIP(**config)


def make_batches(args, model):
    size, context = model.visual.input_resolution, model.context_length
    if args.data == "shapes":
        return ShapesBatches(args.seed, args.batch_size, size, context)
    return CaptionFileBatches(args.data, args.seed, args.batch_size, size, context)


def run(args):
    """Train as ``args`` (from ``add_arguments``) say; print the final metrics as JSON and
    return 0, the exit status (``fastclip train`` calls this)."""
    print(json.dumps(train_from_args(args)))
    return 0


def train_from_args(args):
    """Train as ``args`` say; returns the final metrics dict."""
    check_arguments(args)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    checkpoint = None
    if args.resume and os.path.exists(args.checkpoint):
        checkpoint = load_checkpoint(args.checkpoint)
        check_resumable(checkpoint, args, args.checkpoint)
        model = build_model(checkpoint["state_dict"], quick_gelu=checkpoint["quick_gelu"])
    else:
        model = new_model(args)
    model = model.float().to(args.device).set_backend(args.backend)
    optimizer, scheduler = make_optimizer(model, args)
    start_step = 0
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        start_step = checkpoint["step"]
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if checkpoint["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
    log = _json_lines(args.log) if args.log else None
    if log:
        log(dict(_plain_args(args), event="start", start_step=start_step,
                 torch=torch.__version__, threads=torch.get_num_threads(),
                 machine=platform.processor() or platform.machine(),
                 load_average=os.getloadavg()[0],
                 precision=resolve_precision(args.precision, args.device)))
    started = time.perf_counter()
    losses, optimizer = train(model, make_batches(args, model), args, start_step, optimizer,
                              scheduler, log)
    result = dict(event="end", steps=args.steps, final_loss=losses[-1] if losses else None,
                  train_seconds=round(time.perf_counter() - started, 1),
                  load_average=os.getloadavg()[0])
    if args.data == "shapes" and args.eval_images > 0:
        model.eval()
        result.update(shapes.evaluate(model, n=args.eval_images, seed=args.seed + 1))
    if log:
        log(result)
    if args.export:
        # Zeroing the rows training never touched only drops random initial values when the
        # run started from scratch; a fine-tuned model's rows are pretrained and are kept.
        unused = untouched_token_rows(optimizer, model) if args.init is None else None
        export_model(model, args.export, unused_token_rows=unused)
        with open(os.path.splitext(args.export)[0] + ".json", "w") as f:
            json.dump(dict(name=os.path.splitext(os.path.basename(args.export))[0],
                           config=model_config(model), training=_plain_args(args),
                           result=result), f, indent=2)
            f.write("\n")
    return result


def _json_lines(path):
    def log(record):
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    return log


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastclip.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    args = add_arguments(parser).parse_args(argv)
    try:
        run(args)
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
