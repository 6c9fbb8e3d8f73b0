"""fgattn's global settings: which implementation runs the channel-attention ops; benchmark mode.

Read once from the environment at import, then changed through `fgattn.backends` (the public face,
which checks the names). Like timm's ``layers/config.py``, this module imports nothing from fgattn,
so every layer of the package can read the settings without an import circle.
"""

from __future__ import annotations

import os

ENV_BACKEND = "FGATTN_BACKEND"
ENV_BENCHMARK = "FGATTN_BENCHMARK"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def _env_benchmark() -> bool:
    value = os.environ.get(ENV_BENCHMARK, "").strip().lower()
    if value not in _TRUE + _FALSE:
        raise ValueError(f"${ENV_BENCHMARK} must be 1 or 0, got {value!r}")
    return value in _TRUE


_backend: str = os.environ.get(ENV_BACKEND, "").strip() or "auto"  # checked by fgattn.backends
_benchmark: bool = _env_benchmark()


def backend() -> str:
    """The backend setting: "auto" or the name of an implementation or family."""
    return _backend


def set_backend(name: str) -> None:
    global _backend
    _backend = name


def benchmark() -> bool:
    """Whether `auto` times the candidates once per call signature and keeps the fastest."""
    return _benchmark


def set_benchmark(flag: bool) -> None:
    global _benchmark
    _benchmark = flag
