"""Any timm model as a feature extractor returning its last spatial feature map."""

from __future__ import annotations

from typing import Any

import timm
import torch
from timm.models import get_pretrained_cfg
from timm.models._features import FeatureGetterNet
from torch import nn

__all__ = ["TimmBackbone", "resolve_backbone"]


def _wants_dynamic_size(name: str, timm_kwargs: dict[str, Any]) -> bool:
    """Whether to ask timm for ``dynamic_img_size=True``: the model has a fixed input size (timm's
    own pretrained_cfg says so) and the caller pinned neither the size nor the flag."""
    if "img_size" in timm_kwargs or "strict_img_size" in timm_kwargs:
        return False
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:  # invalid tag: let timm.create_model report it
        return False
    return bool(getattr(cfg, "fixed_input_size", False))


class TimmBackbone(nn.Module):
    """A timm model cut before its pooling and head: images -> last feature map (B, C, H, W).

    Built with timm's own feature extraction (``features_only=True, out_indices=(-1,),
    feature_cls="getter"``, i.e. the model's ``forward_intermediates``), which already returns NCHW
    for NHWC models (Swin) and, for token models (ViT, DeiT, EVA, DINOv2), drops the prefix tokens
    (class, distillation, registers) and puts the patch tokens back on their grid.

    Token models and Swin have a fixed input size in timm; unless the caller passes ``img_size`` or
    ``dynamic_img_size``, they are created with ``dynamic_img_size=True`` so that any input size
    works (448 px through a 224 px ViT: timm interpolates the position embedding, or builds
    Swin's masks, per forward). Fixed-size families without that flag (BEiT, CaiT, XCiT, ...) take
    ``img_size=...`` instead, for which timm resamples pretrained position embeddings on load.

    Args:
        name: timm model name, optionally with a pretrained tag ("resnet50.a1_in1k").
        pretrained: load timm's pretrained weights (any timm weight source: hub, URL, or a local
            file with ``pretrained_cfg_overlay=dict(file=path)``).
        norm: apply the model's final norm to the map (ViT/Swin final LayerNorm), so the map is
            what the model's own head would see. No-op for most CNNs.
        dynamic_img_size: True/False forwarded to timm; None decides as described above.
        **timm_kwargs: forwarded to ``timm.create_model`` (drop_path_rate, img_size, in_chans,
            pretrained_cfg_overlay, ...).

    Attributes:
        out_channels: C of the output map.
        reduction: total stride of the output map relative to the input.
        model: the underlying timm model (after timm pruned its head).

    Shapes:
        x (B, in_chans, H, W) -> (B, out_channels, ~H / reduction, ~W / reduction).
    """

    def __init__(
        self,
        name: str,
        pretrained: bool = False,
        norm: bool = True,
        dynamic_img_size: bool | None = None,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        for key in ("features_only", "out_indices", "feature_cls", "feature_cfg"):
            if key in timm_kwargs:
                raise ValueError(
                    f"TimmBackbone sets {key!r} itself (it returns the last feature map); "
                    f"got {key}={timm_kwargs[key]!r}"
                )
        self.name = name
        kwargs = dict(pretrained=pretrained, **timm_kwargs)
        if dynamic_img_size is not None:
            kwargs["dynamic_img_size"] = dynamic_img_size
        elif _wants_dynamic_size(name, timm_kwargs):
            kwargs["dynamic_img_size"] = True
        try:
            model = timm.create_model(name, **kwargs)
        except TypeError as err:
            # This fixed-size family has no dynamic-size support: it runs at its img_size only.
            if dynamic_img_size is not None or "dynamic_img_size" not in str(err):
                raise
            kwargs.pop("dynamic_img_size")
            model = timm.create_model(name, **kwargs)
        if not hasattr(model, "forward_intermediates"):
            raise ValueError(
                f"timm model {name!r} cannot be used as a backbone: it has no "
                f"forward_intermediates, so timm cannot return its last feature map"
            )
        # What timm.create_model(features_only=True, out_indices=(-1,), feature_cls="getter")
        # builds, wrapped here so that `norm` reaches FeatureGetterNet: some families (ViT) fix
        # their own feature_cfg and reject one passed through create_model.
        try:
            self.body = FeatureGetterNet(model, out_indices=(-1,), norm=norm)
        except (RuntimeError, AssertionError, NotImplementedError) as err:
            raise ValueError(
                f"timm model {name!r} cannot be used as a backbone: timm cannot cut it at its "
                f"last feature map ({err})"
            ) from err
        info = self.body.feature_info
        self.out_channels: int = info.channels()[-1]
        self.reduction: int = info.reduction()[-1]
        # timm's data config of the backbone (mean, std, input size of its pretrained weights).
        self.pretrained_cfg: dict[str, Any] = dict(getattr(self.model, "pretrained_cfg", {}))

    @property
    def model(self) -> nn.Module:
        """The wrapped timm model, head pruned."""
        return self.body.model

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing inside the timm model (its blocks or stages)."""
        if not hasattr(self.model, "set_grad_checkpointing"):
            raise ValueError(f"timm model {self.name!r} does not support gradient checkpointing")
        self.model.set_grad_checkpointing(enable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.body(x)
        out = features[-1] if isinstance(features, (list, tuple)) else features
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"timm model {self.name!r} has no single spatial feature map: its last feature is "
                f"{got}, wanted a (B, C, H, W) map"
            )
        return out

    def extra_repr(self) -> str:
        return f"name={self.name!r}, out_channels={self.out_channels}, reduction={self.reduction}"


def resolve_backbone(
    backbone: str | nn.Module, pretrained: bool = False, **timm_kwargs: Any
) -> nn.Module:
    """A module (B, 3, H, W) -> (B, C, h, w) with an ``out_channels`` attribute.

    A string is a timm model name (built as a `TimmBackbone` with ``pretrained`` and
    ``timm_kwargs``); a module is used as is and must say its channels in ``out_channels``.
    """
    if isinstance(backbone, str):
        return TimmBackbone(backbone, pretrained=pretrained, **timm_kwargs)
    if not isinstance(backbone, nn.Module):
        raise ValueError(
            f"backbone must be a timm model name or an nn.Module, got {type(backbone).__name__}"
        )
    if pretrained or timm_kwargs:
        given = ["pretrained"] * bool(pretrained) + sorted(timm_kwargs)
        raise ValueError(
            f"{', '.join(given)} only apply when backbone is a timm model name; pass them to "
            f"TimmBackbone(...) instead of a ready module"
        )
    channels = getattr(backbone, "out_channels", None)
    if not isinstance(channels, int):
        raise ValueError(
            f"backbone module {type(backbone).__name__} must have an integer `out_channels` "
            f"attribute (the C of its (B, C, H, W) output); wrap timm models in TimmBackbone"
        )
    return backbone
