"""`create_model`: CIN or PCA-Net on any timm backbone, or one of the registered models.

The registered models (``cin_resnet50``, ``cin_resnet101``, ``pcanet_resnet50``,
``pcanet_resnet101``) live beside their classes in `cin` and `pcanet`, the timm way: their
``default_cfgs`` and ``@register_model`` entrypoints. ``pretrained=True`` loads ImageNet weights
into the backbone only (the heads are new), through timm: its hub/URL weights, or a local file with
``pretrained_cfg_overlay=dict(file=path)``. Their backbones are timm's torchvision ports
(``resnet50.tv_in1k``), the weights both papers fine-tuned; pass ``backbone="resnet50.a1_in1k"``
(or any tag) to choose others.
"""

from __future__ import annotations

from typing import Any

import timm
from torch import nn

from ._common import features_only, pop_feature_args
from .cin import CIN
from .pcanet import PCANet

__all__ = ["ARCHS", "create_model"]

ARCHS: dict[str, type[nn.Module]] = {"cin": CIN, "pcanet": PCANet}


def create_model(
    arch: str,
    backbone: str | nn.Module | None = None,
    num_classes: int = 1000,
    pretrained: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build a CIN or PCA-Net on any timm backbone.

    Args:
        arch: "cin" or "pcanet" (on ``backbone``), or a registered name ("cin_resnet50", ...),
            which goes through ``timm.create_model`` (``backbone`` then overrides its default).
        backbone: timm model name (any family, optionally with a weight tag) or a module with
            ``out_channels``; defaults to "resnet50" for "cin"/"pcanet".
        num_classes: K.
        pretrained: ImageNet backbone weights through timm (default False: random init, as
            timm; the papers fine-tune ImageNet weights). Offline, pass
            ``pretrained_cfg_overlay=dict(file=path)``; a download that cannot happen fails
            within seconds with that fix in the message.
        **kwargs: model options (see `CIN`, `PCANet`) and timm backbone arguments (img_size,
            drop_path_rate, pretrained_cfg_overlay, ...); ``features_only=True`` (with
            ``out_indices``) returns timm's feature extractor over the model's stages.

    Returns:
        The model, with a timm ``pretrained_cfg`` (448 px, crop_pct 448/512, the backbone's
        mean/std) for timm's data pipeline.
    """
    if arch in ARCHS:
        backbone = "resnet50" if backbone is None else backbone
        feature_args = pop_feature_args(kwargs)
        model = ARCHS[arch](backbone, num_classes=num_classes, pretrained=pretrained, **kwargs)
        return model if feature_args is None else features_only(model, feature_args)
    if arch in timm.list_models(("cin_*", "pcanet_*")):
        if backbone is not None:
            kwargs["backbone"] = backbone
        return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, **kwargs)
    raise ValueError(
        f"arch must be one of {sorted(ARCHS)} or a registered model "
        f"{timm.list_models(('cin_*', 'pcanet_*'))}, got {arch!r}"
    )
