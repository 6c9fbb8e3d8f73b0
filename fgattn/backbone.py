"""Any timm model as a feature extractor returning its last spatial feature map."""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from timm.models import get_pretrained_cfg
from timm.models._features import FeatureGetterNet
from torch import nn

from . import _args
from ._shapes import check_image_batch, check_module_input

__all__ = ["TimmBackbone", "resolve_backbone"]


# timm's weight files on the Hugging Face Hub, in the order it tries them.
HUB_FILES = ("model.safetensors", "pytorch_model.bin")
PROBE_TIMEOUT_S = 5.0


def pretrained_fix(name: str) -> str:
    """How to get a backbone's ImageNet weights without a download, for error messages."""
    return (
        f"download them where there is internet (timm.create_model({name!r}, pretrained=True) "
        f"caches them in ~/.cache/huggingface) and copy the cache, or pass the weights file: "
        f"pretrained_cfg_overlay=dict(file='/path/to/{name.split('.')[0]}.safetensors') "
        f"(fgattn-train: --pretrained-file PATH); or train from scratch with pretrained=False "
        f"(--no-pretrained)"
    )


def _weights_download(name: str, overlay: dict[str, Any]) -> str | None:
    """The URL timm would download the pretrained weights of ``name`` from, or None when no
    download is needed (a local file, weights in the cache, or a source fgattn does not know)."""
    if overlay.get("file") or overlay.get("state_dict") is not None or ":" in name:
        return None
    cfg = get_pretrained_cfg(name)
    if cfg is None or cfg.file:
        return None
    if cfg.hf_hub_id and importlib.util.find_spec("huggingface_hub") is not None:
        from huggingface_hub import constants, try_to_load_from_cache

        names = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HUB_FILES
        if any(isinstance(try_to_load_from_cache(cfg.hf_hub_id, f), str) for f in names):
            return None
        return f"{constants.ENDPOINT}/{cfg.hf_hub_id}"
    if cfg.url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name
        return None if cached.is_file() else cfg.url
    return None


def _check_weights_reachable(name: str, timm_kwargs: dict[str, Any]) -> None:
    """Fail in seconds, with the fix, where timm would retry an unreachable download for a
    minute or more: a local file that is missing, Hugging Face offline mode, or no connection to
    the weights' host (not probed behind a proxy)."""
    overlay = dict(timm_kwargs.get("pretrained_cfg_overlay") or {})
    if overlay.get("file") and not Path(overlay["file"]).is_file():
        raise FileNotFoundError(
            f"pretrained_cfg_overlay file not found: {overlay['file']} (the backbone's "
            f"ImageNet weights for {name!r})"
        )
    url = _weights_download(name, overlay)
    if url is None:
        return
    reason = None
    if url.startswith(_hub_endpoint()) and _hub_offline():
        reason = "HF_HUB_OFFLINE is set and they are not in the local cache"
    elif not any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY")):
        host = urlparse(url).hostname or ""
        try:
            socket.create_connection((host, 443), timeout=PROBE_TIMEOUT_S).close()
        except OSError as err:
            reason = f"{host} cannot be reached ({err})"
    if reason is not None:
        raise ConnectionError(
            f"cannot download the pretrained weights of backbone {name!r} from {url}: {reason}. "
            f"To use them offline, {pretrained_fix(name)}"
        )


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


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
        pretrained: load timm's pretrained weights (default False: random init). Any timm
            weight source: hub, URL, or a local file with ``pretrained_cfg_overlay=dict(file=
            path)``. A download that cannot happen (offline, host unreachable) fails within
            seconds with that fix in the message.
        norm: apply the model's final norm to the map (ViT/Swin final LayerNorm), so the map is
            what the model's own head would see. No-op for most CNNs.
        dynamic_img_size: True/False forwarded to timm; None decides as described above.
        **timm_kwargs: forwarded to ``timm.create_model`` (drop_path_rate, img_size, in_chans,
            pretrained_cfg_overlay, ...).

    Attributes:
        in_chans: channels of the input images (timm's ``in_chans``, 3 by default).
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
        if not isinstance(name, str):
            raise TypeError(
                f"name must be a str, a timm model name such as 'resnet50', got "
                f"{type(name).__name__} {name!r}"
            )
        pretrained = _args.boolean(pretrained, "pretrained")
        norm = _args.boolean(norm, "norm")
        dynamic_img_size = _args.optional(_args.boolean, dynamic_img_size, "dynamic_img_size")
        for key in ("features_only", "out_indices", "feature_cls", "feature_cfg"):
            if key in timm_kwargs:
                raise ValueError(
                    f"TimmBackbone sets {key!r} itself (it returns the last feature map); "
                    f"got {key}={timm_kwargs[key]!r}"
                )
        self.name = name
        if ":" not in name and not timm.is_model(name):
            raise ValueError(
                f"backbone {name!r} is not a timm model name; timm.list_models("
                f"'{name.split('.')[0][:6]}*') lists similar ones"
            )
        if pretrained:
            _check_weights_reachable(name, timm_kwargs)
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
                raise TypeError(
                    f"backbone {name!r}: {err}; keyword arguments a model does not take itself "
                    f"go to timm.create_model({name!r}, ...), so each must be an option of the "
                    f"model or of that timm model"
                ) from err
            kwargs.pop("dynamic_img_size")
            model = timm.create_model(name, **kwargs)
        except OSError as err:  # the download or the weights file failed
            if not pretrained:
                raise
            raise OSError(
                f"cannot load the pretrained weights of backbone {name!r}: {err}. "
                f"{pretrained_fix(name)[0].upper()}{pretrained_fix(name)[1:]}"
            ) from err
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
        self.in_chans: int = timm_kwargs.get("in_chans", 3)
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
        check_image_batch(x, "x", self.in_chans)
        check_module_input(x, "x", self)
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
