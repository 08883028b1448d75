"""``auto`` on a GPU: for each op and class of shapes, the Triton kernel or the torch op,
whichever is correct and faster there, measured on the first real call.

The first call of an op in a shape class (device, dtype, widths, head dim, and buckets of the
sequence length and the rows) runs both implementations on its inputs, and the fp32
reference too. The kernel counts as correct when its error against the reference is at most
twice the torch op's plus a small epsilon (flash-attention's rule, the one the tests use).
Both are then timed, and the faster of the correct ones is kept. A kernel that fails the
check is never chosen again for that class, with a warning naming the op, the shape and the
error. A shape the kernel cannot compute runs the torch op, and no time is spent measuring.

Decisions are kept for the process and in a file in the user's cache folder, keyed by the
GPU, its compute capability and the versions of CUDA, torch, triton and fastclip, so that a
machine measures each class once. No decision is made while a CUDA graph is captured or
``torch.compile`` traces: those calls use the decision made before, or the torch op.

The device, the timer and the file are parameters, so the tests drive the logic on the CPU
through Triton's interpreter.
"""

import inspect
import json
import os
import threading
import warnings
from contextlib import nullcontext

import torch

from ..files import atomic_write
from . import reference, torch_backend

# flash-attention's epsilon, relative to the output's magnitude, per dtype.
EPSILON = {torch.float32: 1e-5, torch.float16: 2e-4, torch.bfloat16: 2e-3}
DEFAULT_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                             "fastclip")


def _bucket(n):
    """The power of two at or above ``n``: one class for lengths and row counts alike."""
    return 1 << max(int(n) - 1, 0).bit_length()


def _rows(x):
    return x.numel() // max(x.shape[-1], 1)


def shape_class(op, args):
    """The class of a call's shapes: calls of one class share a decision. fp32 classes also
    say whether PyTorch's matmuls use TF32, which the kernels follow."""
    from ..kernels.common import matmul_uses_tf32
    x = args[0]
    head = (op, str(x.device), str(x.dtype).removeprefix("torch."))
    if x.dtype == torch.float32:
        head += ("tf32" if matmul_uses_tf32() else "ieee",)
    if op in ("layer_norm", "add_layer_norm"):
        return head + (x.shape[-1], _bucket(_rows(x)))
    if op == "attention":
        qkv, heads, causal = args
        return head + (qkv.shape[-1] // (3 * heads), heads, _bucket(qkv.shape[1]),
                       _bucket(qkv.shape[0]), bool(causal))
    # mlp: x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual
    residual = args[6] if len(args) > 6 else None
    return head + (x.shape[-1], args[1].shape[0], _bucket(_rows(x)), args[5],
                   residual is not None)


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def flash_rule(candidate, torch_result, reference_result):
    """``(passes, candidate's error, torch's error)`` of flash-attention's rule."""
    worst, torch_worst, bound_ok = 0.0, 0.0, True
    for got, theirs, truth in zip(*map(_as_tuple, (candidate, torch_result, reference_result))):
        truth = truth.double()
        scale = max(1.0, truth.abs().max().item())
        error = (got.double() - truth).abs().max().item()
        torch_error = (theirs.double() - truth).abs().max().item()
        if not torch.isfinite(got).all() or \
                error > 2 * torch_error + EPSILON.get(got.dtype, 1e-5) * scale:
            bound_ok = False
        worst, torch_worst = max(worst, error), max(torch_worst, torch_error)
    return bound_ok, worst, torch_worst


def cuda_event_timer(fn, repeats=3, calls=5):
    """The median seconds of one ``fn()`` on the current CUDA stream, by CUDA events: after a
    warm-up call, ``repeats`` times ``calls`` calls back to back, so that the GPU is kept
    busy as in a model's forward and the launches overlap the work."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000 / calls)
    return sorted(times)[len(times) // 2]


def machine_key(device):
    """What a decision holds for: the GPU and the software that ran the kernels."""
    import triton

    from ..version import __version__
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        capability = ".".join(map(str, torch.cuda.get_device_capability(device)))
    else:
        name, capability = "cpu (Triton's interpreter)", "-"
    return {"device": name, "capability": capability, "cuda": torch.version.cuda,
            "torch": torch.__version__, "triton": triton.__version__, "fastclip": __version__}


class Decisions:
    """The decisions of one machine: in memory, and in a JSON file when ``path`` is given."""

    def __init__(self, path=None):
        self.path = path
        self.lock = threading.Lock()
        self.table = {}
        if path is not None and os.path.exists(path):
            self.table = _read_decisions(path)

    def get(self, key):
        # A dict read is atomic: no lock, so compiled code could read it too.
        entry = self.table.get(key)
        return None if entry is None else entry["use"]

    def put(self, key, use, detail):
        with self.lock:
            self.table[key] = dict(detail, use=use)
            snapshot = {json.dumps(list(k)): v for k, v in self.table.items()}
        if self.path is not None:
            try:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                atomic_write(self.path, lambda f: f.write(
                    json.dumps(snapshot, indent=1, sort_keys=True).encode()), durable=False)
            except OSError as error:  # a read-only cache only costs measuring again
                warnings.warn(f"fastclip could not save its auto decisions to {self.path}: "
                              f"{error}", RuntimeWarning, stacklevel=2)

    def listing(self):
        """``{"op class": {"use": ..., errors and times}}``, for ``fastclip.info()``."""
        with self.lock:
            return {" ".join(map(str, k)): dict(v) for k, v in self.table.items()}


def _read_decisions(path):
    """The decisions in ``path``; entries that are not decisions (a damaged or foreign file)
    are dropped, and measured again."""
    try:
        with open(path) as f:
            stored = json.load(f)
    except (OSError, ValueError):
        return {}
    table = {}
    for key, entry in (stored.items() if isinstance(stored, dict) else ()):
        try:
            parsed = json.loads(key)
        except ValueError:
            continue
        if isinstance(parsed, list) and isinstance(entry, dict) and \
                entry.get("use") in ("triton", "torch"):
            table[tuple(parsed)] = entry
    return table


def decisions_for(device, folder=DEFAULT_CACHE):
    """The decisions file of this machine and software, in ``folder``."""
    key = machine_key(device)
    name = "-".join(str(v) for v in key.values())
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
    return Decisions(os.path.join(folder, f"auto-{safe}.json"))


# The correctness check runs on at most this many of a batch's samples (the reference builds
# fp32 attention scores, quadratic in the length, for every sample it is given).
CHECK_SAMPLES = 8


def _check_inputs(args):
    """The first samples of a call's batch, upcast: fp64 for fp32 inputs (whose torch op may
    be the reference's own arithmetic), fp32 for the others."""
    batch = args[0].shape[0]
    def part(a):
        if not isinstance(a, torch.Tensor):
            return a
        if a.dim() > 1 and a.shape[0] == batch and batch > CHECK_SAMPLES:
            a = a[:CHECK_SAMPLES]
        return a
    return tuple(part(a) for a in args)


