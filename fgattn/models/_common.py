"""Pieces shared by the assembled models: timm interface, paired-batch checks, FGVC data config,
timm registration."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import resolve_pretrained_cfg
from torch import nn

from .._shapes import check_image_batch

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
        *,
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
