"""fgattn's CUDA C++ backend (name ``"cuda"`` in `fgattn.backend`): the kernels in `fgattn/csrc`.

The extension is optional and only built on request:

- at install time: ``FGATTN_BUILD_CUDA=1 pip install --no-build-isolation -e .`` builds the Python
  module ``fgattn._cuda_ext`` (setup.py);
- on first explicit use (``backend="cuda"``): compiled with `torch.utils.cpp_extension.load`
  (needs nvcc and ninja, takes minutes) into a cache directory (``FGATTN_CUDA_CACHE``, default
  ``~/.cache/fgattn/cuda_ext``) and reused afterwards.

``backend="auto"`` takes this backend only when `ready()` (already built: no implicit compile).

The ops are defined in C++ (``TORCH_LIBRARY(fgattn_cuda)``); the fake (shape) and autograd
registrations are added here once the library is loaded. float64 and empty inputs go to the
reference implementation, as in the Triton backend.

``python -m fgattn.ops.cuda_backend --build-check`` compiles the extension from scratch for
sm_80 and sm_90 (the CI check; exits 0 with a message where nvcc is absent).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import reference

__all__ = [
    "AVAILABLE",
    "UNAVAILABLE_REASON",
    "build",
    "channel_attention",
    "contrastive_channel_attention",
    "ready",
]

NAMESPACE = "fgattn_cuda"
INSTALLED_MODULE = "fgattn._cuda_ext"
CSRC = Path(__file__).resolve().parent.parent / "csrc"
# The extension proper; cpu_emulation.cpp is a test harness and not part of it.
SOURCES = ("fgattn_cuda.cpp", "fgattn_cuda_kernels.cu")
HEADERS = ("kernels.cuh", "ops_impl.h", "schema.h")
CI_ARCH_LIST = "8.0;9.0"
CXX_FLAGS = ["-O3", "-Wall"]
NVCC_FLAGS = ["-O3", "-lineinfo", "-Xcompiler=-Wall"]


# ----------------------------------------------------------------------------------------------
# Finding, building and loading the extension


def cuda_home() -> str | None:
    """The CUDA toolkit root: $CUDA_HOME/$CUDA_PATH, else the directory above nvcc that has the
    headers (torch's own guess takes dirname(dirname(which nvcc)), wrong for a wrapper script
    such as /usr/local/bin/nvcc), else /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates += [Path(nvcc).parent.parent, Path(nvcc).resolve().parent.parent]
    candidates.append(Path("/usr/local/cuda"))
    for root in candidates:
        if (root / "bin" / "nvcc").exists() and (root / "include" / "cuda_runtime.h").exists():
            return str(root)
    return None


def _source_hash() -> str:
    digest = hashlib.sha256()
    for name in SOURCES + HEADERS:
        digest.update(name.encode())
        digest.update((CSRC / name).read_bytes())
    digest.update(" ".join(CXX_FLAGS + NVCC_FLAGS).encode())
    return digest.hexdigest()[:12]


def _jit_name() -> str:
    return f"fgattn_cuda_{_source_hash()}"


def cache_dir() -> Path:
    """Where the JIT build lives: one directory per torch/CUDA version and source hash."""
    root = Path(os.environ.get("FGATTN_CUDA_CACHE", Path.home() / ".cache" / "fgattn" / "cuda_ext"))
    tag = f"torch{torch.__version__.replace('+', '_')}"
    return root / tag / _jit_name()


def _jit_built() -> bool:
    return (cache_dir() / f"{_jit_name()}.so").exists()


def _installed() -> bool:
    return importlib.util.find_spec(INSTALLED_MODULE) is not None


def _setup_cuda_home() -> str:
    home = cuda_home()
    if home is None:
        raise RuntimeError(
            "fgattn: building the CUDA extension needs the CUDA toolkit (nvcc); none was found. "
            "Set CUDA_HOME, or use backend='triton' or 'torch'."
        )
    os.environ.setdefault("CUDA_HOME", home)
    import torch.utils.cpp_extension as cpp_extension

    # CUDA_HOME is read when cpp_extension is first imported: correct it if that was earlier.
    cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
    return os.environ["CUDA_HOME"]


