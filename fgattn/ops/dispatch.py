"""The one place that decides which implementation runs a channel-attention op.

`fgattn.functional` describes each call as a `Call` (op, device, dtype, sizes, whether a gradient
is needed; no tensor data) and asks `choose` for an `Implementation`:

1. a backend named for this call (``backend=`` argument) or globally (`fgattn.backends`);
2. otherwise, in benchmark mode, the fastest candidate timed once for this `Call` on the user's
   own device and cached;
3. otherwise the first matching row of `RULES`, a table written from GPU and CPU measurements
   (figures and commands in benchmarks/README.md, raw data in benchmarks/results/).

Within a row, the first implementation that supports the call runs. An implementation that builds
the (B, C, C) matrix runs on a GPU only if that matrix fits in free memory. While torch.export or
torch.onnx.export traces a model, fgattn's custom ops (Triton) give way to the reference, which the
exporters translate, with a warning.

Everything here is plain Python on sizes and flags, so under torch.compile the choice is made once
at trace time (guarded on the sizes) and the whole model still compiles with fullgraph=True.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from .. import backends

HALF = (torch.float16, torch.bfloat16)
FP32 = (torch.float32,)
FLOATS = (torch.float16, torch.bfloat16, torch.float32)
ALL_FLOATS = (*FLOATS, torch.float64)
ATTENTION = ("self", "cross")
FUNCTIONS = {
    "self": "self_attention",
    "cross": "channel_attention",
    "contrastive": "contrastive_channel_attention",
}


class Call(NamedTuple):
    """What the choice of implementation depends on: one op call, without its data."""

    op: str  # "self" (q = k = v), "cross" or "contrastive"
    device_type: str  # "cuda", "cpu", ...
    device: str  # "cuda:0", "cpu", ...
    capability: tuple[int, int]  # CUDA compute capability; (0, 0) off CUDA
    dtype: torch.dtype  # the dtype the op computes in (inputs promoted)
    batch: int
    channels: int  # C: the softmax runs over C x C
    length: int  # L: the reduction axis of the logits (H·W)
    value_length: int  # Lv: the width of v (L except for CoAttention's [F1 | F2])
    grad: bool  # a backward will follow

    def __str__(self) -> str:
        return (
            f"{self.op} attention, {self.dtype} on {self.device}, B={self.batch} "
            f"C={self.channels} L={self.length} Lv={self.value_length}, grad={self.grad}"
        )


def describe(op: str, *tensors: torch.Tensor) -> Call:
    """The `Call` for `op` on (B, C, L) tensors (contrastive: x_a, x_b, eta)."""
    x = tensors[0]
    data = tensors[:2] if op == "contrastive" else tensors
    dtype = x.dtype
    for t in data[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return Call(
        op=op,
        device_type=x.device.type,
        device=str(x.device),
        capability=_capability(str(x.device)) if x.device.type == "cuda" else (0, 0),
        dtype=dtype,
        batch=x.shape[0],
        channels=x.shape[1],
        length=x.shape[2],
        value_length=data[-1].shape[2],
        grad=torch.is_grad_enabled() and any(t.requires_grad for t in tensors),
    )


# ----------------------------------------------------------------------------------------------
# Implementations


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One way to compute the ops: a module with `self_attention(x, scale)`,
    `channel_attention(q, k, v, scale)` and, where listed, `contrastive_channel_attention(x_a,
    x_b, eta, scale)`, all on (B, C, L) tensors."""

    name: str
    module: str
    ops: tuple[str, ...]
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    materializes: bool = False  # builds the (B, C, C) matrix
    interpretable: bool = False  # Triton kernels: CPU tensors run under TRITON_INTERPRET=1
    exportable: bool = True  # torch.export / ONNX can translate it (False: fgattn's custom ops)
    options: tuple[tuple[str, str], ...] = ()  # keyword arguments of every function
    max_length: int | None = None  # the longest L it takes
    min_length: int | None = None  # the shortest L it is meant for

    def supports(self, call: Call) -> bool:
        if call.op not in self.ops or call.dtype not in self.dtypes:
            return False
        if self.max_length is not None and call.length > self.max_length:
            return False
        if self.min_length is not None and call.length < self.min_length:
            return False
        if min(call.batch, call.channels, call.length, call.value_length) == 0:
            return self.name == "reference"  # empty: nothing to be fast at
        interpreted = self.interpretable and call.device_type == "cpu" and _triton_interpreting()
        if call.device_type not in self.devices and not interpreted:
            return False
        return _importable(self.module) and not (self.materializes and not _fits(call))

    def __call__(self, op: str, *args):
        fn = getattr(sys.modules[self.module], FUNCTIONS[op])  # imported by supports()
        return fn(*args, **dict(self.options))


