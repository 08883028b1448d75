"""A run's files: resumable checkpoints, and the exported model that ``fastclip.load`` reads.

Both are written atomically (``fastclip.files.atomic_write``): an interrupted write never
leaves a truncated file under the final name.
"""

import io
import os
import zipfile

import torch

from ..checkpoints import read_checkpoint
from ..files import atomic_write


def save_checkpoint(path, model, optimizer, scheduler, step, config):
    """Write a resumable checkpoint: the model, optimizer, scheduler, step, the run's
    :class:`TrainConfig` (as a dict) and the random number generators' states."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    state = dict(
        state_dict=model.state_dict(), optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(), step=step, config=config.as_dict(),
        quick_gelu=uses_quick_gelu(model),
        rng=dict(torch=torch.get_rng_state(),
                 cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []),
    )
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path, config):
    """The checkpoint at ``path``, refused with a ValueError when it was saved by a run
    whose defining settings differ from ``config``'s."""
    checkpoint = read_checkpoint(path, "training checkpoint")
    # Checkpoints of earlier versions recorded the settings under "args".
    conflicts = config.resume_conflicts(checkpoint.get("config", checkpoint.get("args", {})))
    if conflicts:
        raise ValueError(f"{path} was saved by a run with {', '.join(conflicts)}; resume with "
                         "the same options, or start a new run with another --checkpoint.")
    return checkpoint


def uses_quick_gelu(model):
    return model.transformer.resblocks[0].mlp.activation == "quick_gelu"


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

    def write_compressed(f):
        with zipfile.ZipFile(buffer) as source, \
                zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as target:
            for info in source.infolist():
                target.writestr(info.filename, source.read(info.filename))

    atomic_write(path, write_compressed)


def untouched_token_rows(optimizer, model):
    """Token-embedding rows whose gradient was always zero (Adam's second moment is zero):
    the tokens that never occurred in training."""
    state = optimizer.state.get(model.token_embedding.weight, {})
    if "exp_avg_sq" not in state:
        return None
    return (state["exp_avg_sq"] == 0).all(dim=1)
