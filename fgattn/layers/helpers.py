"""Helpers shared by several layers."""

from __future__ import annotations

import torch


def logit_scale(scale: float, length_normalized: bool, x: torch.Tensor) -> float:
    """scale, or scale / (H·W) for x (B, C, H, W) when length-normalised (Hawkeye's variant).

    The ``scale`` SCI and CCI pass to `fgattn.functional` for input x.
    """
    return scale / (x.shape[-2] * x.shape[-1]) if length_normalized else scale