def _upcast(args):
    return tuple((a.double() if a.dtype == torch.float32 else a.float())
                 if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


class Measured:
    """The ops of the measured ``auto`` backend: each call takes what its class's decision
    says, deciding on the first call of the class."""

    def __init__(self, kernels, refusals, decisions, timer=cuda_event_timer):
        self.kernels = kernels  # op name -> the Triton op (the per-op fallback wrappers)
        self.refusals = refusals  # op name -> fn(*args): why the kernel refuses, or None
        self.decisions = decisions
        self.timer = timer
        self.torch_ops = {"layer_norm": torch_backend.layer_norm,
                          "add_layer_norm": torch_backend.add_layer_norm,
                          "attention": torch_backend.attention, "mlp": torch_backend.mlp}
        self.reference_ops = {"layer_norm": reference.layer_norm,
                              "add_layer_norm": reference.add_layer_norm,
                              "attention": reference.attention, "mlp": reference.mlp}

    def op(self, name):
        signature = inspect.signature(self.torch_ops[name])

        def run(*args, **kwargs):
            if kwargs:
                args = tuple(signature.bind(*args, **kwargs).arguments.values())
            if torch.compiler.is_compiling() or args[0].numel() == 0:
                # Compiled code and empty batches take the torch op: no class is computed
                # (it would pin symbolic shapes), nothing is measured.
                return self.torch_ops[name](*args)
            key = shape_class(name, args)
            use = self.decisions.get(key)
            if use is None and _capturing():
                use = "torch"  # a CUDA graph replays what was decided before its capture
            if use is None:
                device = args[0].device
                with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
                    use = self._decide(name, key, args)
            return (self.kernels[name] if use == "triton" else self.torch_ops[name])(*args)
        run.__name__ = name
        return run

    def _decide(self, name, key, args):
        refusal = self.refusals[name](*args)
        if refusal is not None:
            self.decisions.put(key, "torch", {"why": f"the kernel cannot: {refusal}"})
            return "torch"
        sample = _check_inputs(args)
        try:
            with torch.no_grad():
                kernel_out = self.kernels[name](*sample)
        except Exception as error:  # a kernel that cannot launch here (resources, compile)
            warnings.warn(f"fastclip auto: the Triton kernel of {name} fails for {key[1:]} "
                          f"({type(error).__name__}: {error}); that op runs PyTorch's "
                          "kernels there.", RuntimeWarning, stacklevel=3)
            self.decisions.put(key, "torch", {"why": f"the kernel failed: {error}"[:500]})
            return "torch"
        with torch.no_grad():
            torch_out = self.torch_ops[name](*sample)
            # The reference is the truth whatever autocast the caller runs under.
            with torch.autocast(sample[0].device.type, enabled=False):
                truth = self.reference_ops[name](*_upcast(sample))
        correct, error, torch_error = flash_rule(kernel_out, torch_out, truth)
        detail = {"kernel_error": error, "torch_error": torch_error}
        if not correct:
            warnings.warn(
                f"fastclip auto: the Triton kernel of {name} gives wrong results for "
                f"{key[1:]} (error {error:.3e} against PyTorch's {torch_error:.3e}); that op "
                "runs PyTorch's kernels there from now on.", RuntimeWarning, stacklevel=3)
            self.decisions.put(key, "torch", dict(detail, why="the kernel failed its check"))
            return "torch"
        with torch.no_grad():
            kernel_s = self.timer(lambda: self.kernels[name](*args))
            torch_s = self.timer(lambda: self.torch_ops[name](*args))
        use = "triton" if kernel_s < torch_s else "torch"
        self.decisions.put(key, use, dict(detail, kernel_s=kernel_s, torch_s=torch_s,
                                          why="faster" if use == "triton" else "not faster"))
        return use


def _capturing():
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
