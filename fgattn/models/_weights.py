"""Weights of the assembled models: where a pretrained_cfg's weights come from, whole-model and
backbone-only state dicts, and a submodule shared under two names."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from timm.models import load_state_dict, load_state_dict_from_hf
from timm.models._builder import _resolve_pretrained_source
from timm.models._hub import load_state_dict_from_path
from torch import nn

from ..backbone import TimmBackbone

_logger = logging.getLogger("fgattn.models")


def source_state_dict(cfg: dict[str, Any], cache_dir: Any) -> tuple[dict | None, str | None]:
    """The state dict of the weight source a model's pretrained_cfg names (timm's resolution:
    state_dict, file, local-dir, hf-hub, url) and where it came from; (None, None) if none."""
    load_from, location = _resolve_pretrained_source(cfg)
    if load_from == "state_dict":
        return dict(location), "the state_dict given"
    if load_from == "file":
        return load_state_dict(location), str(location)
    if load_from == "local-dir":
        return load_state_dict_from_path(location), str(location)
    if load_from == "hf-hub":
        args = location if isinstance(location, (list, tuple)) else (location,)
        return load_state_dict_from_hf(*args, cache_dir=cache_dir), f"hf-hub:{args[0]}"
    if load_from == "url":
        state = torch.hub.load_state_dict_from_url(
            location, map_location="cpu", weights_only=True, model_dir=cache_dir
        )
        return state, location
    return None, None


def holds_whole_model(state_dict: dict[str, torch.Tensor]) -> bool:
    """A CIN / PCANet state dict (its backbone under ``backbone.``), not a backbone's own."""
    return any(key.startswith("backbone.") for key in state_dict)


HEAD_KEYS = ("fc.weight", "fc.bias", "center_loss.centers")


def load_whole_model(
    model: nn.Module, state_dict: dict[str, torch.Tensor], variant: str, where: str
) -> None:
    """Load a whole-model state dict strictly, except the class-sized tensors (classifier and
    class centres) when the model was built for another number of classes: those stay new."""
    own = model.state_dict()
    new = [
        k
        for k in HEAD_KEYS
        if (k in state_dict) != (k in own) or (k in own and state_dict[k].shape != own[k].shape)
    ]
    state_dict = {k: v for k, v in state_dict.items() if k not in new}
    result = model.load_state_dict(state_dict, strict=False)
    if [k for k in result.missing_keys if k not in new] or result.unexpected_keys:
        raise RuntimeError(
            f"{where} holds a {variant} state dict that does not fit this model: missing "
            f"{result.missing_keys[:8]}, unexpected {result.unexpected_keys[:8]}; build the model "
            f"with the options it was saved with (a local-dir: / hf-hub: name restores them)"
        )
    head = f"; new classifier for {model.num_classes} classes" if new else ""
    count = len(state_dict)
    _logger.info(f"{variant}: loaded the whole model from {where} ({count} tensors){head}")


def accept_backbone_state_dicts(model: nn.Module) -> None:
    """Let ``model.load_state_dict`` take its backbone's own state dict (a timm model's keys, none
    under ``backbone.``; e.g. timm's ``checkpoint_path=``): it loads into the backbone, the
    backbone's keys are checked strictly, the rest of the model keeps its weights, and a warning
    says so. A whole-model state dict loads as usual."""
    model.register_load_state_dict_pre_hook(_backbone_only_pre_hook)
    model.register_load_state_dict_post_hook(_backbone_only_post_hook)


def _backbone_namespace(model: nn.Module) -> tuple[nn.Module, str]:
    """The module a backbone state dict belongs to, and its key prefix in the model."""
    if isinstance(model.backbone, TimmBackbone):
        return model.backbone.model, "backbone.body.model."
    return model.backbone, "backbone."


def _backbone_only_pre_hook(model, state_dict, prefix, *_args) -> None:
    keys = [k for k in state_dict if k.startswith(prefix)]
    if not keys or holds_whole_model({k[len(prefix) :]: None for k in keys}):
        return
    inner, inner_prefix = _backbone_namespace(model)
    own = inner.state_dict()
    if not any(k[len(prefix) :] in own for k in keys):
        return  # nothing of the backbone: the strict load reports the keys
    dropped = []
    for key in keys:
        value, name = state_dict.pop(key), key[len(prefix) :]
        if name in own:
            state_dict[prefix + inner_prefix + name] = value
        else:
            dropped.append(name)
    model._backbone_only = (prefix, inner_prefix, len(keys) - len(dropped), dropped)


def _backbone_only_post_hook(model, incompatible) -> None:
    flag = model.__dict__.pop("_backbone_only", None)
    if flag is None:
        return
    prefix, inner_prefix, loaded, dropped = flag
    incompatible.missing_keys[:] = [
        k
        for k in incompatible.missing_keys
        if not k.startswith(prefix) or k.startswith(prefix + inner_prefix)
    ]
    if any(k.startswith(prefix) for k in incompatible.missing_keys):
        return  # part of the backbone is missing: the strict load reports it
    extra = f"; dropped {len(dropped)} tensors the backbone has not: {dropped[:6]}" * bool(dropped)
    warnings.warn(
        f"{type(model).__name__}.load_state_dict: the state dict holds a backbone ({loaded} "
        f"tensors, no key under 'backbone.'), not a whole {type(model).__name__}: loaded it into "
        f"the backbone, the rest of the model keeps its weights{extra}",
        stacklevel=4,
    )


def tie_in_state_dict(module: nn.Module, alias: str, owner: str) -> None:
    """Keep a shared submodule once in ``module``'s state_dict, under ``owner``.

    CCI's φ is SCI's φ (one tensor each for weight and bias); a state_dict holding it under both
    names is refused by safetensors ("Some tensors share memory") and so by timm's
    ``save_for_hf(safe_serialization=True)``. The state_dict keeps ``owner`` only. Loading
    accepts files with both names (fgattn 0.1.0's, torch.save) or with ``alias`` only
    (``safetensors.torch.save_model`` may keep either name); both copies must agree.
    """

    def drop_alias(_module, state_dict, prefix, _local_metadata) -> None:
        for key in [k for k in state_dict if k.startswith(prefix + alias)]:
            del state_dict[key]

    def alias_to_owner(_module, state_dict, prefix, *_args) -> None:
        for key in [k for k in state_dict if k.startswith(prefix + alias)]:
            value = state_dict.pop(key)
            target = prefix + owner + key[len(prefix + alias) :]
            kept = state_dict.setdefault(target, value)
            if kept.shape != value.shape or not torch.equal(kept, value):
                raise ValueError(
                    f"state_dict holds {key} and {target} with different values; in "
                    f"{type(module).__name__} they are one tensor (CCI's φ is SCI's φ)"
                )

    def forget_alias(_module, incompatible) -> None:
        incompatible.missing_keys[:] = [
            k for k in incompatible.missing_keys if f".{alias}" not in f".{k}"
        ]

    register = getattr(module, "register_state_dict_post_hook", None)
    (register or module._register_state_dict_hook)(drop_alias)
    module.register_load_state_dict_pre_hook(alias_to_owner)
    module.register_load_state_dict_post_hook(forget_alias)
