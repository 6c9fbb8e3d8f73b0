"""Training losses of the two papers."""

from .center_loss import CenterLoss
from .contrastive_loss import ContrastiveLoss

__all__ = ["CenterLoss", "ContrastiveLoss"]
