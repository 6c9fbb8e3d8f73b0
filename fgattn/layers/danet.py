"""DANet (Fu et al., Dual Attention Network for Scene Segmentation, CVPR 2019): its channel
attention module (§3.3), the same channel softmax as CIN's SCI behind a learned residual gate, its
position attention module (§3.2) and the dual attention head that runs both (§3.4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .. import _args
from .._shapes import check_image_batch, check_module_input
from ..functional import channel_attention

# mmsegmentation's names for DANet's modules (``mmseg.models.decode_heads.DAHead``: ConvModule's
# ``conv`` / ``bn``, PAM's ``query_project`` / ``key_project`` / ``value_project``, ``gamma`` a 0-d
# ``Scale``), as (mmseg, fgattn) key prefixes; the first that matches renames a key.
MMSEG_PAM_NAMES = (
    ("query_project.", "query_conv."),
    ("key_project.", "key_conv."),
    ("value_project.", "value_conv."),
)
MMSEG_HEAD_NAMES = (
    ("pam_in_conv.conv.", "conv5a.0."),
    ("pam_in_conv.bn.", "conv5a.1."),
    ("cam_in_conv.conv.", "conv5c.0."),
    ("cam_in_conv.bn.", "conv5c.1."),
    ("pam_out_conv.conv.", "conv51.0."),
    ("pam_out_conv.bn.", "conv51.1."),
    ("cam_out_conv.conv.", "conv52.0."),
    ("cam_out_conv.bn.", "conv52.1."),
    ("pam_conv_seg.", "conv6.1."),
    ("cam_conv_seg.", "conv7.1."),
    ("conv_seg.", "conv8.1."),
    *((f"pam.{theirs}", f"sa.{ours}") for theirs, ours in MMSEG_PAM_NAMES),
    ("pam.", "sa."),
    ("cam.", "sc."),
)


def _rename(state_dict: dict, prefix: str, names: tuple[tuple[str, str], ...]) -> None:
    """Rename, in place, the keys under ``prefix`` that start with an mmseg name; a 0-d
    ``gamma.scale`` becomes DANet's ``gamma`` of shape (1,)."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        name = key[len(prefix) :]
        for theirs, ours in names:
            if name.startswith(theirs):
                name = ours + name[len(theirs) :]
                break
        if name == "gamma.scale" or name.endswith(".gamma.scale"):
            name = name[: -len(".scale")]
            state_dict[key] = state_dict[key].reshape(1)
        if name != key[len(prefix) :]:
            state_dict[prefix + name] = state_dict.pop(key)


def _load_mmseg_names(names: tuple[tuple[str, str], ...]):
    """A load_state_dict pre-hook that takes mmsegmentation's names for a module's keys."""

    def hook(_module, state_dict, prefix, *_args) -> None:
        _rename(state_dict, prefix, names)

    return hook


def convert_mmseg_dahead(state_dict: dict, prefix: str = "decode_head.") -> dict:
    """The `DualAttentionHead` state dict in an mmsegmentation DAHead checkpoint.

    Args:
        state_dict: an mmseg checkpoint (``{"state_dict": ...}`` as mmseg saves it, or the
            state dict itself) of a segmentor with a DAHead.
        prefix: where the head's keys are (mmseg: "decode_head.").

    Returns:
        The head's tensors under fgattn's (the official DANet's) names, for
        ``DualAttentionHead.load_state_dict``; the backbone's and auxiliary head's keys are left
        out. (``load_state_dict`` also takes mmseg's names directly, without the prefix.)
    """
    state_dict = state_dict.get("state_dict", state_dict)
    head = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not head:
        raise ValueError(
            f"state_dict has no key under prefix {prefix!r}; an mmseg DAHead checkpoint keeps "
            f"the head under 'decode_head.' (got keys like {list(state_dict)[:3]})"
        )
    _rename(head, "", MMSEG_HEAD_NAMES)
    return head


