"""Pieces shared by the assembled models: timm interface, paired-batch checks, FGVC data config,
timm registration."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import resolve_pretrained_cfg
from timm.models._builder import pretrained_cfg_for_features
from timm.models._features import FeatureGetterNet, feature_take_indices
from torch import nn

from .._shapes import check_image_batch
from ..backbone import TimmBackbone
from ._weights import holds_whole_model, load_whole_model, source_state_dict

_logger = logging.getLogger("fgattn.models")

# The FGVC protocol of both papers: Resize(512) + crop 448.
FGVC_IMG_SIZE = 448
FGVC_CROP_PCT = 448 / 512


Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class NoTargetWarning(UserWarning):
    """A CIN or PCA-Net in training mode was called without a target: it trains as a plain
    classifier, and the paper's losses do not train."""


@torch.compiler.assume_constant_result
def _warn_no_target(message: str) -> bool:
    """Warn; runs eagerly while dynamo traces, so a compiled model warns too (once per trace)."""
    warnings.warn(message, NoTargetWarning, stacklevel=5)
    return True


class TimmModelMixin:
    """timm's model interface where CIN and PCANet agree: a `backbone`, a classifier `fc`, and a
    forward that trains on paired batches and otherwise runs the single-image path.

    A subclass names what only its paired training trains (``paired_parts``) and the sampler that
    draws its batches (``paired_sampler``), for the warning a target-less training forward gives.
    """

    paired_parts = "the paired losses"
    paired_sampler = "PairBatchSampler"
    _warned_no_target = False

    def forward(
        self,
        x: torch.Tensor,
        target: torch.Tensor | None = None,
        criterion: Criterion | None = None,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Training with a target: dict of logits and losses (`forward_train`); else logits.

        ``criterion(logits, target)`` replaces the model's own cross-entropy (and its
        ``label_smoothing``) in training, e.g. timm's train.py loss through
        `PairedClassificationTask`. In training mode without a target the model warns once
        (`NoTargetWarning`) and returns the logits of the single-image path: only that path trains.
        """
        if self.training and target is not None:
            return self.forward_train(x, target, criterion=criterion)
        if self.training and not self._warned_no_target:
            self._warned_no_target = _warn_no_target(self._no_target_message())
        return self.forward_head(self.forward_features(x))

    def _no_target_message(self) -> str:
        name = type(self).__name__
        return (
            f"{name} is in training mode but was called without a target, so it trains as a plain "
            f"classifier: {self.paired_parts} do not train. To train the paper's way call "
            f"model(x, target) on a paired batch (image i pairs with image i + N; "
            f"fgattn.data.{self.paired_sampler} draws such batches, fgattn-train does it all), or "
            f"in timm's train loop use fgattn.models.PairedClassificationTask (python -m "
            f"fgattn.timm_train path/to/train.py ...). Warned once per model; "
            f"warnings.filterwarnings('ignore', category=fgattn.models.NoTargetWarning) "
            f"silences it"
        )

    def _cross_entropy(self, criterion: Criterion | None) -> Criterion:
        """The classification loss of `forward_train`: ``criterion`` or CE with label smoothing."""
        if criterion is not None:
            return criterion
        return lambda logits, target: F.cross_entropy(
            logits, target, label_smoothing=self.label_smoothing
        )

    # timm's feature interface (features_only=True, forward_intermediates)

    def _init_feature_info(self, last_module: str | None = None) -> None:
        """``feature_info``: the backbone's stages (timm's list of dicts, module names from the
        model), the last one renamed to ``last_module`` where the model adds to it (CIN's SCI)."""
        if isinstance(self.backbone, TimmBackbone):
            info = [
                dict(d, module=f"backbone.body.model.{d['module']}")
                for d in self.backbone.body.feature_info.info
            ]
        else:
            channels, reduction = self.backbone.out_channels, getattr(self.backbone, "reduction", 1)
            info = [dict(num_chs=channels, reduction=reduction, module="backbone")]
        if last_module is not None:
            info[-1]["module"] = last_module
        self.feature_info = info

    def _last_stage(self, x: torch.Tensor) -> torch.Tensor:
        """What the model adds to the backbone's last map in `forward_features` (none here)."""
        return x

    def _backbone_maps(
        self, x: torch.Tensor, indices: list[int], stop_early: bool
    ) -> list[torch.Tensor]:
        if not isinstance(self.backbone, TimmBackbone):
            return [self.backbone(x)]  # one stage: the map itself
        return self.backbone.model.forward_intermediates(
            x,
            indices=indices,
            norm=self.backbone.body.norm,
            stop_early=stop_early,
            output_fmt="NCHW",
            intermediates_only=True,
        )

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's ``forward_intermediates``: the maps of the stages in ``feature_info``.

        The stages are the backbone's; the last one is what `forward_features` returns (for CIN
        after SCI), so ``forward_intermediates(x)[0]`` equals ``forward_features(x)``.

        Args:
            indices: stages to return (None: all; an int n: the last n; negative from the end).
            norm: accepted for timm's interface; the backbone's own ``norm`` (TimmBackbone) applies.
            stop_early: stop the backbone after the last stage asked for (intermediates only).
            output_fmt: "NCHW" only.
            intermediates_only: return the list of maps only.

        Shapes:
            x (B, 3, H, W) -> (final (B, C, h, w), [(B, C_i, H / r_i, W / r_i) for each index]).
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        last = len(self.feature_info) - 1
        take, _ = feature_take_indices(last + 1, indices)
        wanted = take if intermediates_only else sorted({*take, last})
        maps = dict(zip(wanted, self._backbone_maps(x, wanted, stop_early), strict=True))
        if last in maps:
            maps[last] = self._last_stage(maps[last])
        intermediates = [maps[i] for i in take]
        return intermediates if intermediates_only else (maps[last], intermediates)

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """timm's ``prune_intermediate_layers``: drop the backbone stages after the last of
        ``indices`` and (``prune_head``) the classifier; returns the stage indices, absolute."""
        take, _ = feature_take_indices(len(self.feature_info), indices)
        if isinstance(self.backbone, TimmBackbone):
            norm = self.backbone.body.norm
            self.backbone.model.prune_intermediate_layers(take, prune_norm=not norm)
        if prune_head:
            self.reset_classifier(0)
        return take

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if hasattr(self.backbone, "set_grad_checkpointing"):
            self.backbone.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc


