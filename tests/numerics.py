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
