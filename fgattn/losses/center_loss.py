"""Center loss (Wen et al., ECCV 2016), the L_cen term of PCA-Net eq. 6."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import _args
from .._shapes import check_same_device, check_tensor

UPDATES = ("moving_average", "learned")
FORMULAS = ("wen", "official")


class CenterLoss(nn.Module):
    """L_C = ½ ‖x_i − c_{y_i}‖², averaged over the batch (``reduction="mean"``) or summed.

    Centres are either a buffer updated by moving average during training (Wen et al. eq. 4:
    c_j ← c_j − α Σ_{i: y_i = j} (c_j − x_i) / (1 + n_j), so every sample of class j in the batch
    counts) or a parameter learned by the optimiser (``update="learned"``).
    Under torch.distributed the per-class sums are all-reduced before the update, so the centres
    stay identical on every rank. A batch with a NaN or infinite feature gives a non-finite loss
    and leaves the centres unchanged (on every rank), with a warning.

    ``formula="official"`` is PCA-Net's official code (its ``Center_Loss`` and update) instead:
    L_C = ‖x_i − ĉ_{y_i}‖² with ĉ = c / ‖c‖ (the centre L2-normalised, no ½), and the update
    c_{y_i} ← c_{y_i} + α (x_i − ĉ_{y_i}), in which a class seen several times in the batch takes
    the step of its last sample only (the official ``center[label] += diff`` writes each index
    once, the last write winning on CPU). Under torch.distributed each class takes the mean of
    the ranks' steps.

    Args:
        num_classes: K.
        feat_dim: D, the feature size.
        alpha: moving-average rate α (Wen et al. use 0.5; PCA-Net's official code 0.05, its
            1 − 0.95).
        update: "moving_average" (buffer) or "learned" (parameter).
        reduction: "mean" or "sum" over the batch.
        formula: "wen" (Wen et al. 2016, the paper's reference [25]) or "official" (PCA-Net's
            official code), see above.

    Shapes:
        forward(features, labels): features (B, D), labels (B,) integers in [0, K) -> scalar.
    """

    def __init__(
        self,
        num_classes: int,
        feat_dim: int,
        alpha: float = 0.5,
        update: str = "moving_average",
        reduction: str = "mean",
        formula: str = "wen",
    ) -> None:
        super().__init__()
        self.formula = _args.choice(formula, "formula", FORMULAS)
        self.num_classes = _args.integer(num_classes, "num_classes", minimum=1)
        self.feat_dim = _args.integer(feat_dim, "feat_dim", minimum=1)
        self.alpha = _args.real(alpha, "alpha", low=0.0, high=1.0)
        self.update = _args.choice(update, "update", UPDATES)
        self.reduction = _args.choice(reduction, "reduction", ("mean", "sum"))
        centers = torch.zeros(num_classes, feat_dim)
        if update == "learned":
            self.centers = nn.Parameter(centers)
        else:
            self.register_buffer("centers", centers)

    def _check(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        check_tensor(features, "features")
        check_tensor(labels, "labels")
        check_same_device(self.centers, "CenterLoss.centers", features, "features")
        check_same_device(features, "features", labels, "labels")
        if features.dim() != 2 or features.shape[1] != self.feat_dim:
            raise ValueError(
                f"features must have shape (B, {self.feat_dim}), got shape {tuple(features.shape)}"
            )
        if not features.dtype.is_floating_point:
            raise ValueError(f"features must be floating point, got dtype {features.dtype}")
        if labels.shape != (features.shape[0],):
            raise ValueError(
                f"labels must have shape ({features.shape[0]},), got shape {tuple(labels.shape)}"
            )
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
        if torch.compiler.is_compiling():  # a data-dependent branch would break the graph
            return
        outside = (labels < 0) | (labels >= self.num_classes)
        if outside.any():  # -1 would silently index the last centre
            raise ValueError(
                f"labels must be class indices in [0, {self.num_classes}), got "
                f"{sorted(set(labels[outside].tolist()))[:8]}"
            )

    @torch.no_grad()
    def _update_centers(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        if self.formula == "official":
            sums, counts = self._official_steps(features, labels)
        else:
            sums, counts = self._wen_sums(features, labels)
        if dist.is_available() and dist.is_initialized():
            # Each rank's steps use the same (identical) centres, so the sums add up exactly; a
            # non-finite feature on any rank makes the summed update non-finite on all of them.
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        finite = torch.isfinite(sums).all()
        if not torch.compiler.is_compiling() and not finite:
            warnings.warn(
                "CenterLoss: a batch had NaN or infinite features; the centres were left "
                "unchanged (the loss of that batch is not finite)",
                stacklevel=3,
            )
        if self.formula == "official":
            step = sums / counts.clamp_min(1).unsqueeze(1)  # one step per class (and rank)
        else:
            step = -self.alpha * sums / (1.0 + counts).unsqueeze(1)
        self.centers.add_(torch.where(finite, step, 0.0))  # no branch: compiles into one graph

    def _wen_sums(self, features, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """Σ_{i: y_i = j} (c_j − x_i) and n_j per class (Wen et al. eq. 4)."""
        centers = self.centers
        diff = centers[labels] - features  # c_{y_i} − x_i
        sums = torch.zeros_like(centers).index_add_(0, labels, diff)
        counts = torch.zeros(self.num_classes, device=centers.device, dtype=centers.dtype)
        counts.index_add_(0, labels, torch.ones_like(labels, dtype=centers.dtype))
        return sums, counts

    def _official_steps(self, features, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """α (x_i − ĉ_{y_i}) of each class's last sample in the batch, and 1 per class seen."""
        centers = self.centers
        order = torch.arange(labels.shape[0], device=labels.device)
        last = torch.full((self.num_classes,), -1, device=labels.device, dtype=order.dtype)
        last = last.scatter_reduce(0, labels, order, reduce="amax")
        seen = (last >= 0).to(centers.dtype)
        step = self.alpha * (features - F.normalize(centers[labels], dim=-1))
        return step[last.clamp_min(0)] * seen.unsqueeze(1), seen

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self._check(features, labels)
        dtype = torch.promote_types(
            torch.promote_types(features.dtype, torch.float32), self.centers.dtype
        )
        features = features.to(dtype)
        centers = self.centers[labels].to(dtype)
        if self.formula == "official":
            per_sample = (features - F.normalize(centers, dim=-1)).pow(2).sum(dim=1)
        else:
            per_sample = 0.5 * (features - centers).pow(2).sum(dim=1)
        loss = per_sample.mean() if self.reduction == "mean" else per_sample.sum()
        if self.update == "moving_average" and self.training:
            self._update_centers(features.detach().to(self.centers.dtype), labels)
        return loss

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, feat_dim={self.feat_dim}, alpha={self.alpha}, "
            f"update={self.update!r}, reduction={self.reduction!r}, formula={self.formula!r}"
        )