def _sdpa(kernel: str, devices: tuple[str, ...], dtypes) -> Implementation:
    name, options = f"sdpa_{kernel}", (("kernel", kernel),)
    return Implementation(name, "fgattn.ops.sdpa", ATTENTION, devices, dtypes, options=options)


IMPLEMENTATIONS = {
    impl.name: impl
    for impl in (
        Implementation(
            "reference",
            "fgattn.ops.reference",
            (*ATTENTION, "contrastive"),
            ("cpu", "cuda", "mps"),
            ALL_FLOATS,
            materializes=True,
        ),
        _sdpa("cudnn", ("cuda",), HALF),
        _sdpa("flash", ("cuda", "cpu"), ALL_FLOATS),  # CPU's flash kernel takes every dtype
        _sdpa("efficient", ("cuda",), FLOATS),
        Implementation(
            "triton",
            "fgattn.ops.triton_backend",
            (*ATTENTION, "contrastive"),
            ("cuda",),
            FLOATS,
            interpretable=True,
            exportable=False,
        ),
        # FlashAttention-2-shaped kernels (fgattn/ops/triton_flash.py): not yet timed on a GPU,
        # so in no rule; benchmark mode and backend="triton_fa" can pick them
        Implementation(
            "triton_fa",
            "fgattn.ops.triton_backend",
            (*ATTENTION, "contrastive"),
            ("cuda",),
            FLOATS,
            interpretable=True,
            exportable=False,
            options=(("kernels", "flash"),),
            max_length=256,
        ),
        # Gram-GEMM kernels for the rows triton_fa cannot hold (fgattn/ops/triton_gram.py): not
        # yet timed on a GPU, so in no rule; benchmark mode and backend="triton_gram" can pick them
        Implementation(
            "triton_gram",
            "fgattn.ops.triton_backend",
            ATTENTION,
            ("cuda",),
            FLOATS,
            interpretable=True,
            exportable=False,
            options=(("kernels", "gram"),),
            min_length=257,
        ),
    )
}
FAMILIES = {"sdpa": tuple(n for n in IMPLEMENTATIONS if n.startswith("sdpa_"))}

_import_errors: dict[str, str] = {}


@torch.compiler.assume_constant_result
def _importable(module: str) -> bool:
    # Importing is not traceable: torch.compile runs this eagerly and keeps the answer; the
    # module is then read from sys.modules, which dynamo sees as it is at that moment.
    if module not in _import_errors:
        try:
            loaded = importlib.import_module(module)
            if not getattr(loaded, "AVAILABLE", True):
                raise ImportError(loaded.UNAVAILABLE_REASON)
            return True
        except ImportError as err:
            _import_errors[module] = str(err)
    return False


@torch.compiler.assume_constant_result
def _triton_interpreting() -> bool:
    """Triton's CPU interpreter is on (tests): the Triton kernels then take CPU tensors."""
    module = "fgattn.ops.triton_backend"
    return _importable(module) and bool(sys.modules[module].interpreting())


@torch.compiler.assume_constant_result
def _capability(device: str) -> tuple[int, int]:
    return torch.cuda.get_device_capability(torch.device(device))


@torch.compiler.assume_constant_result
def _free_bytes(device: str) -> int:
    """Free memory on a CUDA device: the driver's free plus what torch's cache holds unused."""
    dev = torch.device(device)
    free, _ = torch.cuda.mem_get_info(dev)
    return free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)


