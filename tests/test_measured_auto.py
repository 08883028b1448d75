"""The measured ``auto`` backend's decisions, driven on the CPU through Triton's interpreter
with a timer the tests control: a wrong kernel is rejected, a slower one loses, a shape the
kernel cannot compute falls back without timing, and a decision is reused without timing,
from memory and from its file."""

import pytest
import torch

from fastclip.ops import dispatch, measured, reference, triton_backend


class Timer:
    """Says the kernel takes ``kernel_s`` and the torch op ``torch_s``; counts its calls."""

    def __init__(self, kernel_s, torch_s):
        self.answers, self.calls = [kernel_s, torch_s], 0

    def __call__(self, fn):
        fn()
        self.calls += 1
        return self.answers[(self.calls - 1) % 2]


def layer_norm_args(width=40, rows=6):
    return torch.randn(rows, width), torch.randn(width), torch.randn(width), 1e-5


def backend(tmp_path, timer, **kernels):
    made = dispatch.measured_backend("cpu", measured.Decisions(str(tmp_path / "auto.json")),
                                     timer)
    if kernels:  # a kernel replaced, to be judged wrong
        made = dispatch.Backend(**{**made.__dict__, **kernels})
    return made


def test_a_faster_correct_kernel_is_chosen_and_the_decision_reused(tmp_path):
    timer = Timer(kernel_s=1.0, torch_s=2.0)
    ops = backend(tmp_path, timer)
    args = layer_norm_args()
    torch.testing.assert_close(ops.layer_norm(*args), reference.layer_norm(*args))
    assert timer.calls == 2
    ops.layer_norm(*layer_norm_args(rows=5))  # the same class (rows 5 and 6 share a bucket)
    assert timer.calls == 2
    [decision] = measured.Decisions(str(tmp_path / "auto.json")).table.values()
    assert decision["use"] == "triton" and decision["why"] == "faster"
    again = backend(tmp_path, timer)  # a new process: the file's decision, no timing
    again.layer_norm(*args)
    assert timer.calls == 2


def test_a_slower_kernel_loses(tmp_path):
    timer = Timer(kernel_s=3.0, torch_s=1.0)
    ops = backend(tmp_path, timer)
    ops.layer_norm(*layer_norm_args())
    [decision] = measured.Decisions(str(tmp_path / "auto.json")).table.values()
    assert decision["use"] == "torch" and decision["why"] == "not faster"


def test_a_wrong_kernel_is_rejected_with_a_warning(tmp_path):
    timer = Timer(kernel_s=0.1, torch_s=1.0)  # fast, but wrong: never chosen
    decisions = measured.Decisions(str(tmp_path / "auto.json"))
    ops = measured.Measured(
        kernels={"layer_norm": lambda x, w, b, eps: triton_backend.layer_norm(x, w, b, eps) + 0.1},
        refusals={"layer_norm": lambda *args: None}, decisions=decisions, timer=timer)
    run = ops.op("layer_norm")
    args = layer_norm_args()
    with pytest.warns(RuntimeWarning, match="kernel of layer_norm gives wrong results"):
        out = run(*args)
    torch.testing.assert_close(out, reference.layer_norm(*args))  # the torch op's result
    assert timer.calls == 0
    [decision] = decisions.table.values()
    assert decision["use"] == "torch" and decision["why"] == "the kernel failed its check"


def test_a_shape_the_kernel_cannot_compute_falls_back_without_timing(tmp_path):
    timer = Timer(kernel_s=1.0, torch_s=2.0)
    ops = backend(tmp_path, timer)
    qkv = torch.randn(1, 5, 3 * 2 * 16)  # head dim 16
    torch.testing.assert_close(ops.attention(qkv, 2, True), reference.attention(qkv, 2, True))
    assert timer.calls == 0
    [decision] = measured.Decisions(str(tmp_path / "auto.json")).table.values()
    assert decision["use"] == "torch" and "head dim 16" in decision["why"]


