"""Pieces shared by the assembled models: timm interface, paired-batch checks, FGVC data config."""

from __future__ import annotations

from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from .._shapes import check_image_batch

# The FGVC protocol of both papers: Resize(512) + crop 448.
FGVC_IMG_SIZE = 448
FGVC_CROP_PCT = 448 / 512


class TimmModelMixin:
    """timm's model interface where CIN and PCANet agree: a `backbone`, a classifier `fc`, and a
    forward that trains on paired batches and otherwise runs the single-image path."""

    def forward(
        self, x: torch.Tensor, target: torch.Tensor | None = None
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Training with a target: dict of logits and losses (`forward_train`); else logits."""
        if self.training and target is not None:
            return self.forward_train(x, target)
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if hasattr(self.backbone, "set_grad_checkpointing"):
            self.backbone.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc


def check_paired_batch(x: torch.Tensor, target: torch.Tensor) -> int:
    """Check a training batch [A_1..A_N, B_1..B_N] (A_i pairs with B_i) and its labels; return N."""
    check_image_batch(x, "x")
    if x.shape[0] % 2:
        raise ValueError(
            f"x must be a paired batch of 2N images (image i pairs with image i + N) in training "
            f"with a target, got an odd batch size {x.shape[0]} in shape {tuple(x.shape)}"
        )
    if not isinstance(target, torch.Tensor) or target.shape != (x.shape[0],):
        got = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        raise ValueError(f"target must have shape ({x.shape[0]},), one label per image, got {got}")
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}")
    return x.shape[0] // 2


def fgvc_pretrained_cfg(backbone: nn.Module, img_size: Any = None) -> dict[str, Any]:
    """timm pretrained_cfg of an assembled model: the backbone's normalisation, FGVC input size.

    Input (3, 448, 448) and crop_pct 448/512 (Resize(512) + CenterCrop(448)), as both papers, or
    ``img_size`` where the caller chose one.
    """
    base = dict(getattr(backbone, "pretrained_cfg", None) or {})
    size = img_size if img_size is not None else FGVC_IMG_SIZE
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    return dict(
        input_size=(3, *size),
        crop_pct=FGVC_CROP_PCT,
        crop_mode="center",
        interpolation="bilinear",
        mean=tuple(base.get("mean", IMAGENET_DEFAULT_MEAN)),
        std=tuple(base.get("std", IMAGENET_DEFAULT_STD)),
        num_classes=None,
        fixed_input_size=False,
    )
