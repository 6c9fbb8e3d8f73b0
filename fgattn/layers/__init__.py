"""The papers' layers as standalone nn.Modules, one concept per file."""

from .attention_erase import AttentionErase
from .cci import CCI
from .co_attention import CoAttention
from .danet import (
    ChannelAttentionModule,
    DualAttentionHead,
    PositionAttentionModule,
    convert_mmseg_dahead,
)
from .pooling import BilinearAttentionPooling, BilinearPooling
from .sci import SCI

__all__ = [
    "CCI",
    "SCI",
    "AttentionErase",
    "BilinearAttentionPooling",
    "BilinearPooling",
    "ChannelAttentionModule",
    "CoAttention",
    "DualAttentionHead",
    "PositionAttentionModule",
    "convert_mmseg_dahead",
]