def _fits(call: Call) -> bool:
    """Whether the (B, C, C) matrices of a materialising implementation fit (GPU only): logits
    and softmax in fp32 (fp64 for fp64), and with a gradient two more of each; the contrastive op
    has two of everything."""
    if call.device_type != "cuda":
        return True
    per_matrix = call.batch * call.channels**2 * max(4, call.dtype.itemsize)
    count = (4 if call.grad else 2) * (2 if call.op == "contrastive" else 1)
    return count * per_matrix < _free_bytes(call.device)


# ----------------------------------------------------------------------------------------------
# The rule table


@dataclasses.dataclass(frozen=True)
class Rule:
    """A row of the rule table: where it applies (None: anywhere) and what it prefers there."""

    prefer: tuple[str, ...]
    ops: tuple[str, ...] = ATTENTION
    device: str | None = None
    dtypes: tuple[torch.dtype, ...] | None = None
    min_capability: tuple[int, int] | None = None
    max_length: int | None = None  # L
    min_channels: int | None = None  # C
    max_channels: int | None = None
    grad: bool | None = None
    measured: str = ""  # the figures the row rests on (ms, B = 32 unless said)

    def matches(self, call: Call) -> bool:
        return (
            call.op in self.ops
            and self.device in (None, call.device_type)
            and (self.dtypes is None or call.dtype in self.dtypes)
            and (self.min_capability is None or call.capability >= self.min_capability)
            and (self.max_length is None or call.length <= self.max_length)
            and (self.min_channels is None or call.channels >= self.min_channels)
            and (self.max_channels is None or call.channels <= self.max_channels)
            and self.grad in (None, call.grad)
        )