class ChannelAttentionModule(nn.Module):
    """E = γ · softmax(rowmax(S) − S) A + A with S = A Aᵀ over the C channels of A.

    This is what DANet's official code computes (and its copies: mmsegmentation's ``CAM``,
    PaddleSeg, gluon-cv): ``energy_new = max(energy, -1) - energy; softmax(energy_new)``.
    rowmax(S) − S differs from −S by one constant per row, which the softmax cancels, so the
    attention is softmax(−A Aᵀ), CIN eq. 2's W, and the module runs on fgattn's dispatched
    channel attention (fused kernels, no C × C matrix on the GPU paths) with ``scale=-1``.
    γ is one learned scalar, zero at the start, so a freshly inserted module is the identity.

    Args:
        scale: logit scale of S; −1 reproduces the official code (softmax(rowmax(S) − S)).
            |scale| <= 1e4.
        gamma_init: the starting γ (DANet: 0), |γ| <= 1e4.

    Shapes:
        x: (B, C, H, W) -> (B, C, H, W), x's dtype and memory format.
    """

    def __init__(self, scale: float = -1.0, gamma_init: float = 0.0) -> None:
        super().__init__()
        self.scale = _args.real(scale, "scale", low=-_args.MAX_SCALE, high=_args.MAX_SCALE)
        gamma_init = _args.real(
            gamma_init, "gamma_init", low=-_args.MAX_SCALE, high=_args.MAX_SCALE
        )
        # Shape (1,) as in DANet, so its checkpoints' ``gamma`` loads as it is; mmsegmentation's
        # ``gamma.scale`` (0-d) loads too.
        self.gamma = nn.Parameter(torch.full((1,), gamma_init))
        self.register_load_state_dict_pre_hook(_load_mmseg_names(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(x, "x")
        check_module_input(x, "x", self, dtype=False)  # γ is cast to x's dtype
        y = channel_attention(x, scale=self.scale)
        return self.gamma.to(y.dtype) * y + x

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class PositionAttentionModule(nn.Module):
    """DANet's position attention: E_j = α Σ_i s_ji D_i + A_j, s_ji = softmax_i(B_i · C_j).

    DANet eq. 1–2 over the N = H·W positions: B, C, D are 1×1 convolutions of A (queries and keys
    with C/8 channels, values with C), s the (N, N) attention of position j to position i and α
    one learned scalar, zero at the start. This is ordinary spatial attention with one head and
    no 1/sqrt(d) (DANet has none), so it runs on `F.scaled_dot_product_attention` with scale 1,
    which never builds the N × N matrix on its fused kernels.

    Args:
        channels: C, the channels of A (at most 65536).
        reduction: the query and key convolutions have C // reduction channels (DANet: 8).
        gamma_init: the starting α (DANet: 0), |α| <= 1e4.

    Shapes:
        x: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, reduction: int = 8, gamma_init: float = 0.0) -> None:
        super().__init__()
        self.channels = _args.integer(channels, "channels", minimum=1, maximum=_args.MAX_CHANNELS)
        reduction = _args.integer(reduction, "reduction", minimum=1)
        gamma_init = _args.real(
            gamma_init, "gamma_init", low=-_args.MAX_SCALE, high=_args.MAX_SCALE
        )
        if channels < reduction:
            raise ValueError(
                f"channels must be at least reduction ({reduction}) so that the query and key "
                f"convolutions have C // reduction >= 1 channels, got channels={channels}"
            )
        # DANet's names (query_conv, key_conv, value_conv, gamma), so its checkpoints load;
        # mmsegmentation's PAM names (query_project, ..., gamma.scale) load too.
        self.query_conv = nn.Conv2d(channels, channels // reduction, 1)
        self.key_conv = nn.Conv2d(channels, channels // reduction, 1)
        self.value_conv = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.full((1,), gamma_init))
        self.register_load_state_dict_pre_hook(_load_mmseg_names(MMSEG_PAM_NAMES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(x, "x", self.channels)
        check_module_input(x, "x", self)
        q, k, v = (
            rearrange(conv(x), "b c h w -> b 1 (h w) c")
            for conv in (self.query_conv, self.key_conv, self.value_conv)
        )
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0)  # (B, 1, N, C)
        out = rearrange(out, "b 1 (h w) c -> b c h w", h=x.shape[2])
        return self.gamma.to(out.dtype) * out + x


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


def _classifier(in_channels: int, num_classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(in_channels, num_classes, 1))


class DualAttentionHead(nn.Module):
    """DANet's segmentation head: position and channel attention on a feature map, summed.

    DANet §3.4: each branch reduces the C input channels to C' = C // 4 (3×3 conv, BN, ReLU), runs
    its attention module (position: `PositionAttentionModule`, eq. 1–2; channel:
    `ChannelAttentionModule`, eq. 3–4), and a second 3×3 conv-BN-ReLU; the two results are summed
    and classified by a 1×1 convolution after dropout. Each branch also has its own classifier,
    whose logits DANet trains with auxiliary losses of equal weight.

    The submodules carry the official DANetHead's names (conv5a/conv5c, sa/sc, conv51/conv52,
    conv6/conv7/conv8), so its state_dict loads as it is. mmsegmentation's DAHead state dict
    (``pam_in_conv.conv``, ``pam.query_project``, ``pam.gamma.scale``, ``conv_seg``, ...) loads
    too: ``load_state_dict`` renames its keys, and `convert_mmseg_dahead` takes the head out of a
    whole mmseg checkpoint. mmseg's DAHead with ``channels=in_channels // 4`` and
    ``pam_channels=channels // 8`` (its DANet configs: 2048, 512, 64) is this head; mmseg shares
    one Dropout2d between the three classifiers, which holds no weights.

    Args:
        in_channels: C, the channels of the backbone's feature map.
        num_classes: K, the segmentation classes.
        reduction: C' = C // reduction (DANet: 4).
        dropout: Dropout2d probability before each classifier (DANet: 0.1).

    Shapes:
        x: (B, C, H, W) -> logits (B, K, H, W) at the feature map's resolution (upsample them to
        the image); with ``return_branches=True`` the tuple (fused, position, channel) of such
        logits, DANet's three outputs.
    """

    def __init__(
        self, in_channels: int, num_classes: int, reduction: int = 4, dropout: float = 0.1
    ) -> None:
        super().__init__()
        in_channels = _args.integer(
            in_channels, "in_channels", minimum=1, maximum=_args.MAX_CHANNELS
        )
        num_classes = _args.integer(num_classes, "num_classes", minimum=1)
        reduction = _args.integer(reduction, "reduction", minimum=1)
        dropout = _args.real(dropout, "dropout", low=0.0, high=1.0)
        inter = in_channels // reduction
        if inter < 8:  # the position attention's query/key convs have inter // 8 channels
            raise ValueError(
                f"in_channels // reduction must be at least 8, got {in_channels} // {reduction}"
                f" = {inter}; use more input channels or a smaller reduction"
            )
        self.in_channels = in_channels
        self.conv5a = _conv_bn_relu(in_channels, inter)
        self.conv5c = _conv_bn_relu(in_channels, inter)
        self.sa = PositionAttentionModule(inter)
        self.sc = ChannelAttentionModule()
        self.conv51 = _conv_bn_relu(inter, inter)
        self.conv52 = _conv_bn_relu(inter, inter)
        self.conv6 = _classifier(inter, num_classes, dropout)
        self.conv7 = _classifier(inter, num_classes, dropout)
        self.conv8 = _classifier(inter, num_classes, dropout)
        self.register_load_state_dict_pre_hook(_load_mmseg_names(MMSEG_HEAD_NAMES))

    def forward(
        self, x: torch.Tensor, return_branches: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        check_image_batch(x, "x", self.in_channels)
        check_module_input(x, "x", self)
        position = self.conv51(self.sa(self.conv5a(x)))
        channel = self.conv52(self.sc(self.conv5c(x)))
        fused = self.conv8(position + channel)
        if return_branches:
            return fused, self.conv6(position), self.conv7(channel)
        return fused
