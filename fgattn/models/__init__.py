"""The papers' complete models on timm backbones; importing registers them in timm.

`cin` and `pcanet` hold each model with its timm registration (``default_cfgs`` and the
``@register_model`` entrypoints, listed by ``timm.list_models(module="cin")`` / ``"pcanet"``);
`factory.create_model` builds either on any timm backbone; `task.PairedClassificationTask` trains
them the paper's way in timm's train loop."""

from ._common import NoTargetWarning
from .cin import CIN
from .factory import create_model
from .pcanet import OFFICIAL as PCANET_OFFICIAL
from .pcanet import BilinearHead, PCANet
from .task import PairedClassificationTask, PairingWarning, pair_by_label

__all__ = [
    "CIN",
    "PCANET_OFFICIAL",
    "BilinearHead",
    "NoTargetWarning",
    "PCANet",
    "PairedClassificationTask",
    "PairingWarning",
    "create_model",
    "pair_by_label",
]