def build(build_directory: str | os.PathLike | None = None, verbose: bool = False) -> str:
    """Compile (or reuse) the extension with torch.utils.cpp_extension.load and load it.

    A minor CUDA version mismatch between nvcc and torch (e.g. nvcc 13.0, torch built with 13.2)
    only warns in cpp_extension and is fine: the kernels use no API newer than the toolkit, and
    torch's newer runtime runs them. A major mismatch is refused by cpp_extension.

    Returns the path of the built library.
    """
    _setup_cuda_home()
    import torch.utils.cpp_extension as cpp_extension

    directory = Path(build_directory) if build_directory else cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=_jit_name(),
        sources=[str(CSRC / s) for s in SOURCES],
        extra_cflags=CXX_FLAGS,
        extra_cuda_cflags=NVCC_FLAGS,
        build_directory=str(directory),
        is_python_module=False,
        verbose=verbose,
    )


_state: dict[str, object] = {"loaded": False, "registered": set()}


def _load_extension() -> None:
    """Import the install-time build, else the JIT cache, else compile (with a message)."""
    if _state["loaded"]:
        return
    errors = []
    if _installed():
        try:
            importlib.import_module(INSTALLED_MODULE)
        except ImportError as err:  # e.g. built against another torch: fall back to the JIT build
            errors.append(f"{INSTALLED_MODULE}: {err}")
    if not hasattr(torch.ops, NAMESPACE) or not hasattr(
        getattr(torch.ops, NAMESPACE), "channel_attention_fwd"
    ):
        if not _jit_built():
            print(
                f"fgattn: compiling the CUDA extension (first use of backend='cuda'; this takes "
                f"a few minutes, once). Build cache: {cache_dir()}. To build at install time "
                f"instead: FGATTN_BUILD_CUDA=1 pip install --no-build-isolation -e .",
                file=sys.stderr,
                flush=True,
            )
        try:
            build()
        except Exception as err:
            errors.append(str(err))
            raise RuntimeError(
                "fgattn: the CUDA extension could not be built or loaded:\n" + "\n".join(errors)
            ) from err
    _register(NAMESPACE)
    _state["loaded"] = True


def _probe() -> tuple[bool, str]:
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is built without CUDA"
    if not torch.cuda.is_available():
        return False, "CUDA is not available (torch.cuda.is_available() is False)"
    if _installed() or _jit_built():
        return True, ""
    if cuda_home() is None:
        return False, (
            "the CUDA extension is not built and nvcc was not found to build it; install the "
            "CUDA toolkit or build with FGATTN_BUILD_CUDA=1 pip install --no-build-isolation -e ."
        )
    if importlib.util.find_spec("ninja") is None and shutil.which("ninja") is None:
        return False, "building the CUDA extension on first use needs ninja (pip install ninja)"
    return True, ""


AVAILABLE, UNAVAILABLE_REASON = _probe()


def ready() -> bool:
    """Whether the ops can run without compiling anything first (what `auto` requires)."""
    return AVAILABLE and (bool(_state["loaded"]) or _installed() or _jit_built())


@torch.compiler.assume_constant_result
def _ensure_loaded() -> bool:
    # Loading/compiling is not traceable: torch.compile runs this eagerly and keeps the answer.
    _load_extension()
    return True


# ----------------------------------------------------------------------------------------------
# Fake and autograd registrations (for the real library and, in tests, the CPU emulation)


