"""fgattn's global settings: which implementation runs the channel-attention ops; benchmark mode.

Read once from the environment at import, then changed through `fgattn.backends` (the public face,
which checks the names; a bad environment value is reported when first used, not at import).
Like timm's ``layers/config.py``, this module imports nothing from fgattn, so every layer of the
package can read the settings without an import circle.
"""

from __future__ import annotations

import os

ENV_BACKEND = "FGATTN_BACKEND"
ENV_BENCHMARK = "FGATTN_BENCHMARK"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def _parse_benchmark(value: str) -> bool:
    value = value.strip().lower()
    if value not in _TRUE + _FALSE:
        raise ValueError(f"${ENV_BENCHMARK} must be 1 or 0, got {value!r}")
    return value in _TRUE


# Read at import, checked when first used (a bad value never breaks `import fgattn`: an op or the
# console scripts report it, naming the variable).
_backend: str = os.environ.get(ENV_BACKEND, "").strip() or "auto"
_benchmark: bool | str = os.environ.get(ENV_BENCHMARK, "")


def backend() -> str:
    """The backend setting: "auto" or the name of an implementation or family."""
    return _backend


def set_backend(name: str) -> None:
    global _backend
    _backend = name


def benchmark() -> bool:
    """Whether `auto` times the candidates once per call signature and keeps the fastest."""
    global _benchmark
    if isinstance(_benchmark, str):
        _benchmark = _parse_benchmark(_benchmark)
    return _benchmark


def set_benchmark(flag: bool) -> None:
    global _benchmark
    _benchmark = flag
