"""Progressive Co-Attention Network (PCA-Net, Zhang et al. ICME 2021) on any timm backbone."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from timm.layers import ConvNormAct
from timm.models import generate_default_cfgs, register_model
from torch import nn

from .. import _args
from ..backbone import resolve_backbone
from ..layers import AttentionErase, BilinearAttentionPooling, BilinearPooling, CoAttention
from ..layers.attention_erase import MODES, NORMALIZATIONS, check_threshold
from ..layers.pooling import ORDERS
from ..losses import CenterLoss
from ..losses.center_loss import FORMULAS
from ._common import (
    Criterion,
    TimmModelMixin,
    check_paired_batch,
    create_registered,
    fgvc_pretrained_cfg,
    registered_cfg,
    warn_unpooled,
)
from ._weights import accept_backbone_state_dicts

__all__ = ["OFFICIAL", "BilinearHead", "PCANet"]

POOLINGS = ("bilinear", "attention")
BRANCH_REDUCTIONS = ("sum", "mean")
PAIR_POLICIES = ("warn", "error", "ignore")
GLOBAL_POOLS = ("bilinear", "")
ERASE_SOURCES = ("co_attended", "raw")

# The official code's choice wherever the paper is silent or it differs from the paper:
# PCANet(**OFFICIAL) or fgattn.create_model("pcanet", ..., **OFFICIAL). What stays different
# (backbone cut, co-attention on the attention maps) is in the README's Deviations table.
OFFICIAL: dict[str, Any] = dict(
    pooling="attention",
    num_attention_maps=32,
    bilinear_dim=512,
    pooling_order="cm",
    shared_weights=False,
    co_attention_residual=True,
    erase_mode="sampled",
    erase_threshold=(0.2, 0.5),
    erase_normalize="upsampled_max",
    erase_source="raw",
    coattend_erased=True,
    branch_reduction="mean",
    feature_scale=100.0,
    center_formula="official",
    center_alpha=0.05,
    center_loss_weight=1.0,
)


class BilinearHead(nn.Module):
    """Feature map -> second-order vector: optional 1×1 reduction, then bilinear pooling.

    PCA-Net §4.1 puts bilinear pooling (B-CNN) on the backbone's last map. On a 2048-channel
    ResNet map that is a 2048² = 4.2M-d vector (an 840M-weight classifier for 200 classes), so a
    1×1 conv + BN + ReLU first reduces the map to ``dim`` channels (a deviation; ``dim=None`` keeps
    the paper's full C). ReLU keeps the reduced map non-negative like the post-ReLU map B-CNN pools.

    Args:
        in_channels: C of the backbone map.
        dim: channels after the reduction (None: no reduction).
        pooling: "bilinear" (paper: B = X Xᵀ / hw, signed sqrt, L2) or "attention" (the official
            code's bilinear attention pooling against ``num_attention_maps`` maps, produced here by
            a 1×1 conv + BN + ReLU on the backbone map, WS-DAN style).
        num_attention_maps: M for "attention" pooling (official: 32).
        order: flatten order of "attention" pooling, "mc" or "cm" (official), see
            `BilinearAttentionPooling`.

    Shapes:
        (B, C, h, w) -> (B, out_features), out_features = dim² ("bilinear") or M · dim
        ("attention"), an L2-normalised vector.
    """

    def __init__(
        self,
        in_channels: int,
        dim: int | None = 256,
        pooling: str = "bilinear",
        num_attention_maps: int = 32,
        order: str = "mc",
    ) -> None:
        super().__init__()
        self.pooling = _args.choice(pooling, "pooling", POOLINGS)
        in_channels = _args.integer(in_channels, "in_channels", minimum=1)
        dim = _args.optional(_args.integer, dim, "dim", minimum=1, maximum=_args.MAX_CHANNELS)
        num_attention_maps = _args.integer(num_attention_maps, "num_attention_maps", minimum=1)
        self.reduce = nn.Identity() if dim is None else ConvNormAct(in_channels, dim, 1)
        dim = in_channels if dim is None else dim
        if pooling == "bilinear":
            self.attention = None
            self.pool = BilinearPooling()
            self.out_features = dim * dim
        else:
            self.attention = ConvNormAct(in_channels, num_attention_maps, 1)
            self.pool = BilinearAttentionPooling(order=order)
            self.out_features = num_attention_maps * dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.reduce(x)
        if self.attention is None:
            return self.pool(f)
        return self.pool(f, self.attention(x))


class PCANet(TimmModelMixin, nn.Module):
    """PCA-Net: co-attention and attention erase on same-class pairs, bilinear classification.

    Inference (eval, or no target): logits = fc(pool(F_O)), F_O = backbone(x) — no co-attention,
    no erase, no cost over backbone + pooling (PCA-Net §1).

    Training with a target on x = [A_1..A_N, B_1..B_N], B_i a same-class partner of A_i:
    - F_O = backbone(x) for all 2N images;
    - F_W = CoAttention(F_O_A, F_O_B) (eq. 1–2, one shared W by default);
    - I_E = AttentionErase(x, F_W) (eq. 3–5), F_E = backbone(I_E) through the same backbone;
    - each branch b ∈ {O, W, E}: logits_b = fc(pool(F_b)), pool and fc shared across branches;
    - L = Σ_b CE(logits_b, target) + λ · L_center(pool(F_O), target) (eq. 6).

    Args:
        backbone: timm model name or a module (B, 3, H, W) -> (B, C, h, w) with ``out_channels``.
        num_classes: K.
        pretrained: timm ImageNet weights for a named backbone (default False: random init;
            the paper fine-tunes ImageNet weights, so pass True to reproduce it).
        pooling: "bilinear" (paper) or "attention" (official code), see `BilinearHead`.
        bilinear_dim: channels of the 1×1 reduction before pooling (None: no reduction, paper-exact
            but 4.2M-d for ResNet-50). Default 256 -> 65,536-d.
        num_attention_maps: M of "attention" pooling (official: 32).
        co_attention_scale: logit scale of eq. 1 (paper: −1), |scale| <= 1e4.
        shared_weights: one W for both images (paper eq. 2); False: the official code's
            softmax(−F1F2ᵀ)F1 and softmax(−F2F1ᵀ)F2.
        co_attention_residual: F_W + F (official code); off in the paper.
        erase_threshold: θ of eq. 4, a float or (lo, hi) drawn per image (official: (0.2, 0.5)).
            The paper gives no value; default 0.5 of the min-max normalised map.
        erase_mode: attention map of eq. 3 — "max" (eq. 3), "top_channel" (§3.2 text) or
            "sampled" (official code), see `AttentionErase`.
        erase_normalize: "minmax" (default), "max" (θ × max of the h×w map) or "upsampled_max"
            (the official code: θ × max of the map upsampled to the image), see `AttentionErase`.
        coattend_erased: also co-attend the erased pairs' features and classify them (the official
            code's sixth cross-entropy); off in the paper.
        center_loss_weight: λ (paper: unspecified; official: 1), in [0, 1e4].
        center_alpha: centre moving-average rate (official: 0.05), in [0, 1].
        branch_reduction: "sum" of the branch cross-entropies (eq. 6) or "mean" (official code).
        feature_scale: multiplies the unit-norm pooled vector before the classifier (official: 100
            with attention pooling), in (0, 1e4]; the centre loss always sees the unit-norm
            vector.
        label_smoothing: of the cross-entropies (paper: none), in [0, 1].
        drop_rate: dropout before the classifier (timm's meaning of drop_rate).
        mismatched_pairs: what a training batch whose pair i (image i and image i + N) has two
            different labels does: "warn" (once per model, default), "error" (ValueError) or
            "ignore". The co-attention of eq. 1–2 assumes same-class partners.
        global_pool: "bilinear" (the pooling above) or "" with ``num_classes=0``: forward and
            forward_head return the unpooled backbone map, as timm models do.
        erase_source: the maps eq. 3 erases from: "co_attended" (F_W, the paper) or "raw" (the
            official code: the maps before co-attention, i.e. the attention maps of "attention"
            pooling, or F_O with "bilinear" pooling).
        pooling_order: flatten order of "attention" pooling: "mc" or "cm" (the official code's,
            whose classifier weights then load as they are).
        center_formula: "wen" (Wen et al., the paper's reference) or "official" (the official
            code's centre loss and update), see `CenterLoss`.
        **backbone_kwargs: forwarded to timm for a named backbone.

    Shapes:
        forward(x) / eval: x (B, 3, H, W) -> logits (B, K).
        forward(x, target) in training: x (2N, 3, H, W), target (2N,) -> dict with "loss",
        "logits" (2N, K) of the original images, "logits_w", "logits_e" (2N, K), "loss_cls" (the
        reduced branch cross-entropies), "loss_cls_o", "loss_cls_w", "loss_cls_e", "loss_center",
        "erase_mask" (2N, 1, H, W).
    """

    paired_parts = (
        "co-attention, attention erase, their branch losses and the center loss (PCA-Net eq. 1–6)"
    )
    paired_sampler = "PairBatchSampler"

    def __init__(
        self,
        backbone: str | nn.Module = "resnet50",
        num_classes: int = 1000,
        pretrained: bool = False,
        pooling: str = "bilinear",
        bilinear_dim: int | None = 256,
        num_attention_maps: int = 32,
        co_attention_scale: float = -1.0,
        shared_weights: bool = True,
        co_attention_residual: bool = False,
        erase_threshold: float | tuple[float, float] = 0.5,
        erase_mode: str = "max",
        erase_normalize: str = "minmax",
        coattend_erased: bool = False,
        center_loss_weight: float = 1.0,
        center_alpha: float = 0.05,
        branch_reduction: str = "sum",
        feature_scale: float = 1.0,
        label_smoothing: float = 0.0,
        drop_rate: float = 0.0,
        mismatched_pairs: str = "warn",
        global_pool: str = "bilinear",
        erase_source: str = "co_attended",
        pooling_order: str = "mc",
        center_formula: str = "wen",
        **backbone_kwargs: Any,
    ) -> None:
        super().__init__()
        # Every argument is checked before the backbone is built, each under its own name.
        self.mismatched_pairs = _args.choice(mismatched_pairs, "mismatched_pairs", PAIR_POLICIES)
        self._warned_pairs = False
        self.num_classes = _args.integer(num_classes, "num_classes", minimum=0)  # 0: no head
        _args.choice(pooling, "pooling", POOLINGS)
        bilinear_dim = _args.optional(
            _args.integer, bilinear_dim, "bilinear_dim", minimum=1, maximum=_args.MAX_CHANNELS
        )
        num_attention_maps = _args.integer(
            num_attention_maps, "num_attention_maps", minimum=1, maximum=_args.MAX_CHANNELS
        )
        co_attention_scale = _args.real(
            co_attention_scale, "co_attention_scale", low=-_args.MAX_SCALE, high=_args.MAX_SCALE
        )
        shared_weights = _args.boolean(shared_weights, "shared_weights")
        co_attention_residual = _args.boolean(co_attention_residual, "co_attention_residual")
        erase_threshold = check_threshold(erase_threshold, "erase_threshold")
        _args.choice(erase_mode, "erase_mode", MODES)
        _args.choice(erase_normalize, "erase_normalize", NORMALIZATIONS)
        self.coattend_erased = _args.boolean(coattend_erased, "coattend_erased")
        self.center_loss_weight = _args.real(
            center_loss_weight, "center_loss_weight", low=0.0, high=_args.MAX_SCALE
        )
        center_alpha = _args.real(center_alpha, "center_alpha", low=0.0, high=1.0)
        self.branch_reduction = _args.choice(
            branch_reduction, "branch_reduction", BRANCH_REDUCTIONS
        )
        self.feature_scale = _args.real(
            feature_scale, "feature_scale", low=0.0, high=_args.MAX_SCALE, low_open=True
        )
        self.label_smoothing = _args.real(label_smoothing, "label_smoothing", low=0.0, high=1.0)
        self.drop_rate = _args.real(drop_rate, "drop_rate", low=0.0, high=1.0)
        self.erase_source = _args.choice(erase_source, "erase_source", ERASE_SOURCES)
        _args.choice(pooling_order, "pooling_order", ORDERS)
        _args.choice(center_formula, "center_formula", FORMULAS)
        self.backbone = resolve_backbone(backbone, pretrained=pretrained, **backbone_kwargs)
        channels = self.backbone.out_channels

        self.co_attention = CoAttention(
            scale=co_attention_scale,
            shared_weights=shared_weights,
            residual=co_attention_residual,
        )
        self.erase = AttentionErase(
            threshold=erase_threshold, mode=erase_mode, normalize=erase_normalize
        )
        self.head = BilinearHead(
            channels, bilinear_dim, pooling, num_attention_maps, order=pooling_order
        )
        self.num_features = self.head_hidden_size = self.head.out_features
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.center_loss = CenterLoss(
            max(num_classes, 1), self.num_features, alpha=center_alpha, formula=center_formula
        )
        self.global_pool = _pool(global_pool, self.num_classes)
        self.pretrained_cfg = self.default_cfg = fgvc_pretrained_cfg(
            self.backbone, backbone_kwargs.get("img_size")
        )
        self._init_feature_info()
        accept_backbone_state_dicts(self)

    # timm model interface

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New classifier (and class centres) for num_classes; ``global_pool`` "bilinear", or ""
        with ``num_classes=0`` for the unpooled map (None keeps the current one)."""
        num_classes = _args.integer(num_classes, "num_classes", minimum=0)
        if global_pool == "" and num_classes > 0:
            warnings.warn(
                "PCANet.reset_classifier(num_classes > 0, global_pool='') keeps bilinear pooling, "
                "as fgattn 0.1.0 did; '' will mean no pooling as in timm, which needs "
                "num_classes=0: pass 'bilinear' (or None)",
                DeprecationWarning,
                stacklevel=2,
            )
            global_pool = "bilinear"
        global_pool = self.global_pool if global_pool is None else global_pool
        self.global_pool = _pool(global_pool, num_classes)
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        old = self.center_loss
        self.center_loss = CenterLoss(
            max(num_classes, 1), self.num_features, alpha=old.alpha, formula=old.formula
        )
        self.center_loss.to(old.centers.device)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """F_O = backbone(x): (B, 3, H, W) -> (B, C, h, w)."""
        return self.backbone(x)

    def _logits(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head_drop(pooled * self.feature_scale))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, C, h, w) -> pooled (B, num_features) if pre_logits else logits (B, K); with
        ``global_pool=""`` (and no classifier) the map itself."""
        if not self.global_pool:
            return x
        pooled = self.head(x)
        return pooled * self.feature_scale if pre_logits else self._logits(pooled)

    # training

    def _check_pair_labels(self, target: torch.Tensor, n: int) -> None:
        """Act on pairs (i, i + N) of different classes as ``mismatched_pairs`` says."""
        warned = self.mismatched_pairs == "warn" and self._warned_pairs
        if self.mismatched_pairs == "ignore" or warned or torch.compiler.is_compiling():
            return  # (the count below waits for the GPU: skipped once there is nothing to say)
        differ = int((target[:n] != target[n:]).sum())
        if not differ:
            return
        what = (
            f"{differ} of the {n} pairs in this batch have different labels; PCA-Net's "
            f"co-attention pairs image i with a same-class partner at i + {n} "
            f"(fgattn.data.PairBatchSampler draws such batches)"
        )
        if self.mismatched_pairs == "error":
            raise ValueError(f"target: {what}; PCANet(mismatched_pairs='warn') allows them")
        if not self._warned_pairs:
            self._warned_pairs = True
            warnings.warn(
                f"{what}. Warned once; PCANet(mismatched_pairs='error') makes it an error, "
                f"'ignore' silences it",
                stacklevel=3,
            )

    def _raw(self, f_o: torch.Tensor) -> torch.Tensor:
        """The maps before co-attention that the official code erases from: the attention maps
        of "attention" pooling, else F_O itself."""
        return f_o if self.head.attention is None else self.head.attention(f_o)

    def forward_train(
        self, x: torch.Tensor, target: torch.Tensor, criterion: Criterion | None = None
    ) -> dict[str, torch.Tensor]:
        """Losses of PCA-Net eq. 6 on a same-class paired batch; see the class docstring.
        ``criterion`` replaces the cross-entropy of every branch."""
        if self.num_classes == 0:
            raise ValueError(
                "PCANet(num_classes=0) has no classifier (a feature extractor), so it cannot "
                "train on a target: build it with num_classes >= 1 or call reset_classifier(K)"
            )
        self._check_pair_labels(target, check_paired_batch(x, target))
        cross_entropy = self._cross_entropy(criterion)
        f_o = self.backbone(x)
        f_w = self.co_attention(f_o)  # (2N, C, h, w): [F_W1; F_W2], eq. 1–2
        erased, mask = self.erase(x, f_w if self.erase_source == "co_attended" else self._raw(f_o))
        f_e = self.backbone(erased)
        branches = {"o": f_o, "w": f_w, "e": f_e}
        if self.coattend_erased:
            branches["we"] = self.co_attention(f_e)
        # One pooling call over all branches: fewer, larger kernels.
        pooled = self.head(torch.cat(list(branches.values()))).chunk(len(branches))
        out: dict[str, torch.Tensor] = {}
        losses = []
        for (name, _), p in zip(branches.items(), pooled, strict=True):
            logits = self._logits(p)
            out["logits" if name == "o" else f"logits_{name}"] = logits
            ce = cross_entropy(logits, target)
            out[f"loss_cls_{name}"] = ce
            losses.append(ce)
        loss_cls = torch.stack(losses).sum()
        if self.branch_reduction == "mean":
            loss_cls = loss_cls / len(losses)
        loss_center = self.center_loss(pooled[0], target)
        out.update(
            loss=loss_cls + self.center_loss_weight * loss_center,
            loss_cls=loss_cls,
            loss_center=loss_center,
            erase_mask=mask,
        )
        return out


def _pool(global_pool: str, num_classes: int) -> str:
    """PCANet's ``global_pool``: "bilinear", or "" (no pooling) without a classifier."""
    global_pool = _args.choice(global_pool, "global_pool", GLOBAL_POOLS)
    if not global_pool and num_classes > 0:
        raise ValueError(
            f"global_pool='' (no pooling) needs num_classes=0, got num_classes={num_classes}: the "
            f"classifier takes the bilinear vector; pass global_pool='bilinear' or num_classes=0"
        )
    if not global_pool:
        warn_unpooled("PCANet")
    return global_pool


# timm registration, as timm's own model files do: ``import fgattn`` makes
# ``timm.create_model("pcanet_resnet50", num_classes=200)`` work.

default_cfgs = generate_default_cfgs(
    {
        "pcanet_resnet50": registered_cfg("resnet50.tv_in1k"),
        "pcanet_resnet101": registered_cfg("resnet101.tv_in1k"),
    }
)


@register_model
def pcanet_resnet50(pretrained: bool = False, **kwargs: Any) -> PCANet:
    """PCA-Net (co-attention + attention erase + bilinear pooling) on ResNet-50, 448 px."""
    return create_registered(PCANet, "pcanet_resnet50", "resnet50.tv_in1k", pretrained, **kwargs)


@register_model
def pcanet_resnet101(pretrained: bool = False, **kwargs: Any) -> PCANet:
    """PCA-Net (co-attention + attention erase + bilinear pooling) on ResNet-101, 448 px."""
    return create_registered(PCANet, "pcanet_resnet101", "resnet101.tv_in1k", pretrained, **kwargs)
