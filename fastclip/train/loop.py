"""Contrastive training of any fastclip CLIP: from scratch, or fine-tuning a loaded model.

The loss is CLIP's symmetric InfoNCE with the learnable temperature ``logit_scale``, clamped
at ln(100) as in CLIP. AdamW decays only the matrices (not gains, biases, embeddings or
``logit_scale``); the learning rate warms up linearly, then follows a cosine to zero;
gradients are clipped by norm. Checkpoints hold the model, optimizer, scheduler, step and RNG
states and resume the same run.
"""

import json
import math
import os
import platform
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..loading import load, place_model
from ..model import CLIP, CONFIGS, build_model, infer_config
from . import shapes
from .checkpoints import export_model, load_checkpoint, save_checkpoint, untouched_token_rows
from .config import DEMO_CONFIG, DEMO_MODEL
from .data import make_batches

MAX_LOGIT_SCALE = math.log(100)


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


def make_optimizer(model, config):
    """AdamW with CLIP's betas and epsilon, and the warmup-cosine schedule; fused (one kernel
    over all parameters) where PyTorch has it."""
    fused = model.logit_scale.device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr,
                                  betas=(0.9, 0.98), eps=1e-6, fused=fused)
    schedule = WarmupCosine(config.warmup, config.steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def autocast_for(device, precision):
    """The mixed-precision context for ``precision`` ("fp32" or "bf16") on ``device``."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def resolve_precision(precision, device):
    """``auto``: bf16 autocast on a CUDA device that supports it, fp32 elsewhere."""
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


def train(model, batches, config, start_step=0, optimizer=None, scheduler=None, log=None):
    """Train ``model`` from ``start_step`` to ``config.steps`` on ``batches(step)``.

    ``config`` is a :class:`TrainConfig`. Checkpoints go to
    ``config.checkpoint`` every ``config.checkpoint_every`` steps and at the end, when set.
    ``log``, a callable, receives a dict every ``config.log_every`` steps. Returns
    ``(losses, optimizer)``: the loss of every step run here.
    """
    device = model.logit_scale.device
    precision = resolve_precision(config.precision, device)
    if optimizer is None:
        optimizer, scheduler = make_optimizer(model, config)
    losses = []
    bar = tqdm(range(start_step, config.steps), initial=start_step, total=config.steps,
               desc="training", unit="step", mininterval=1.0, disable=config.quiet)
    started, images_seen = time.perf_counter(), 0
    for step in bar:
        images, tokens = batches(step)
        images, tokens = images.to(device), trim_padding(tokens).to(device)
        loss = train_step(model, optimizer, scheduler, images, tokens, precision,
                          config.max_grad_norm)
        if not math.isfinite(loss):
            raise FloatingPointError(f"The loss is {loss} at step {step}; lower --lr or use "
                                     "--precision fp32.")
        losses.append(loss)
        images_seen += images.shape[0]
        throughput = images_seen / (time.perf_counter() - started)
        bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{throughput:.0f}", refresh=False)
        done = step + 1
        if log is not None and (done % config.log_every == 0 or done == config.steps):
            log(dict(step=done, loss=round(loss, 5), lr=scheduler.get_last_lr()[0],
                     logit_scale=round(model.logit_scale.exp().item(), 3),
                     images_per_s=round(throughput, 1),
                     elapsed_s=round(time.perf_counter() - started, 1)))
        if config.checkpoint and (done % config.checkpoint_every == 0 or done == config.steps):
            save_checkpoint(config.checkpoint, model, optimizer, scheduler, done, config)
    bar.close()
    return losses, optimizer


def initial_model(config):
    """The model a run starts from: ``init`` loaded in fp32, or ``model`` initialized with the
    seed."""
    torch.manual_seed(config.seed)
    if config.init:
        return load(config.init, device="cpu", dtype=torch.float32)[0]
    return CLIP(**(DEMO_CONFIG if config.model == DEMO_MODEL else CONFIGS[config.model]))


def run(config):
    """Train as ``config`` (a :class:`TrainConfig`) says, resuming from its checkpoint when
    asked; evaluate and export when asked. Returns the final metrics dict."""
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    checkpoint = None
    if config.resume and os.path.exists(config.checkpoint):
        checkpoint = load_checkpoint(config.checkpoint, config)
        model = build_model(checkpoint["state_dict"], quick_gelu=checkpoint["quick_gelu"],
                            dtype=torch.float32)
    else:
        model = initial_model(config)
    model = place_model(model.float(), config.device, config.backend)
    optimizer, scheduler = make_optimizer(model, config)
    start_step = 0
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        start_step = checkpoint["step"]
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if checkpoint["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
    log = _json_lines(config.log) if config.log else None
    if log:
        log(dict(config.as_dict(), event="start", start_step=start_step,
                 torch=torch.__version__, threads=torch.get_num_threads(),
                 machine=platform.processor() or platform.machine(),
                 load_average=os.getloadavg()[0],
                 precision=resolve_precision(config.precision, config.device)))
    started = time.perf_counter()
    losses, optimizer = train(model, make_batches(config, model), config, start_step,
                              optimizer, scheduler, log)
    result = dict(event="end", steps=config.steps, final_loss=losses[-1] if losses else None,
                  train_seconds=round(time.perf_counter() - started, 1),
                  load_average=os.getloadavg()[0])
    if config.data == "shapes" and config.eval_images > 0:
        model.eval()
        result.update(shapes.evaluate(model, n=config.eval_images, seed=config.seed + 1))
    if log:
        log(result)
    if config.export:
        # Zeroing the rows training never touched only drops random initial values when the
        # run started from scratch; a fine-tuned model's rows are pretrained and are kept.
        unused = untouched_token_rows(optimizer, model) if config.init is None else None
        export_model(model, config.export, unused_token_rows=unused)
        description = dict(name=os.path.splitext(os.path.basename(config.export))[0],
                           config=infer_config(model.state_dict()),
                           training=config.as_dict(), result=result)
        with open(os.path.splitext(config.export)[0] + ".json", "w") as f:
            f.write(json.dumps(description, indent=2) + "\n")
    return result


def _json_lines(path):
    def log(record):
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    return log
