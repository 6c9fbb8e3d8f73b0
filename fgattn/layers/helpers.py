"""Helpers shared by several layers."""

from __future__ import annotations

import torch


def logit_scale(scale: float, length_normalized: bool, x: torch.Tensor) -> float:
    """scale, or scale / (H·W) for x (B, C, H, W) when length-normalised (Hawkeye's variant).

    The ``scale`` SCI and CCI pass to `fgattn.functional` for input x.
    """
    return scale / (x.shape[-2] * x.shape[-1]) if length_normalized else scale


def conv_input(y: torch.Tensor) -> torch.Tensor:
    """y as φ's input: unchanged, but channels_last under torch.compile on CPU.

    Inductor lays a CPU convolution's input out channels_last; when that input is a view (the
    reshaped bmm result Y) saved for the backward, with dynamic shapes, it fails to order the
    view's symbolic strides (pytorch/pytorch#185510). A channels_last copy is no view, and it is
    the copy inductor would have made anyway. Eager runs are unchanged.
    """
    if torch.compiler.is_compiling() and y.device.type == "cpu":
        return y.contiguous(memory_format=torch.channels_last)
    return y
