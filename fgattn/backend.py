"""The one place that decides which kernel backend runs an op.

Backends:
- ``"torch"``: plain PyTorch (`fgattn.ops.reference`), any device, the ground truth.
- ``"triton"``: fused Triton kernels (`fgattn.ops.triton_*`), CUDA tensors (or CPU tensors under
  ``TRITON_INTERPRET=1``, for tests).
- ``"cuda"``: the optional CUDA C++ extension (`fgattn/csrc`), CUDA tensors, built on request
  (an explicit ``"cuda"`` may compile it on first use; ``"auto"`` takes it only once it is built).
- ``"auto"`` (default): the environment variable ``FGATTN_BACKEND`` if set, otherwise the fastest
  available backend for the tensors' device, falling back to ``"torch"``.

A backend module provides ``channel_attention(q, k, v, scale)`` and
``contrastive_channel_attention(x_a, x_b, eta, scale)`` on (B, C, L) tensors.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")
ENV_VAR = "FGATTN_BACKEND"

# Backend modules, imported lazily so `import fgattn` never needs Triton or nvcc.
_MODULES = {
    "torch": "fgattn.ops.reference",
    "triton": "fgattn.ops.triton_backend",
    "cuda": "fgattn.ops.cuda_backend",
}
# Preference of `auto` on CUDA tensors, fastest first. Triton leads until the CUDA extension has
# been measured faster on a GPU (benchmarks/README.md); neither has run on hardware yet.
_AUTO_ORDER_CUDA = ("triton", "cuda")

_loaded: dict[str, ModuleType | None] = {}
_load_errors: dict[str, str] = {}


def _load(name: str) -> ModuleType | None:
    if name not in _loaded:
        try:
            module = importlib.import_module(_MODULES[name])
            if not getattr(module, "AVAILABLE", True):
                raise ImportError(getattr(module, "UNAVAILABLE_REASON", "not available"))
            _loaded[name] = module
        except ImportError as err:
            _loaded[name] = None
            _load_errors[name] = str(err)
    return _loaded[name]


@torch.compiler.assume_constant_result
def _importable(name: str) -> bool:
    # Importing is not traceable: torch.compile runs this eagerly and keeps the answer.
    return _load(name) is not None


@torch.compiler.assume_constant_result
def _ready(name: str) -> bool:
    # `auto` only takes a backend that runs without a build step first (the CUDA extension's
    # JIT compile takes minutes): its module's `ready()`, if it has one.
    module = _load(name)
    return module is not None and getattr(module, "ready", lambda: True)()


def is_available(name: str) -> bool:
    """Whether backend `name` can run here (it imports and its kernels are built)."""
    _check_name(name)
    return name == "auto" or _importable(name)


def _check_name(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


def resolve(backend: str, device: torch.device) -> str:
    """Name of the backend that runs for `backend` on tensors living on `device`."""
    _check_name(backend)
    if backend == "auto":
        forced = os.environ.get(ENV_VAR, "")
        if forced and forced != "auto":
            _check_name(forced)
            backend = forced
        else:
            if device.type == "cuda":
                for name in _AUTO_ORDER_CUDA:
                    if _ready(name):
                        return name
            return "torch"
    if not _importable(backend):
        raise RuntimeError(
            f"fgattn backend {backend!r} is not available: {_load_errors.get(backend, '')}"
        )
    return backend


def get(backend: str, device: torch.device) -> ModuleType:
    """The module implementing the ops for `backend` on `device`."""
    name = resolve(backend, device)
    _importable(name)  # imports it, eagerly under torch.compile
    module = _loaded[name]
    assert module is not None
    return module
