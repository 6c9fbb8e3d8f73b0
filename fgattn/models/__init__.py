"""The papers' complete models on timm backbones; importing registers them in timm."""

from .cin import CIN
from .pcanet import BilinearHead, PCANet
from .registry import create_model

__all__ = ["CIN", "BilinearHead", "PCANet", "create_model"]
