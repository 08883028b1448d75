"""Triton kernels, installed as ``fastclip.kernels``."""
