"""Pieces shared by the assembled models: timm interface, paired-batch checks, FGVC data config,
timm registration."""

from __future__ import annotations

from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import resolve_pretrained_cfg
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


def fgvc_pretrained_cfg(
    backbone: nn.Module | None = None, img_size: Any = None, **kwargs: Any
) -> dict[str, Any]:
    """timm pretrained_cfg of the papers' FGVC protocol, for timm's data pipeline.

    Input (3, 448, 448) and crop_pct 448/512 (Resize(512) + CenterCrop(448)), as both papers, or
    ``img_size`` where the caller chose one; the normalisation of ``backbone``'s weights (ImageNet's
    without a backbone, as in the registered default cfgs); ``kwargs`` add keys.
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
        num_classes=None,  # fine-grained heads: the caller picks num_classes
        fixed_input_size=False,
        **kwargs,
    )


def registered_cfg(backbone: str) -> dict[str, Any]:
    """Default cfg of a registered model on timm's ``backbone`` (for ``default_cfgs``)."""
    return fgvc_pretrained_cfg(
        first_conv="backbone.body.model.conv1",
        classifier="fc",
        notes=(f"Backbone weights: timm {backbone} (ImageNet-1k); head trained from scratch.",),
    )


def create_registered(
    model_cls: type[nn.Module],
    variant: str,
    default_backbone: str,
    pretrained: bool = False,
    pretrained_cfg: Any = None,
    pretrained_cfg_overlay: dict[str, Any] | None = None,
    cache_dir: Any = None,
    **kwargs: Any,
) -> nn.Module:
    """Body of a ``@register_model`` entrypoint.

    ``pretrained`` and timm.create_model's weight-source arguments (``pretrained_cfg_overlay``,
    ``cache_dir``) go to a named backbone: only the backbone has pretrained weights. The model's
    pretrained_cfg is the variant's (or the ``pretrained_cfg`` given), with the input size
    (``img_size``) and normalisation (of an overriding backbone) of the model as built.
    """
    kwargs.setdefault("backbone", default_backbone)
    if isinstance(kwargs["backbone"], str):
        if pretrained_cfg_overlay:
            kwargs["pretrained_cfg_overlay"] = pretrained_cfg_overlay
        if cache_dir is not None:
            kwargs["cache_dir"] = cache_dir
    model = model_cls(pretrained=pretrained, **kwargs)
    as_built = {k: model.pretrained_cfg[k] for k in ("input_size", "mean", "std")}
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg, pretrained_cfg_overlay=as_built)
    model.pretrained_cfg = model.default_cfg = cfg.to_dict()
    return model
