"""Which implementation runs fgattn's channel-attention ops: one global setting.

Like timm's ``use_fused_attn()`` and ``torch.backends.cudnn``, the choice is configuration, not an
argument threaded through every layer::

    FGATTN_BACKEND=reference python train.py        # environment, read at import
    fgattn.backends.set_backend("sdpa")             # process-wide
    with fgattn.backends.use_backend("triton_flash"):  # one block
        y = sci(x)
    fgattn.backends.benchmark = True                # time the candidates once per shape, keep the
                                                    # fastest (like torch.backends.cudnn.benchmark)
    fgattn.backends.resolve("self", x)              # which implementation would run for x

Backends (each implementation's name is its module's under ``fgattn/ops/``):
- ``"auto"`` (default): the fastest correct implementation for the call, from a rule table written
  from measurements (`fgattn.ops.rules.RULES`), or timed on your device in benchmark mode.
- ``"reference"``: plain PyTorch, the ground truth every other path is tested against.
- ``"sdpa"``: PyTorch's ``scaled_dot_product_attention`` with the sign folded into q and L padded;
  ``"sdpa_cudnn"``, ``"sdpa_flash"``, ``"sdpa_efficient"`` name one SDPA kernel.
- ``"triton_tiled"``: fgattn's first fused Triton kernels (CUDA; any L, the contrastive op too).
- ``"triton_flash"``: fgattn's FlashAttention-2-shaped Triton kernels (CUDA fp16/bf16, every op
  with L ≤ 256), autotuned on the device at first use. Not yet measured on a GPU, so ``"auto"``
  takes them only in benchmark mode.
- ``"triton_gram"``: fgattn's Gram-GEMM Triton kernels (CUDA; self and cross attention with
  L > 256, where ``"triton_flash"`` stops). Not yet measured on a GPU either: benchmark mode only.

``"triton"`` and ``"triton_fa"``, the names of ``"triton_tiled"`` and ``"triton_flash"`` in
fgattn 0.1, still work with a FutureWarning and will be removed in the next release.

A global setting that cannot run a call (``"triton_tiled"`` on CPU tensors, any fused path in
float64) falls back to ``"auto"`` for that call, with a warning; ``backend=`` given to a
`fgattn.functional` op must be able to run it, or the op raises a ValueError.
"""

from __future__ import annotations

import contextlib
import sys
import types
import warnings
from collections.abc import Iterator

import torch

from . import _args, _config
from ._shapes import check_float
from .ops import benchmark as _benchmark
from .ops import dispatch
from .ops.call import OPS, describe
from .ops.registry import DEPRECATED, NAMES

ENV_BACKEND = _config.ENV_BACKEND
ENV_BENCHMARK = _config.ENV_BENCHMARK
BACKENDS = NAMES
_warned: set[str] = set()


def check_backend(backend: object, name: str = "backend") -> str:
    """The implementation or family `backend` names, else a TypeError/ValueError naming `name`.
    A name of fgattn 0.1 ("triton", "triton_fa") gives its new name, with a FutureWarning once."""
    if isinstance(backend, str) and backend in DEPRECATED:
        new = DEPRECATED[backend]
        if backend not in _warned:
            _warned.add(backend)
            warnings.warn(
                f"fgattn: {name} {backend!r} is now called {new!r}; the old name will be removed "
                f"in the next release",
                FutureWarning,
                stacklevel=3,
            )
        return new
    return _args.choice(backend, name, BACKENDS)


def get_backend() -> str:
    """The global backend setting ("auto" unless set)."""
    return _config.backend()


def set_backend(backend: str) -> None:
    """Set the global backend (see the module docstring for the names)."""
    _config.set_backend(check_backend(backend))


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Run the block with `backend` as the global setting, then restore the previous one."""
    previous = get_backend()
    set_backend(backend)
    try:
        yield
    finally:
        _config.set_backend(previous)


def get_benchmark() -> bool:
    """Whether benchmark mode is on (``fgattn.backends.benchmark``)."""
    return _config.benchmark()


def set_benchmark(flag: bool) -> None:
    """Benchmark mode on or off: with it on, `auto` times every candidate implementation once per
    call signature (op, dtype, sizes, grad) on the device and keeps the fastest."""
    _config.set_benchmark(_args.boolean(flag, "fgattn.backends.benchmark"))


def clear_benchmark_cache() -> None:
    """Forget benchmark mode's winners (they are timed again on their next call)."""
    _benchmark.clear()


_ARITY = {"self": 1, "cross": 3, "contrastive": 3}


def resolve(op: str, *tensors: torch.Tensor, backend: str | None = None) -> str:
    """Name of the implementation that would run `op` ("self", "cross" or "contrastive") on these
    (B, C, L) tensors (self: x; cross: q, k, v; contrastive: x_a, x_b, eta) now, with the same
    grad mode."""
    op = _args.choice(op, "op", OPS)
    if len(tensors) != _ARITY[op]:
        names = {"self": "x", "cross": "q, k, v", "contrastive": "x_a, x_b, eta"}[op]
        raise ValueError(f"resolve({op!r}, ...) takes {names}: got {len(tensors)} tensors")
    for i, t in enumerate(tensors[:2] if op == "contrastive" else tensors):
        check_float(t, f"tensor {i}")
        if t.dim() != 3:
            raise ValueError(f"tensor {i} must be (B, C, L), got shape {tuple(t.shape)}")
    backend = None if backend is None else check_backend(backend)
    return dispatch.choose(describe(op, *tensors), backend).name


class _BackendsModule(types.ModuleType):
    """Lets ``fgattn.backends.benchmark = True`` validate, as torch.backends.cudnn does."""

    benchmark = property(lambda self: get_benchmark(), lambda self, flag: set_benchmark(flag))


# The environment's setting, taken under its current name (a name of fgattn 0.1 warns). A name that
# is none is kept as it is, so that `import fgattn` never fails on it: the first op reports it
# (`fgattn.ops.dispatch`), and the console scripts before they start.
with contextlib.suppress(TypeError, ValueError):
    _config.set_backend(check_backend(_config.backend(), f"${ENV_BACKEND}"))
sys.modules[__name__].__class__ = _BackendsModule
