"""Numeric comparisons that say where and how badly they fail."""

import torch


def worst_element(actual, expected):
    """(index, actual value, expected value, absolute error) of the largest difference."""
    diff = (actual.double() - expected.double()).abs()
    flat = int(diff.argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    return index, actual[index].item(), expected[index].item(), diff[index].item()


def assert_close_relative(actual, expected, rtol, name="output", scale=None):
    """max |actual - expected| <= rtol * scale, where scale is the output's magnitude
    (max |expected|) unless given: the measure for activations that pass through zero."""
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    if scale is None:
        scale = expected.double().abs().max().item()
    index, got, want, error = worst_element(actual, expected)
    bad = ((actual.double() - expected.double()).abs() > rtol * scale).double().mean().item()
    assert error <= rtol * scale, (
        f"{name}: worst element at {index}: {got} vs {want} (error {error:.3e} > "
        f"{rtol:.1e} x magnitude {scale:.3e}); {bad:.2%} of elements out of tolerance")


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.double().flatten(1), b.double().flatten(1))


# The epsilon of flash-attention's rule, relative to the output's magnitude: about the
# rounding of one value in each dtype.
EPSILON = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2.0 ** -11,
           torch.bfloat16: 2.0 ** -8}


def assert_flash_rule(actual, expected, torch_actual, name, epsilon=None):
    """max |actual - expected| <= 2 max |torch_actual - expected| + epsilon * magnitude:
    ``expected`` is computed in float64 from the same inputs, ``torch_actual`` is PyTorch's
    result in ``actual``'s dtype (flash-attention's rule)."""
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == torch_actual.dtype, f"{name}: dtype {actual.dtype}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    epsilon = EPSILON[actual.dtype] if epsilon is None else epsilon
    scale = max(1.0, expected.double().abs().max().item())
    torch_error = (torch_actual.double() - expected.double()).abs().max().item()
    bound = 2 * torch_error + epsilon * scale
    index, got, want, error = worst_element(actual, expected)
    assert error <= bound, (
        f"{name}: worst element at {index}: {got} vs float64 reference {want} (error "
        f"{error:.3e} > bound {bound:.3e} = 2 x PyTorch's {actual.dtype} error "
        f"{torch_error:.3e} + epsilon)")
