"""Contrastive loss (Hadsell, Chopra and LeCun, CVPR 2006), as in CIN eq. 7–8."""

from __future__ import annotations

import torch
from torch import nn

from .. import _args
from .._shapes import check_same_device, check_tensor


class ContrastiveLoss(nn.Module):
    """ℓ = d² for a positive pair, max(0, β − d)² for a negative one, d = ‖h_A − h_B‖₂.

    CIN eq. 8 (β = 0.5 in the paper's experiments); eq. 7 averages ℓ over the N pairs.

    Args:
        margin: β, in (0, 1e4].

    Shapes:
        forward(emb_a, emb_b, same): embeddings (N, D) each; same (N,) bool or 0/1, 1 where the
        pair shares a class -> scalar.
    """

    def __init__(self, margin: float = 0.5) -> None:
        super().__init__()
        self.margin = _args.real(margin, "margin", low=0.0, high=_args.MAX_SCALE, low_open=True)

    def forward(self, emb_a: torch.Tensor, emb_b: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
        for x, name in ((emb_a, "emb_a"), (emb_b, "emb_b"), (same, "same")):
            check_tensor(x, name)
        check_same_device(emb_a, "emb_a", emb_b, "emb_b")
        check_same_device(emb_a, "emb_a", same, "same")
        if not (emb_a.is_floating_point() and emb_b.is_floating_point()):
            raise ValueError(
                f"emb_a and emb_b must be floating-point embeddings, got dtypes {emb_a.dtype} and "
                f"{emb_b.dtype}"
            )
        if emb_a.dim() != 2 or emb_a.shape != emb_b.shape:
            raise ValueError(
                f"emb_a and emb_b must both have shape (N, D): got {tuple(emb_a.shape)} and "
                f"{tuple(emb_b.shape)}"
            )
        if same.shape != (emb_a.shape[0],):
            raise ValueError(
                f"same must have shape ({emb_a.shape[0]},), one label per pair, got shape "
                f"{tuple(same.shape)}"
            )
        binary = same.dtype == torch.bool or torch.compiler.is_compiling()  # no branch in graphs
        if not binary and not ((same == 0) | (same == 1)).all():
            # class ids or soft labels would silently count as positive pairs
            raise ValueError(
                f"same must be bool or 0/1 (1 where the pair shares a class), got values "
                f"{sorted(set(same.flatten().tolist()))[:8]}"
            )
        sq = (emb_a.float() - emb_b.float()).pow(2).sum(dim=1)
        dist = sq.clamp_min(1e-12).sqrt()  # clamp: finite gradient for identical negatives
        positive = same.to(torch.bool)
        loss = torch.where(positive, sq, (self.margin - dist).clamp_min(0).pow(2))
        return loss.mean()

    def extra_repr(self) -> str:
        return f"margin={self.margin}"