def test_a_cuda_graph_capture_uses_the_decision_made_before_it(tmp_path, monkeypatch):
    timer = Timer(kernel_s=1.0, torch_s=2.0)
    ops = backend(tmp_path, timer)
    monkeypatch.setattr(measured, "_capturing", lambda: True)
    ops.layer_norm(*layer_norm_args())  # no decision yet: the torch op, nothing decided
    assert timer.calls == 0 and not (tmp_path / "auto.json").exists()
    monkeypatch.setattr(measured, "_capturing", lambda: False)
    ops.layer_norm(*layer_norm_args())  # the warm-up before a capture decides
    monkeypatch.setattr(measured, "_capturing", lambda: True)
    used = []
    real = triton_backend.layer_norm
    monkeypatch.setattr(triton_backend, "layer_norm",
                        lambda *args: used.append(1) or real(*args))
    ops = backend(tmp_path, timer)  # the same file: the decision is there
    ops.layer_norm(*layer_norm_args())
    assert used and timer.calls == 2


def test_a_whole_model_runs_on_the_measured_backend(tmp_path):
    from small_models import small_clip
    model = small_clip(vision_patch_size=32, vocab_size=1000)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model.set_backend("reference").encode_image(images)
        model.set_backend(backend(tmp_path, Timer(kernel_s=1.0, torch_s=2.0)))
        assert model.backend == "auto"
        torch.testing.assert_close(model.encode_image(images), expected, rtol=1e-4, atol=1e-4)
    uses = {d["use"] for d in measured.Decisions(str(tmp_path / "auto.json")).table.values()}
    assert uses == {"triton"}


def test_compiled_code_takes_the_torch_op_without_graph_breaks(tmp_path):
    from small_models import small_clip
    model = small_clip(vision_patch_size=32, vocab_size=1000)
    model.set_backend(backend(tmp_path, Timer(kernel_s=1.0, torch_s=2.0)))
    images = torch.randn(2, 3, 64, 64)
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(model.encode_image)(images)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert not (tmp_path / "auto.json").exists()  # nothing decided while tracing


def test_autocast_does_not_make_a_correct_kernel_look_wrong(tmp_path):
    import warnings
    timer = Timer(kernel_s=1.0, torch_s=2.0)
    ops = backend(tmp_path, timer)
    x = torch.randn(4, 7, 64).bfloat16()
    weights = (torch.randn(256, 64).bfloat16() * 0.1, torch.randn(256).bfloat16(),
               torch.randn(64, 256).bfloat16() * 0.05, torch.randn(64).bfloat16())
    with warnings.catch_warnings(), torch.autocast("cpu", dtype=torch.bfloat16):
        warnings.simplefilter("error")  # a rejection would warn
        ops.mlp(x, *weights, "quick_gelu", residual=x)
    [decision] = measured.Decisions(str(tmp_path / "auto.json")).table.values()
    assert decision["use"] == "triton", decision


def test_an_empty_batch_is_computed_and_decides_nothing(tmp_path):
    ops = backend(tmp_path, Timer(kernel_s=1.0, torch_s=2.0))
    x, weight, bias, eps = layer_norm_args(rows=0)
    assert ops.layer_norm(x, weight, bias, eps).shape == (0, 40)
    assert ops.attention(torch.randn(0, 5, 3 * 64), 1, False).shape == (0, 5, 64)
    assert not (tmp_path / "auto.json").exists()


@pytest.mark.parametrize("content", ["[]", "null", '{"1": {"use": "torch"}}',
                                     '{"[\\"a\\"]": "torch"}', "not json"])
def test_a_damaged_decision_file_is_measured_again(tmp_path, content):
    (tmp_path / "auto.json").write_text(content)
    timer = Timer(kernel_s=1.0, torch_s=2.0)
    ops = backend(tmp_path, timer)
    ops.layer_norm(*layer_norm_args())
    assert timer.calls == 2
    assert len(measured.Decisions(str(tmp_path / "auto.json")).table) == 1


def test_a_kernel_that_fails_to_launch_is_replaced_by_the_torch_op(tmp_path):
    def broken(x, weight, bias, eps):
        raise RuntimeError("out of resources: shared memory")

    decisions = measured.Decisions(str(tmp_path / "auto.json"))
    run = measured.Measured(kernels={"layer_norm": broken},
                            refusals={"layer_norm": lambda *args: None},
                            decisions=decisions, timer=Timer(1.0, 2.0)).op("layer_norm")
    args = layer_norm_args()
    with pytest.warns(RuntimeWarning, match="fails for"):
        torch.testing.assert_close(run(*args), reference.layer_norm(*args))
    assert next(iter(decisions.table.values()))["use"] == "torch"
