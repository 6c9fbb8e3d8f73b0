"""CIN and PCA-Net trained the paper's way inside timm's train loop (timm's ``TrainingTask`` API).

timm's train.py builds ``timm.task.ClassificationTask(model, criterion)``, whose forward calls
``model(input)`` without the labels, so a CIN or PCA-Net there trains as a plain classifier (and
says so, `NoTargetWarning`). `PairedClassificationTask` is the task that trains them as the
papers do: it orders each batch into pairs from its labels and calls
``model(input, target, criterion=...)``.
``python -m fgattn.timm_train path/to/train.py ...`` runs timm's train.py with it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from timm.task import ClassificationTask
from timm.utils import unwrap_model
from torch import nn

from .. import _args

__all__ = ["PairedClassificationTask", "PairingWarning", "pair_by_label", "task_for"]


class PairingWarning(UserWarning):
    """Too few same-class pairs in a batch for the paired losses to learn from."""


def pair_by_label(target: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Order a batch so that image i pairs with image i + N, same-class pairs first.

    The images of each class are paired two by two (in batch order); the images left over, at
    most one per class, are paired across classes, as `fgattn.data.PKBatchSampler` does.

    Args:
        target: (2N,) integer class labels.

    Returns:
        (order, same): ``order`` (2N,) indexes the batch (``x[order]``, ``target[order]``) into
        [A_1..A_N, B_1..B_N]; pairs 0..same-1 share a class, the others do not.
    """
    if target.dim() != 1 or target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(
            f"target must hold one integer class label per image, shape (B,), got dtype "
            f"{target.dtype} and shape {tuple(target.shape)}; soft or mixed targets (mixup, "
            f"cutmix) cannot form same-class pairs: train without --mixup/--cutmix"
        )
    if target.numel() % 2:
        raise ValueError(
            f"the paired training needs an even batch (2N images in N pairs), got {target.numel()}"
            f" images: use an even --batch-size"
        )
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(target.tolist()):
        by_class.setdefault(label, []).append(i)
    firsts: list[int] = []
    seconds: list[int] = []
    left: list[int] = []
    for images in by_class.values():
        firsts += images[0 : len(images) - 1 : 2]
        seconds += images[1::2]
        if len(images) % 2:
            left.append(images[-1])
    same = len(firsts)
    firsts += left[0::2]
    seconds += left[1::2]
    return torch.tensor(firsts + seconds, device=target.device), same


class PairedClassificationTask(ClassificationTask):
    """timm training task for CIN and PCA-Net: pairs from the batch's labels, the paper's losses.

    A drop-in for ``timm.task.ClassificationTask`` (same constructor): each batch is reordered by
    `pair_by_label` into [A_1..A_N, B_1..B_N] with as many same-class pairs as its labels allow,
    and the model is called as ``model(input, target, criterion=criterion)``, so it trains CCI and
    the contrastive loss (CIN) or co-attention, erase and the center loss (PCA-Net), with the
    task's criterion (timm's train.py: cross-entropy, with --smoothing if given) as the
    classification loss. When fewer than ``min_same_class`` of a batch's pairs share a class the
    task warns once (`PairingWarning`) with the count: timm's loader draws images at random, so
    with many classes few pairs share one; fgattn's samplers guarantee them.

    Args:
        model: a CIN or PCANet (anything whose forward takes ``(x, target, criterion=...)`` and
            returns a dict with "loss" and "logits" in training).
        criterion, criterion_kwargs, device, dtype, verbose: as ``ClassificationTask``.
        min_same_class: fraction of same-class pairs below which the task warns (default 0.5;
            PKBatchSampler's 4 × 5 batches have 0.8, PairBatchSampler's 1.0).

    Shapes:
        forward(input, target): input (2N, C, H, W), target (2N,) integer labels -> dict with
        "loss", "output" (2N, K) logits in the batch's own order, the model's scalar losses,
        and "same_class_pairs" (the count, a 0-d tensor).
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: nn.Module | Callable | None = None,
        criterion_kwargs: dict[str, Any] | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        verbose: bool = True,
        min_same_class: float = 0.5,
    ) -> None:
        if not hasattr(unwrap_model(model), "forward_train"):
            raise TypeError(
                f"model must be a CIN or PCANet (a model with forward_train), got "
                f"{type(unwrap_model(model)).__name__}; use timm.task.ClassificationTask for it"
            )
        super().__init__(model, criterion, criterion_kwargs, device, dtype, verbose)
        self.min_same_class = _args.real(min_same_class, "min_same_class", low=0.0, high=1.0)
        self._warned_pairs = False

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        order, same = pair_by_label(target)
        pairs = target.numel() // 2
        if same < self.min_same_class * pairs and not self._warned_pairs:
            self._warned_pairs = True
            warnings.warn(
                f"only {same} of the {pairs} pairs in this batch of {target.numel()} share a "
                f"class; the paired losses learn from same-class pairs. timm's loader draws "
                f"images at random: draw batches with fgattn.data.PairBatchSampler (PCA-Net) or "
                f"PKBatchSampler (CIN), as fgattn-train does, or use fewer classes per batch. "
                f"Warned once",
                PairingWarning,
                stacklevel=2,
            )
        out = self.trainable_module(input[order], target[order], criterion=self.criterion)
        result = {k: v for k, v in out.items() if k.startswith("loss") and v.dim() == 0}
        result["output"] = out["logits"][torch.argsort(order)]
        result["same_class_pairs"] = torch.tensor(same, device=out["loss"].device)
        return result


def task_for(model: nn.Module, *args: Any, **kwargs: Any) -> ClassificationTask:
    """`PairedClassificationTask` for a CIN or PCANet, timm's ``ClassificationTask`` otherwise
    (the same arguments as ``ClassificationTask``)."""
    if hasattr(unwrap_model(model), "forward_train"):
        return PairedClassificationTask(model, *args, **kwargs)
    return ClassificationTask(model, *args, **kwargs)
