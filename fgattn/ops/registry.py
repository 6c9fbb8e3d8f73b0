"""Every implementation of the channel-attention ops, in one table of functions.

An implementation is the functions that compute the ops ("self": softmax(s · x xᵀ) x, "cross":
softmax(s · q kᵀ) v, "contrastive": |W_A − η W_B| X_A; all on (B, C, L) tensors, with the scale
last) and the function that says why it cannot run a call, which its module derives from the same
facts its kernels check. Its name is its module's (``ops/triton/flash.py``: "triton_flash") and
the prefix of its custom ops (``fgattn::triton_flash_self_fwd``). Adding one is a module and a
row here; `RULES` (`fgattn.ops.rules`) says where `auto` prefers it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping

import torch

from . import reference, sdpa
from .call import Call, Limits

try:  # Triton is optional (torch ships it on Linux only)
    from .triton import flash, gram, tiled
except ImportError as err:
    flash = gram = tiled = None
    TRITON_MISSING = f"fgattn's Triton kernels could not be imported: {err}"
else:
    TRITON_MISSING = ""


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One way to compute the ops: `functions[op](*tensors, scale)`; `refusal(call)` says why it
    cannot run a call (None: it can); `limits` describes where it runs, for error messages;
    `exportable`: torch.export and ONNX translate it (fgattn's custom ops they cannot)."""

    name: str
    functions: Mapping[str, Callable[..., torch.Tensor]]
    refusal: Callable[[Call], str | None]
    limits: Limits
    exportable: bool = True

    def why_not(self, call: Call) -> str | None:
        """Why this implementation cannot run `call`, or None."""
        reason = self.refusal(call)
        if reason is None and call.op not in self.functions:
            reason = f"it has no {call.op} op"
        return reason

    def supports(self, call: Call) -> bool:
        return self.why_not(call) is None

    def __call__(self, op: str, *args) -> torch.Tensor:
        return self.functions[op](*args)

    def __str__(self) -> str:
        return f"{self.name}: {'/'.join(self.functions)} on {self.limits}"


def _sdpa(kernel: str) -> Implementation:
    return Implementation(
        f"sdpa_{kernel}",
        {
            "self": functools.partial(sdpa.self_attention, kernel=kernel),
            "cross": functools.partial(sdpa.cross_attention, kernel=kernel),
        },
        functools.partial(sdpa.refusal, kernel=kernel),
        sdpa.LIMITS[kernel],
    )


def _triton() -> tuple[Implementation, ...]:
    names = ("triton_tiled", "triton_flash", "triton_gram")
    if TRITON_MISSING:  # listed, so that naming one says why it cannot run
        return tuple(
            Implementation(n, {}, lambda call: TRITON_MISSING, Limits(("cuda",), ())) for n in names
        )
    return (
        Implementation(
            "triton_tiled",
            {
                "self": tiled.self_attention,
                "cross": tiled.cross_attention,
                "contrastive": tiled.contrastive_attention,
            },
            tiled.refusal,
            tiled.LIMITS,
            exportable=False,
        ),
        Implementation(
            "triton_flash",
            {
                "self": flash.self_attention,
                "cross": flash.cross_attention,
                "contrastive": flash.contrastive_attention,
            },
            flash.refusal,
            flash.LIMITS,
            exportable=False,
        ),
        Implementation(
            "triton_gram",
            {"self": gram.self_attention, "cross": gram.cross_attention},
            gram.refusal,
            gram.LIMITS,
            exportable=False,
        ),
    )


IMPLEMENTATIONS: dict[str, Implementation] = {
    impl.name: impl
    for impl in (
        Implementation(
            "reference",
            {
                "self": reference.self_attention,
                "cross": reference.cross_attention,
                "contrastive": reference.contrastive_attention,
            },
            reference.refusal,
            reference.LIMITS,
        ),
        _sdpa("cudnn"),
        _sdpa("flash"),
        _sdpa("efficient"),
        *_triton(),
    )
}
# Names that stand for several implementations: the best member for the call runs.
FAMILIES = {"sdpa": ("sdpa_cudnn", "sdpa_flash", "sdpa_efficient")}
# Names of an earlier release, still taken with a FutureWarning (see fgattn.backends).
DEPRECATED = {"triton": "triton_tiled", "triton_fa": "triton_flash"}
# Every name a backend setting may take.
NAMES = ("auto", "reference", *FAMILIES, *(n for n in IMPLEMENTATIONS if n != "reference"))
