"""timm registration of the papers' models, and `create_model` for any other backbone.

``import fgattn`` registers ``cin_resnet50``, ``cin_resnet101``, ``pcanet_resnet50`` and
``pcanet_resnet101`` in timm, so ``timm.create_model("cin_resnet50", num_classes=200)`` works.
``pretrained=True`` loads ImageNet weights into the backbone only (the heads are new), through
timm: its hub/URL weights, or a local file with ``pretrained_cfg_overlay=dict(file=path)``.
The backbones are timm's torchvision ports (``resnet50.tv_in1k``), the weights both papers
fine-tuned; pass ``backbone="resnet50.a1_in1k"`` (or any tag) to choose others.
"""

from __future__ import annotations

from typing import Any

import timm
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ._common import FGVC_CROP_PCT, FGVC_IMG_SIZE
from .cin import CIN
from .pcanet import PCANet

__all__ = ["ARCHS", "create_model"]

ARCHS: dict[str, type[nn.Module]] = {"cin": CIN, "pcanet": PCANet}


def _cfg(backbone: str, **kwargs: Any) -> dict[str, Any]:
    return dict(
        input_size=(3, FGVC_IMG_SIZE, FGVC_IMG_SIZE),
        crop_pct=FGVC_CROP_PCT,
        crop_mode="center",
        interpolation="bilinear",
        mean=timm.data.IMAGENET_DEFAULT_MEAN,
        std=timm.data.IMAGENET_DEFAULT_STD,
        num_classes=None,  # fine-grained heads: the caller picks num_classes
        first_conv="backbone.body.model.conv1",
        classifier="fc",
        notes=(f"Backbone weights: timm {backbone} (ImageNet-1k); head trained from scratch.",),
        **kwargs,
    )


default_cfgs = generate_default_cfgs(
    {
        "cin_resnet50": _cfg("resnet50.tv_in1k"),
        "cin_resnet101": _cfg("resnet101.tv_in1k"),
        "pcanet_resnet50": _cfg("resnet50.tv_in1k"),
        "pcanet_resnet101": _cfg("resnet101.tv_in1k"),
    }
)


def _create(
    variant: str,
    model_cls: type[nn.Module],
    default_backbone: str,
    pretrained: bool = False,
    pretrained_cfg: Any = None,
    pretrained_cfg_overlay: dict[str, Any] | None = None,
    cache_dir: Any = None,
    **kwargs: Any,
) -> nn.Module:
    """Entrypoint body: timm.create_model's weight-source args go to the backbone."""
    kwargs.setdefault("backbone", default_backbone)
    if isinstance(kwargs["backbone"], str):
        if pretrained_cfg_overlay:
            kwargs["pretrained_cfg_overlay"] = pretrained_cfg_overlay
        if cache_dir is not None:
            kwargs["cache_dir"] = cache_dir
    model = model_cls(pretrained=pretrained, **kwargs)
    cfg = timm.models.resolve_pretrained_cfg(variant, pretrained_cfg=pretrained_cfg).to_dict()
    # Input size (img_size) and normalisation (an overriding backbone's) follow the built model.
    cfg.update({k: model.pretrained_cfg[k] for k in ("input_size", "mean", "std")})
    model.pretrained_cfg = model.default_cfg = cfg
    return model


@register_model
def cin_resnet50(pretrained: bool = False, **kwargs: Any) -> CIN:
    """CIN (SCI + CCI) on ResNet-50, 448 px."""
    return _create("cin_resnet50", CIN, "resnet50.tv_in1k", pretrained, **kwargs)


@register_model
def cin_resnet101(pretrained: bool = False, **kwargs: Any) -> CIN:
    """CIN (SCI + CCI) on ResNet-101, 448 px."""
    return _create("cin_resnet101", CIN, "resnet101.tv_in1k", pretrained, **kwargs)


@register_model
def pcanet_resnet50(pretrained: bool = False, **kwargs: Any) -> PCANet:
    """PCA-Net (co-attention + attention erase + bilinear pooling) on ResNet-50, 448 px."""
    return _create("pcanet_resnet50", PCANet, "resnet50.tv_in1k", pretrained, **kwargs)


@register_model
def pcanet_resnet101(pretrained: bool = False, **kwargs: Any) -> PCANet:
    """PCA-Net (co-attention + attention erase + bilinear pooling) on ResNet-101, 448 px."""
    return _create("pcanet_resnet101", PCANet, "resnet101.tv_in1k", pretrained, **kwargs)


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
        pretrained: ImageNet backbone weights through timm.
        **kwargs: model options (see `CIN`, `PCANet`) and timm backbone arguments (img_size,
            drop_path_rate, pretrained_cfg_overlay, ...).

    Returns:
        The model, with a timm ``pretrained_cfg`` (448 px, crop_pct 448/512, the backbone's
        mean/std) for timm's data pipeline.
    """
    if arch in ARCHS:
        backbone = "resnet50" if backbone is None else backbone
        return ARCHS[arch](backbone, num_classes=num_classes, pretrained=pretrained, **kwargs)
    if arch in timm.list_models(("cin_*", "pcanet_*")):
        if backbone is not None:
            kwargs["backbone"] = backbone
        return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, **kwargs)
    raise ValueError(
        f"arch must be one of {sorted(ARCHS)} or a registered model "
        f"{timm.list_models(('cin_*', 'pcanet_*'))}, got {arch!r}"
    )