H100 = "H100, torch 2.11, 2026-11-23, fwd / fwd+bwd ms"
RULES = (
    Rule(("reference",), ops=(*ATTENTION, "contrastive"), dtypes=(torch.float64,),
         measured="fp64: the ground truth; no fused path is faster there"),
    # --- the contrastive op |W_A − η W_B| X_A: fgattn's Triton kernels or eager
    Rule(("triton", "reference"), ops=("contrastive",), device="cuda", dtypes=HALF, max_length=256,
         measured=f"{H100}: C=2048 L=196 eager 6.78 / 20.56, Triton 3.47 / 18.75; L=49 "
                  "eager 4.31 / 12.34, Triton 1.94 / 6.33; Triton needs 1/40 of the memory"),
    Rule(("triton", "reference"), ops=("contrastive",), device="cuda", dtypes=HALF, grad=False,
         measured=f"{H100}: C=2048 L=784 eager 16.8, Triton 15.1"),
    Rule(("reference", "triton"), ops=("contrastive",),
         measured=f"{H100}: L=784 eager f+b 2x faster than Triton (52.4 vs 100.0); fp32 "
                  "eager 6.47 / 20.06, Triton 32.34 / 128.46; CPU: Triton needs a GPU"),
    # --- self / cross attention on CUDA, fp16 and bf16: SDPA wherever its head dim allows
    Rule(("sdpa_cudnn", "sdpa_flash", "sdpa_efficient"), device="cuda", dtypes=HALF,
         min_capability=(9, 0), max_length=256, min_channels=1024,
         measured=f"{H100}: C=2048 L=196 cuDNN 0.24-0.34 / 1.67, flash 0.66 / 2.50, "
                  "Triton 1.57 / 7.02, eager 3.46 / 10.40; C=1024 L=196 cuDNN 0.22 / 0.93, "
                  "flash 0.24 / 1.09"),
    Rule(("sdpa_flash", "sdpa_cudnn", "sdpa_efficient"), device="cuda", dtypes=HALF,
         max_length=256,
         measured=f"{H100}: C=512 L=49 flash 0.18 / 0.66, cuDNN 0.19 / 0.77; L=196 flash "
                  "0.17 / 0.60, cuDNN 0.19 / 0.64. cuDNN is only measured on sm_90"),
    Rule(("triton", "reference", "sdpa_efficient"), device="cuda", dtypes=HALF, grad=True,
         measured=f"{H100}: L=784 (flash and cuDNN refuse head dims > 256) C=2048 Triton "
                  "30.85 (198 MB), eager 31.54 (2636 MB), mem-efficient 37.30; C=512 Triton "
                  "2.48, eager 2.57, mem-efficient 4.21"),
    Rule(("sdpa_efficient", "triton"), device="cuda", dtypes=HALF,
         measured=f"{H100}: L=784 forward C=2048 mem-efficient 3.84, Triton 7.49, eager "
                  "10.10; C=512 0.37 / 0.76 / 0.88"),
    # --- CUDA fp32 (TF32 off): eager's cuBLAS is hard to beat; mem-efficient SDPA where it wins
    #     or costs ≤ 1.3x eager's time for a fifth of its memory
    Rule(("sdpa_efficient", "reference"), device="cuda", dtypes=FP32, max_length=64,
         min_channels=1024,
         measured=f"{H100}: L=49 C=2048 mem-efficient 1.17 / 3.83, eager 1.60 / 4.77; C=1024 "
                  "0.39 / 1.17 vs 0.52 / 1.31"),
    Rule(("sdpa_efficient", "reference"), device="cuda", dtypes=FP32, max_length=256,
         min_channels=2048,
         measured=f"{H100}: C=2048 L=196 mem-efficient 3.23 / 12.99 (415 MB), eager 3.30 / "
                  "10.09 (2146 MB)"),
    Rule(("sdpa_efficient", "reference"), device="cuda", dtypes=FP32, max_length=256,
         min_channels=1024, grad=False,
         measured=f"{H100}: C=1024 L=196 forward mem-efficient 0.91, eager 0.89"),
    Rule(("reference", "sdpa_efficient", "triton"), device="cuda", dtypes=FP32,
         measured=f"{H100}: C=512 L=196 eager 0.30 / 0.95, mem-efficient 0.35 / 1.27; "
                  "L=784 C=2048 eager 9.67 / 30.78, mem-efficient 10.68 / 42.98, Triton 137 / 630"),
    # --- CPU (2-core x86, torch 2.14, 2026-11-23, B = 8, fwd / fwd+bwd ms;
    #     benchmarks/results/2026-11-23-cpu/grid.json)
    Rule(("sdpa_flash", "reference"), ops=("self",), device="cpu", min_channels=512,
         measured="CPU: C=1024 L=196 bf16 eager 77.4 / 211.7, flash 38.5 / 95.5; fp32 78.1 / "
                  "184.2 vs 39.8 / 148.3; C=512 L=49 bf16 4.81 / 14.64 vs 3.75 / 10.73"),
    Rule(("sdpa_flash", "reference"), ops=("cross",), device="cpu", min_channels=1024,
         dtypes=HALF,
         measured="CPU, PCA-Net's v = [F1 | F2] (SDPA computes the logits once per half): "
                  "C=1024 L=196 bf16 eager 99.5 / 243.0, flash 82.4 / 198.6"),
    Rule(("sdpa_flash", "reference"), ops=("cross",), device="cpu", min_channels=1024,
         grad=False, measured="CPU cross C=1024 L=49 fp32 forward eager 55.1, flash 25.8"),
    Rule(("reference", "sdpa_flash"), device="cpu",
         measured="CPU: eager at C <= 256 (self C=64 L=196 bf16 0.23 / 0.88 vs flash 0.26 / "
                  "1.25), cross to C=512 (L=196 fp32 18.4 / 49.8 vs 24.1 / 83.3) and fp32 "
                  "cross training (C=1024 L=196 239.3 vs 306.3)"),
    Rule(("reference",), measured="any other device: the plain PyTorch composition"),
)  # fmt: skip
# Tried after a row's own preferences, so that every supported call finds an implementation.
LAST_RESORT = ("sdpa_efficient", "triton", "sdpa_flash", "reference")


def rule_for(call: Call) -> Rule:
    """The first row of `RULES` that matches `call` (the last row matches everything)."""
    return next(r for r in RULES if r.matches(call))


def by_rule(call: Call) -> Implementation:
    """The implementation the rule table picks for `call`."""
    return _first_supported((*rule_for(call).prefer, *LAST_RESORT), call)


def _first_supported(names: Sequence[str], call: Call) -> Implementation:
    for name in names:
        impl = IMPLEMENTATIONS[name]
        if impl.supports(call):
            return impl
    raise RuntimeError(f"no fgattn implementation supports {call}")  # unreachable: reference


