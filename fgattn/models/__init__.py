"""The papers' complete models on timm backbones; importing registers them in timm.

`cin` and `pcanet` hold each model with its timm registration (``default_cfgs`` and the
``@register_model`` entrypoints, listed by ``timm.list_models(module="cin")`` / ``"pcanet"``);
`factory.create_model` builds either on any timm backbone."""

from .cin import CIN
from .factory import create_model
from .pcanet import BilinearHead, PCANet

__all__ = ["CIN", "BilinearHead", "PCANet", "create_model"]