def _register(ns: str) -> None:
    """Register fake impls and autograd formulas for the ops of library `ns` (once)."""
    registered = _state["registered"]
    assert isinstance(registered, set)
    if ns in registered:
        return
    ops = getattr(torch.ops, ns)

    @torch.library.register_fake(f"{ns}::channel_attention_fwd")
    def _(q, k, v, scale, tf32):
        bsz, c, _ = q.shape
        return v.new_empty((bsz, c, v.shape[2])), q.new_empty((bsz, c), dtype=torch.float32)

    @torch.library.register_fake(f"{ns}::channel_attention_bwd")
    def _(grad, q, k, v, out, lse, scale, tf32):
        return q.new_empty(q.shape), q.new_empty(k.shape), q.new_empty(v.shape)

    @torch.library.register_fake(f"{ns}::contrastive_channel_attention_fwd")
    def _(x_a, x_b, eta, scale, tf32):
        stats = x_a.new_empty(x_a.shape[:2], dtype=torch.float32)
        return x_a.new_empty(x_a.shape), stats, torch.empty_like(stats)

    @torch.library.register_fake(f"{ns}::contrastive_channel_attention_bwd")
    def _(grad, x_a, x_b, eta, lse_a, lse_b, scale, tf32):
        return x_a.new_empty(x_a.shape), x_a.new_empty(x_b.shape), torch.empty_like(eta)

    def ca_setup(ctx, inputs, output):
        q, k, v, scale, tf32 = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.tf32 = scale, tf32

    def ca_backward(ctx, grad, _grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ops.channel_attention_bwd(grad, q, k, v, out, lse, ctx.scale, ctx.tf32)
        return dq, dk, dv, None, None

    torch.library.register_autograd(
        f"{ns}::channel_attention_fwd", ca_backward, setup_context=ca_setup
    )

    def co_setup(ctx, inputs, output):
        x_a, x_b, eta, scale, tf32 = inputs
        _, lse_a, lse_b = output
        ctx.save_for_backward(x_a, x_b, eta, lse_a, lse_b)
        ctx.scale, ctx.tf32 = scale, tf32

    def co_backward(ctx, grad, _grad_lse_a, _grad_lse_b):
        x_a, x_b, eta, lse_a, lse_b = ctx.saved_tensors
        da, db, deta = ops.contrastive_channel_attention_bwd(
            grad, x_a, x_b, eta, lse_a, lse_b, ctx.scale, ctx.tf32
        )
        return da, db, deta, None, None

    torch.library.register_autograd(
        f"{ns}::contrastive_channel_attention_fwd", co_backward, setup_context=co_setup
    )
    registered.add(ns)


# ----------------------------------------------------------------------------------------------
# Entry points used by the backend


def _use_reference(*xs: torch.Tensor) -> bool:
    return any(x.dtype == torch.float64 or x.numel() == 0 for x in xs)


def _check_cuda(*xs: torch.Tensor) -> None:
    if any(x.device.type != "cuda" for x in xs):
        devices = ", ".join(str(x.device) for x in xs)
        raise RuntimeError(
            f"fgattn's CUDA backend needs CUDA tensors, got tensors on {devices}; use "
            f"backend='torch' (or 'auto') for CPU tensors"
        )


def _tf32() -> bool:
    return torch.backends.cuda.matmul.allow_tf32


def apply_channel_attention(ops, q, k, v, scale: float, tf32: bool = False) -> torch.Tensor:
    """Run the ops of namespace object `ops` (torch.ops.fgattn_cuda, or the emulation in tests).

    tf32 lets fp32 inputs use the TF32 tensor cores; fp16/bf16 always use them (exact products).
    """
    dtype = v.dtype
    if not (q.dtype == k.dtype == v.dtype):  # one dtype per kernel: promote, cast back after
        common = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
        q, k, v = q.to(common), k.to(common), v.to(common)
    return ops.channel_attention_fwd(q, k, v, float(scale), tf32)[0].to(dtype)


def apply_contrastive(ops, x_a, x_b, eta, scale: float, tf32: bool = False) -> torch.Tensor:
    dtype = x_a.dtype
    if x_a.dtype != x_b.dtype:
        common = torch.promote_types(x_a.dtype, x_b.dtype)
        x_a, x_b = x_a.to(common), x_b.to(common)
    return ops.contrastive_channel_attention_fwd(x_a, x_b, eta, float(scale), tf32)[0].to(dtype)


def channel_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """softmax(scale · q kᵀ) v: q, k (B, C, L), v (B, C, Lv) -> (B, C, Lv) in v's dtype."""
    _check_cuda(q, k, v)
    if _use_reference(q, k, v):
        return reference.channel_attention(q, k, v, scale)
    _ensure_loaded()
    return apply_channel_attention(getattr(torch.ops, NAMESPACE), q, k, v, scale, _tf32())


def contrastive_channel_attention(
    x_a: torch.Tensor, x_b: torch.Tensor, eta: torch.Tensor, scale: float
) -> torch.Tensor:
    """|W_A − η W_B| X_A with W_X = softmax(scale · X Xᵀ); eta (B,) -> (B, C, L) in x_a's dtype."""
    _check_cuda(x_a, x_b, eta)
    if _use_reference(x_a, x_b):
        return reference.contrastive_channel_attention(x_a, x_b, eta, scale)
    _ensure_loaded()
    return apply_contrastive(getattr(torch.ops, NAMESPACE), x_a, x_b, eta, scale, _tf32())


# ----------------------------------------------------------------------------------------------
# CI build check


def build_check() -> int:
    """Compile the extension from scratch for TORCH_CUDA_ARCH_LIST (default sm_80 and sm_90).

    Returns 0 on success or when nvcc is absent (skip, with the reason printed), 1 on failure.
    """
    home = cuda_home()
    if home is None or not (Path(home) / "bin" / "nvcc").exists():
        print(
            f"fgattn build-check: SKIPPED: nvcc not found (CUDA_HOME={home}, no nvcc on PATH or "
            f"in /usr/local/cuda); nothing to check."
        )
        return 0
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", CI_ARCH_LIST)
    print(
        f"fgattn build-check: CUDA_HOME={home}, torch {torch.__version__} (CUDA "
        f"{torch.version.cuda}), TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}",
        flush=True,
    )
    if torch.version.cuda is None:
        print("fgattn build-check: FAILED: torch is built without CUDA; cannot build against it.")
        return 1
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fgattn_build_check_") as tmp:
        try:
            path = build(build_directory=tmp, verbose=True)
        except Exception as err:
            print(f"fgattn build-check: FAILED after {time.monotonic() - start:.0f}s: {err}")
            return 1
        missing = [
            name
            for name in (
                "channel_attention_fwd",
                "channel_attention_bwd",
                "contrastive_channel_attention_fwd",
                "contrastive_channel_attention_bwd",
            )
            if not torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{name}", "CUDA")
        ]
        if missing:
            print(f"fgattn build-check: FAILED: no CUDA kernel registered for {missing}")
            return 1
        print(f"fgattn build-check: OK ({path}) in {time.monotonic() - start:.0f}s")
        for line in resource_report(Path(tmp).glob("*.cuda.o")):
            print(f"fgattn build-check: {line}")
    return 0


_DTYPE_CODES = {"f": "fp32", "N3c104HalfE": "fp16", "N3c108BFloat16E": "bf16"}


def cubin_resources(path: str | os.PathLike) -> list[dict] | None:
    """`usage_records` of a cubin or object file, read with cuobjdump (the CUDA toolkit's, else
    the one Triton ships); None where neither exists."""
    home = cuda_home()
    tools = [Path(home) / "bin" / "cuobjdump"] if home else []
    try:
        import triton

        tools.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except ImportError:
        pass
    tool = next((t for t in tools if t.exists()), None)
    if tool is None:
        return None
    text = subprocess.run(
        [str(tool), "--dump-resource-usage", str(path)], capture_output=True, text=True, check=True
    ).stdout
    return usage_records(text)


def usage_records(text: str) -> list[dict]:
    """Per kernel of `cuobjdump --dump-resource-usage` output: arch, (mangled) function, registers
    per thread, static shared bytes and local (spill) bytes."""
    records, arch = [], None
    for header, body in re.findall(r"(arch = sm_\d+|Function \S+:)\n?\s*(.*)", text):
        if header.startswith("arch"):
            arch = header.split()[-1]
            continue
        usage = dict(re.findall(r"(\w+):(\d+)", body))
        if "REG" in usage:
            records.append(
                {
                    "arch": arch,
                    "function": header.removeprefix("Function ").removesuffix(":"),
                    "regs": int(usage["REG"]),
                    "shared": int(usage["SHARED"]),
                    "local": int(usage["LOCAL"]),
                }
            )
    return records


def describe_kernels(records: list[dict]) -> list[str]:
    """One line per fgattn kernel among `usage_records`: name, dtype, MMA path and resources."""
    lines = []
    for r in records:
        kernel = re.match(r"_ZN6fgattn\d+(\w+?)I(.+?)Lb([01])E", r["function"])
        if kernel is None:
            continue
        dtype = _DTYPE_CODES.get(kernel.group(2), kernel.group(2))
        mma = "wmma-tf32" if kernel.group(3) == "1" else "fma"
        lines.append(
            f"{r['arch']} {kernel.group(1):20} {dtype:5} {mma:10} regs {r['regs']:>3}  "
            f"smem {r['shared'] / 1024:5.1f} KiB  spill {r['local']} B"
        )
    return lines


def resource_report(objects) -> list[str]:
    """`describe_kernels` of every object, sorted; empty where no cuobjdump exists."""
    lines = []
    for obj in objects:
        records = cubin_resources(obj)
        if records is None:
            return []
        lines += describe_kernels(records)
    return sorted(lines)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build-check", action="store_true", help="compile for CI (see above)")
    parser.add_argument("--build", action="store_true", help="JIT-build into the cache now")
    args = parser.parse_args()
    if args.build_check:
        sys.exit(build_check())
    if args.build:
        print(build(verbose=True))
        sys.exit(0)
    parser.print_help()