def warn_unpooled(model: str) -> None:
    """Once per process: ``global_pool=''`` with no classifier now gives the unpooled map."""
    warnings.warn(
        f"{model} with num_classes=0 and global_pool='' returns the unpooled map (B, C, h, w) from "
        f"forward and forward_head, as timm models do; fgattn 0.1.0 returned "
        f"{'it flattened, (B, C·h·w)' if model == 'CIN' else 'the bilinear vector'} "
        f"(use .flatten(1) on the map, or global_pool='avg' / 'bilinear' for a vector)",
        FutureWarning,
        stacklevel=3,
    )


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

    ``pretrained=True`` loads the weights of the model's pretrained_cfg when it names a source
    (``pretrained_cfg_overlay=dict(file=...)`` or ``dict(state_dict=...)``, a ``local-dir:`` or
    ``hf-hub:`` model name, a ``pretrained_cfg`` with a url): the whole model when the file holds
    the whole model (keys under ``backbone.``, as the model's own state_dict), else the backbone
    through timm's loading of that backbone; it logs which (logger ``fgattn.models``). Without a
    source it loads the backbone's ImageNet weights through timm. The model's pretrained_cfg is
    the variant's (or the ``pretrained_cfg`` given), with the input size (``img_size``) and
    normalisation (of an overriding backbone) of the model as built. ``features_only=True``
    returns timm's feature extractor (`features_only`).
    """
    kwargs.setdefault("backbone", default_backbone)
    feature_args = pop_feature_args(kwargs)
    source_args = kwargs.pop("pretrained_model_args", None)
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg, pretrained_cfg_overlay).to_dict()
    state_dict = where = None
    if pretrained:
        state_dict, where = source_state_dict(cfg, cache_dir)
    whole = state_dict is not None and holds_whole_model(state_dict)
    if isinstance(kwargs["backbone"], str) and not whole:
        if state_dict is not None:
            pretrained_cfg_overlay = dict(state_dict=state_dict)
        if pretrained_cfg_overlay:
            kwargs["pretrained_cfg_overlay"] = pretrained_cfg_overlay
        if cache_dir is not None:
            kwargs["cache_dir"] = cache_dir
    model = model_cls(pretrained=pretrained and not whole, **kwargs)
    if whole:
        load_whole_model(model, state_dict, variant, where)
    elif state_dict is not None:
        _logger.info(f"{variant}: loaded the backbone's weights from {where}; the heads are new")
    as_built = {k: model.pretrained_cfg[k] for k in ("input_size", "mean", "std")}
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg, pretrained_cfg_overlay=as_built)
    model.pretrained_cfg = model.default_cfg = cfg.to_dict()
    model.pretrained_model_args = dict(source_args or {})
    return model if feature_args is None else features_only(model, feature_args)


def features_only(model: nn.Module, kwargs: dict[str, Any]) -> nn.Module:
    """timm's ``features_only=True`` for a CIN or PCANet: pop the feature arguments from
    ``kwargs`` beforehand with `pop_feature_args`, then wrap the built model in timm's
    ``FeatureGetterNet`` (its stages through `forward_intermediates`), as timm's own
    ``build_model_with_cfg`` does with ``feature_cls="getter"``.

    Args:
        kwargs: ``out_indices`` (default: the last min(5, stages) stages), ``output_fmt``,
            ``feature_cls`` ("getter" only).
    """
    feature_cls = kwargs.get("feature_cls", "getter")
    if feature_cls != "getter":
        raise ValueError(
            f"feature_cls must be 'getter' for {type(model).__name__} (it gives its stages "
            f"through forward_intermediates), got {feature_cls!r}"
        )
    stages = len(model.feature_info)
    wrapped = FeatureGetterNet(
        model,
        out_indices=kwargs.get("out_indices", min(5, stages)),
        output_fmt=kwargs.get("output_fmt", "NCHW"),
    )
    wrapped.pretrained_cfg = wrapped.default_cfg = pretrained_cfg_for_features(model.pretrained_cfg)
    return wrapped


FEATURE_ARGS = ("out_indices", "feature_cls", "output_fmt")


def pop_feature_args(kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The features_only arguments in ``kwargs`` (removed from it), or None without
    ``features_only=True``."""
    if not kwargs.pop("features_only", False):
        return None
    return {k: kwargs.pop(k) for k in FEATURE_ARGS if k in kwargs}
