"""Benchmark mode (``fgattn.backends.benchmark = True``): every candidate implementation timed once
per `Call` on the user's own device, the fastest kept, as torch.backends.cudnn.benchmark does."""

from __future__ import annotations

import statistics
import time

import torch

from .call import Call
from .registry import IMPLEMENTATIONS, Implementation

_winners: dict[Call, str] = {}


def winner(call: Call) -> str | None:
    """The fastest implementation for `call`, timed now if it has not been; None while
    torch.compile traces a call not timed before (nothing is timed inside a trace)."""
    if call not in _winners and not torch.compiler.is_compiling():
        times = {}
        for name in candidates(call):
            try:
                times[name] = time_call(IMPLEMENTATIONS[name], call)
            except Exception:  # out of memory, a kernel that did not compile: not a candidate
                continue
        if times:
            _winners[call] = min(times, key=times.get)
    return _winners.get(call)


def candidates(call: Call) -> list[str]:
    """Every implementation that can run `call` here."""
    return [name for name, impl in IMPLEMENTATIONS.items() if impl.supports(call)]


def clear() -> None:
    """Forget the winners (they are timed again on their next call)."""
    _winners.clear()


def inputs(call: Call) -> list[torch.Tensor]:
    """Random post-ReLU inputs (the kind SCI sees) for `call`, needing grad when it does."""
    shape = (call.batch, call.channels, call.length)
    make = lambda s: torch.randn(s, device=call.device).relu().to(call.dtype)  # noqa: E731
    if call.op == "self":
        xs = [make(shape)]
    elif call.op == "cross":
        xs = [make(shape), make(shape), make((*shape[:2], call.value_length))]
    else:
        xs = [make(shape), make(shape), torch.rand(call.batch, device=call.device)]
    return [x.requires_grad_(call.grad) for x in xs]


def time_call(impl: Implementation, call: Call, repeat: int = 5, scale: float = -1.0) -> float:
    """Median seconds of one forward (and backward, if `call.grad`) of `impl` on `call`."""
    xs = inputs(call)

    def step():
        out = impl(call.op, *xs, scale)
        if call.grad:
            torch.autograd.grad(out, [x for x in xs if x.requires_grad], torch.ones_like(out))

    cuda = call.device_type == "cuda"
    step()  # compiles Triton kernels, picks cuDNN plans
    samples = []
    for _ in range(repeat):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            step()
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)
