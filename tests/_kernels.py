"""What the Triton kernel tests share: the interpreter's configs, and the autotuners to reset."""

from __future__ import annotations

import contextlib

from triton.runtime.autotuner import Autotuner

from fgattn.ops.triton import tuning


def autotuners(module) -> list[Autotuner]:
    """The autotuned kernels of a kernel family's module."""
    return [obj for obj in vars(module).values() if isinstance(obj, Autotuner)]


def forget_tuning(module) -> None:
    """Clear the autotuners' choices, so the next launch prunes (and tunes) again."""
    for kernel in autotuners(module):
        kernel.cache.clear()


@contextlib.contextmanager
def interpreter_configs(monkeypatch, module, family: str, *tiles: dict):
    """Run `module`'s kernels under the interpreter with these tile configs (several: the
    autotuner runs each and keeps the first), forgetting earlier choices before and after."""
    monkeypatch.setitem(tuning.INTERPRETER, family, [dict(t) for t in tiles])
    forget_tuning(module)
    try:
        yield
    finally:
        forget_tuning(module)
