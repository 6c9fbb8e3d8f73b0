"""The one place that decides which implementation runs a channel-attention op.

`fgattn.functional` describes each call as a `Call` (`fgattn.ops.call`) and `run`s it on the
implementation `choose` picks from `IMPLEMENTATIONS` (`fgattn.ops.registry`):

1. a backend named for this call (``backend=`` argument) or globally (`fgattn.backends`);
2. otherwise, in benchmark mode, the fastest candidate timed once for this `Call` on the user's
   own device and cached (`fgattn.ops.benchmark`);
3. otherwise the first matching row of `RULES` (`fgattn.ops.rules`), a table written from GPU
   and CPU measurements.

An implementation is offered only for calls it says it can run (`Implementation.supports`). While
torch.export or torch.onnx.export traces a model, fgattn's custom ops (Triton) give way to the
reference, which the exporters translate, with a warning. Everything here is plain Python on sizes
and flags, so under torch.compile the choice is made once at trace time (guarded on the sizes) and
the whole model still compiles with fullgraph=True.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence

import torch

from .. import _config
from . import benchmark
from .call import Call, describe
from .registry import FAMILIES, IMPLEMENTATIONS, NAMES, Implementation
from .rules import LAST_RESORT, rule_for


def run(op: str, tensors: Sequence[torch.Tensor], scale: float, backend: str | None):
    """Run `op` on (B, C, L) tensors with the implementation chosen for them."""
    impl = choose(describe(op, *tensors), backend)
    return impl(op, *tensors, scale)


def choose(call: Call, backend: str | None = None) -> Implementation:
    """The implementation that runs `call`: `backend` if given ("auto", or one that must support
    the call); for None the global setting where it supports the call; else benchmark mode or the
    rule table. While torch.export or torch.onnx.export traces the call, an implementation they
    cannot translate gives way to the reference (see `for_export`); so does SDPA under the
    TorchScript ONNX exporter (``dynamo=False``), whose file mis-shapes SDPA's padded head dim
    (onnxruntime failed in a Reshape)."""
    impl = _choose(call, backend)
    if impl.name != "reference" and exporting():
        if not impl.exportable:
            return for_export(impl, call)
        if torch.jit.is_tracing():
            return IMPLEMENTATIONS["reference"]
    return impl


def _choose(call: Call, backend: str | None) -> Implementation:
    setting = _config.backend()
    if setting not in NAMES:  # from the environment (fgattn.backends.set_backend checks names)
        raise ValueError(f"${_config.ENV_BACKEND} must be one of {NAMES}, got {setting!r}")
    if backend is None and setting != "auto":
        impl = _named(call, setting, strict=False)
        if impl is not None:
            return impl
    elif backend not in (None, "auto"):
        return _named(call, backend, strict=True)
    if _config.benchmark():
        winner = benchmark.winner(call)
        if winner is not None:
            return IMPLEMENTATIONS[winner]
    return by_rule(call)


def by_rule(call: Call) -> Implementation:
    """The implementation the rule table picks for `call`: the first of its row's preferences,
    then of `LAST_RESORT`, that supports the call (the reference supports every call but a
    GPU's that its matrices do not fit; `LAST_RESORT` has one for those)."""
    for name in (*rule_for(call).prefer, *LAST_RESORT):
        if IMPLEMENTATIONS[name].supports(call):
            return IMPLEMENTATIONS[name]
    raise RuntimeError(f"no fgattn implementation supports {call}")


def _named(call: Call, backend: str, strict: bool) -> Implementation | None:
    """The implementation `backend` names (a family's best member for the call); if it cannot run
    the call, a ValueError (`strict`) or a warning and None (a global setting: auto decides)."""
    names = FAMILIES.get(backend, (backend,))
    prefer = rule_for(call).prefer  # a family's members in the rule's order
    names = sorted(names, key=lambda n: prefer.index(n) if n in prefer else len(prefer))
    reasons = []
    for name in names:
        impl = IMPLEMENTATIONS[name]
        reason = impl.why_not(call)
        if reason is None:
            return impl
        reasons.append(f"{impl} ({reason})" if len(names) > 1 else f"{reason}; it runs {impl}")
    message = (
        f"backend {backend!r} cannot run {call}: {'; '.join(reasons)}. "
        "Use backend='auto' (or None) to let fgattn choose"
    )
    if strict:
        raise ValueError(message)
    if not torch.compiler.is_compiling():
        warnings.warn(
            f"fgattn: {message}; falling back to 'auto' for this call "
            f"(the setting comes from fgattn.backends or ${_config.ENV_BACKEND})",
            stacklevel=_caller_outside_fgattn(),
        )
    return None


def _caller_outside_fgattn(traced: bool = False) -> int:
    """The `stacklevel` of the first frame outside fgattn and torch (nn.Module calls): the user's
    line. With `traced`, also outside the code torch generates while tracing (``<string>``)."""
    inside = tuple(os.path.dirname(m.__file__) for m in (sys.modules["fgattn"], torch))
    inside += ("<",) if traced else ()
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


# ----------------------------------------------------------------------------------------------
# Export: torch.export keeps a custom op as one opaque node, and the ONNX exporter has no
# translation for it, so the exported graph gets the plain-PyTorch reference instead

_export_warned: set[tuple[str, str]] = set()  # (op, implementation) pairs already warned about


@torch.compiler.assume_constant_result
def exporting() -> bool:
    """Whether torch.export or torch.onnx.export is tracing the model now.

    Run eagerly even while dynamo traces (`assume_constant_result`): dynamo of some releases
    (torch 2.8 and 2.9 among them, pytorch/pytorch#176347) answers torch.compiler.is_exporting()
    with True inside torch.compile too, which sent compiled models to the reference."""
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()


def for_export(impl: Implementation, call: Call) -> Implementation:
    """The reference, in place of `impl` (a custom op the exporters cannot translate), with a
    warning the first time for each op and implementation."""
    _warn_for_export(impl.name, call.op, str(call))
    return IMPLEMENTATIONS["reference"]


@torch.compiler.assume_constant_result
def _warn_for_export(name: str, op: str, call: str) -> bool:
    # Run eagerly also while torch.export(strict=True) traces with dynamo, which cannot trace the
    # warning itself (the caller's frame is read from the stack).
    if (op, name) not in _export_warned:
        _export_warned.add((op, name))
        warnings.warn(
            f"fgattn: {call} would run on the {name!r} implementation, a torch.library custom "
            f"op that torch.export keeps opaque and torch.onnx.export cannot translate; the "
            f"exported graph computes it with the plain-PyTorch 'reference' implementation "
            f"instead (same result up to rounding; eager calls still run on {name!r})",
            stacklevel=_caller_outside_fgattn(traced=True),
        )
    return True
