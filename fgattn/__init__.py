"""fgattn: drop-in PyTorch layers for fine-grained visual classification.

Layers from CIN (Gao et al., AAAI 2020) and PCA-Net (Zhang et al., ICME 2021), with fused kernels
for the channel-bilinear softmax behind `fgattn.functional`.
"""

from . import backends, data, functional, models
from .backbone import TimmBackbone
from .functional import channel_attention, channel_attention_weights, contrastive_channel_attention
from .layers import (
    CCI,
    SCI,
    AttentionErase,
    BilinearAttentionPooling,
    BilinearPooling,
    ChannelAttentionModule,
    CoAttention,
    DualAttentionHead,
    PositionAttentionModule,
)
from .losses import CenterLoss, ContrastiveLoss
from .models import create_model

__version__ = "0.1.0"

__all__ = [
    "CCI",
    "SCI",
    "AttentionErase",
    "BilinearAttentionPooling",
    "BilinearPooling",
    "CenterLoss",
    "ChannelAttentionModule",
    "CoAttention",
    "ContrastiveLoss",
    "DualAttentionHead",
    "PositionAttentionModule",
    "TimmBackbone",
    "backends",
    "channel_attention",
    "channel_attention_weights",
    "contrastive_channel_attention",
    "create_model",
    "data",
    "functional",
    "models",
]
