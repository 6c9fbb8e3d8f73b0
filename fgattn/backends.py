"""Which implementation runs fgattn's channel-attention ops: one global setting.

Like timm's ``use_fused_attn()`` and ``torch.backends.cudnn``, the choice is configuration, not an
argument threaded through every layer::

    FGATTN_BACKEND=reference python train.py       # environment, read at import
    fgattn.backends.set_backend("sdpa")            # process-wide
    with fgattn.backends.use_backend("triton"):    # one block
        y = sci(x)
    fgattn.backends.benchmark = True               # time the candidates once per shape, keep the
                                                   # fastest (like torch.backends.cudnn.benchmark)
    fgattn.backends.resolve("self", x)             # which implementation would run for x

Backends:
- ``"auto"`` (default): the fastest correct implementation for the call, from a rule table written
  from measurements (`fgattn.ops.dispatch.RULES`), or timed on your device in benchmark mode.
- ``"reference"``: plain PyTorch, the ground truth every other path is tested against.
- ``"sdpa"``: PyTorch's ``scaled_dot_product_attention`` with the sign folded into q and L padded;
  ``"sdpa_cudnn"``, ``"sdpa_flash"``, ``"sdpa_efficient"`` name one SDPA kernel.
- ``"triton"``: fgattn's fused Triton kernels (CUDA), compiled on first use.
- ``"triton_fa"``: fgattn's FlashAttention-2-shaped Triton kernels (CUDA; every op with L ≤ 256),
  autotuned on the device at first use. Not yet measured on a GPU, so ``"auto"``
  takes them only in benchmark mode.
- ``"triton_gram"``: fgattn's Gram-GEMM Triton kernels (CUDA; self and cross attention with
  L > 256, where ``"triton_fa"`` stops): the logits as an fp32 GEMM, then P·V. Not yet measured
  on a GPU either: ``"auto"`` takes them only in benchmark mode.

A global setting that cannot run a call (``"triton"`` on CPU tensors, any fused path in float64)
falls back to ``"auto"`` for that call, with a warning; ``backend=`` given to a `fgattn.functional`
op must be able to run it, or the op raises a ValueError.
"""

from __future__ import annotations

import contextlib
import os
import sys
import types
from collections.abc import Iterator

import torch

from . import _args

ENV_BACKEND = "FGATTN_BACKEND"
ENV_BENCHMARK = "FGATTN_BENCHMARK"
BACKENDS = (
    "auto",
    "reference",
    "sdpa",
    "sdpa_cudnn",
    "sdpa_flash",
    "sdpa_efficient",
    "triton",
    "triton_fa",
    "triton_gram",
)
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def check_backend(backend: object, name: str = "backend") -> str:
    """`backend` if it names a backend, else a TypeError/ValueError naming `name`."""
    return _args.choice(backend, name, BACKENDS)


def _env_backend() -> str:
    return check_backend(os.environ.get(ENV_BACKEND, "auto") or "auto", f"${ENV_BACKEND}")


def _env_benchmark() -> bool:
    value = os.environ.get(ENV_BENCHMARK, "").strip().lower()
    if value not in _TRUE + _FALSE:
        raise ValueError(f"${ENV_BENCHMARK} must be 1 or 0, got {value!r}")
    return value in _TRUE


_backend = _env_backend()
_benchmark = _env_benchmark()


def get_backend() -> str:
    """The global backend setting ("auto" unless set)."""
    return _backend


def set_backend(backend: str) -> None:
    """Set the global backend (see the module docstring for the names)."""
    global _backend
    _backend = check_backend(backend)


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Run the block with `backend` as the global setting, then restore the previous one."""
    previous = get_backend()
    set_backend(backend)
    try:
        yield
    finally:
        set_backend(previous)


def get_benchmark() -> bool:
    """Whether benchmark mode is on (``fgattn.backends.benchmark``)."""
    return _benchmark


def set_benchmark(flag: bool) -> None:
    """Benchmark mode on or off: with it on, `auto` times every candidate implementation once per
    call signature (op, dtype, sizes, grad) on the device and keeps the fastest."""
    global _benchmark
    _benchmark = _args.boolean(flag, "fgattn.backends.benchmark")


def resolve(op: str, *tensors: torch.Tensor, backend: str | None = None) -> str:
    """Name of the implementation that would run `op` ("self", "cross" or "contrastive") on these
    (B, C, L) tensors (contrastive: x_a, x_b, eta) now, with the same grad mode."""
    from .ops import dispatch

    return dispatch.choose(dispatch.describe(op, *tensors), backend).name


class _BackendsModule(types.ModuleType):
    """Lets ``fgattn.backends.benchmark = True`` validate, as torch.backends.cudnn does."""

    benchmark = property(lambda self: get_benchmark(), lambda self, flag: set_benchmark(flag))


sys.modules[__name__].__class__ = _BackendsModule