# ----------------------------------------------------------------------------------------------
# Choosing


def expand(backend: str) -> tuple[str, ...]:
    """Implementation names a backend setting stands for ("sdpa": every SDPA kernel)."""
    return FAMILIES.get(backend, (backend,))


def choose(call: Call, backend: str | None = None) -> Implementation:
    """The implementation that runs `call`: `backend` if given ("auto", or one that must support
    the call); for None the global setting where it supports the call; else benchmark mode or the
    rule table. While torch.export or torch.onnx.export traces the call, an implementation they
    cannot translate gives way to the reference (see `for_export`)."""
    impl = _choose(call, backend)
    if not impl.exportable and exporting():
        return for_export(impl, call)
    return impl


def _choose(call: Call, backend: str | None) -> Implementation:
    if backend is None and backends.get_backend() != "auto":
        impl = _named(call, backends.get_backend(), strict=False)
        if impl is not None:
            return impl
    elif backend not in (None, "auto"):
        return _named(call, backend, strict=True)
    if backends.get_benchmark():
        winner = _winners.get(call)
        if winner is None and not torch.compiler.is_compiling():
            winner = _benchmark(call)
        if winner is not None:
            return IMPLEMENTATIONS[winner]
    return by_rule(call)


def _named(call: Call, backend: str, strict: bool) -> Implementation | None:
    names = expand(backend)
    if backend in FAMILIES:  # the family's members in the rule's order
        names = tuple(sorted(names, key=_rule_rank(call)))
    for name in names:
        if IMPLEMENTATIONS[name].supports(call):
            return IMPLEMENTATIONS[name]
    reason = _import_errors.get(IMPLEMENTATIONS[names[0]].module, "")
    message = (
        f"backend {backend!r} cannot run {call}{': ' + reason if reason else ''}; "
        f"it runs {_supported_text(names)}. Use backend='auto' (or None) to let fgattn choose"
    )
    if strict:
        raise ValueError(message)
    if not torch.compiler.is_compiling():
        warnings.warn(
            f"fgattn: {message}; falling back to 'auto' for this call "
            f"(the setting comes from fgattn.backends or ${backends.ENV_BACKEND})",
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


def _rule_rank(call: Call) -> Callable[[str], int]:
    prefer = rule_for(call).prefer
    return lambda name: prefer.index(name) if name in prefer else len(prefer)


def _supported_text(names: Sequence[str]) -> str:
    parts = []
    for name in names:
        impl = IMPLEMENTATIONS[name]
        dtypes = ", ".join(str(d).removeprefix("torch.") for d in impl.dtypes)
        longest = f" with L <= {impl.max_length}" if impl.max_length else ""
        longest += f" with L >= {impl.min_length}" if impl.min_length else ""
        parts.append(
            f"{name}: {'/'.join(impl.ops)} on {'/'.join(impl.devices)} in {dtypes}{longest}"
        )
    return "; ".join(parts)


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


# ----------------------------------------------------------------------------------------------
# Benchmark mode: time every candidate once per Call on the user's device, keep the fastest

_winners: dict[Call, str] = {}


def candidates(call: Call) -> list[str]:
    """Every implementation that can run `call` here."""
    return [name for name, impl in IMPLEMENTATIONS.items() if impl.supports(call)]


def _benchmark(call: Call) -> str:
    times = {}
    for name in candidates(call):
        try:
            times[name] = time_call(IMPLEMENTATIONS[name], call)
        except Exception:  # refused, out of memory, a kernel that did not compile: not a candidate
            continue
    _winners[call] = min(times, key=times.get) if times else by_rule(call).name
    return _winners[call]


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


def clear_benchmark_cache() -> None:
    """Forget the benchmark mode's winners (they are re-timed on their next call)."""
    _winners.clear()


# ----------------------------------------------------------------------------------------------
# Running


def run(op: str, tensors: Sequence[torch.Tensor], scale: float, backend: str | None):
    """Run `op` on (B, C, L) tensors with the implementation chosen for them."""
    impl = choose(describe(op, *tensors), backend)
    return impl(op, *tensors, scale)
