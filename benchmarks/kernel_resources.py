"""Compile every fused Triton kernel for a GPU architecture, with no GPU, and report its resources.

Runs fgattn's own launchers on CPU tensors of the real shapes with the kernels swapped for a
recorder: each launch becomes `JITFunction.warmup` against a stub driver that names the target
(sm_80, sm_90, ...). So every kernel goes through Triton's real NVIDIA pipeline (TTIR -> TTGIR ->
LLVM -> PTX -> ptxas) with the block sizes, warps, stages and argument specialisations the launchers
would pick on that GPU, which the CPU interpreter used by the tests never exercises. For each
compiled kernel it prints shared memory, registers per thread, spilled (local) bytes, and the
resident blocks per SM these allow; shared memory over the architecture's per-block limit would
fail at launch ("out of resources") and is flagged.

    python benchmarks/kernel_resources.py                      # sm_80 and sm_90, B=32, C=2048
    python benchmarks/kernel_resources.py --arch 90 --dtype bf16 --length 196 --json res.json
    python benchmarks/kernel_resources.py --check              # exit 1 on any compile/limit failure
    python benchmarks/kernel_resources.py --length 784 --workload gram  # one family's workloads
    python benchmarks/kernel_resources.py --arch 80 --dtype bf16 --length 196 \
        --kernel flash._contrastive_bwd_kernel                 # one kernel: seconds, not minutes

Needs Triton's NVIDIA backend (ships with the `triton` wheel, ptxas included); no CUDA driver.
Must run without TRITON_INTERPRET (the kernels have to be real JIT functions).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

# Profile the checkout this script is in, not whichever fgattn the environment installed (an
# editable install of another worktree would otherwise be compiled instead).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Per-block shared memory a kernel may opt into, and per-SM register file / shared memory.
ARCH_LIMITS = {
    75: {"smem_block": 65536, "smem_sm": 65536, "regs_sm": 65536},  # T4 (no bf16)
    80: {"smem_block": 166912, "smem_sm": 167936, "regs_sm": 65536},  # A100
    86: {"smem_block": 101376, "smem_sm": 102400, "regs_sm": 65536},  # RTX 3090, A10
    89: {"smem_block": 101376, "smem_sm": 102400, "regs_sm": 65536},  # RTX 4090, L4, L40
    90: {"smem_block": 232448, "smem_sm": 233472, "regs_sm": 65536},  # H100 / H200
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
KERNEL_MODULES = ("fgattn.ops.triton.tiled", "fgattn.ops.triton.flash", "fgattn.ops.triton.gram")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", type=int, nargs="+", choices=sorted(ARCH_LIMITS), default=[80, 90])
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16", "fp16"])
    p.add_argument("--tf32", action="store_true", help="also compile the fp32 kernels with TF32")
    p.add_argument("--batch", type=int, default=32, help="only sets the grid that is printed")
    p.add_argument("--channels", type=int, default=2048)
    p.add_argument("--length", type=int, nargs="+", default=[49, 196, 784])
    p.add_argument("--workload", nargs="+", help="only workloads whose label starts so ('fa')")
    p.add_argument(
        "--kernel", nargs="+", default=[],
        help="compile only kernels whose qualified name contains one of these, e.g. "
        "'flash._contrastive_bwd_kernel' or 'triton_flash.' (the others' launches are skipped)",
    )  # fmt: skip
    p.add_argument(
        "--first-config", action="store_true", help="of an autotuned kernel, the first config only"
    )
    p.add_argument("--json", help="write every compiled kernel's record here")
    p.add_argument("--check", action="store_true", help="exit 1 if a limit is exceeded")
    return p.parse_args(argv)


class StubDriver:
    """Just enough of triton.runtime.driver for JITFunction.warmup to compile for `target`."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def is_active(self):
        return True


class Recorder:
    """Stands in for a kernel in its module: `kernel[grid](...)` compiles instead of launching.
    An autotuned kernel compiles every config its prune function keeps for this target."""

    def __init__(self, fn, log, wanted=True, first_config=False):
        self.fn, self.log, self.wanted, self.first_config = fn, log, wanted, first_config

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if not self.wanted:  # filtered out (--kernel): nothing compiled, outputs stay empty
                return
            for fn, full in self.variants(args, kwargs):
                g = grid(full) if callable(grid) else grid
                start = time.perf_counter()
                compiled = fn.warmup(*args, grid=g, **full)
                self.log.append((fn, g, full, compiled, time.perf_counter() - start))

        return launch

    def variants(self, args, kwargs):
        """(JITFunction, keyword arguments) of every compilation this launch stands for."""
        from triton.runtime.autotuner import Autotuner

        if not isinstance(self.fn, Autotuner):
            return [(self.fn, kwargs)]
        self.fn.nargs = dict(zip(self.fn.arg_names, args, strict=False))
        configs = self.fn.prune_configs(kwargs)[: 1 if self.first_config else None]
        self.fn.nargs = None
        return [(self.fn.fn, {**kwargs, **cfg.all_kwargs()}) for cfg in configs]


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
                    "stack": int(usage.get("STACK", 0)),
                }
            )
    return records


def resource_usage(cubin: bytes) -> dict:
    """Registers per thread and local (spill) bytes of a cubin, read with cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        records = cubin_resources(f.name)
    if not records:
        raise SystemExit("kernel_resources: no cuobjdump (neither the CUDA toolkit's nor Triton's)")
    (record,) = records  # one kernel per Triton cubin
    # Spilled registers show as LOCAL or, where ptxas keeps them in the stack frame, as STACK
    return {"regs": record["regs"], "local_bytes": record["local"], "stack_bytes": record["stack"]}


def workloads(dtype, tf32: bool, length: int, channels: int, batch: int):
    """(label, callable) pairs that run the kernels' custom ops (forward, then backward) the way
    the functional API does, one family after the other ("tiled", "flash", "gram")."""
    from fgattn.ops.triton import flash, gram, tiled, tuning

    def x_like(width=length, channels_last=False, b=batch):
        if channels_last:  # to_bcl of a channels_last (B, C, 1, L) map: strides (C·L, 1, C)
            x = torch.randn(b, 1, width, channels).to(dtype)
            return x.permute(0, 3, 1, 2)[:, :, 0]
        return torch.randn(b, channels, width).to(dtype)

    def run_self(fwd, bwd, channels_last=False, b=batch):
        x = x_like(channels_last=channels_last, b=b)
        _, stats = fwd(x, -1.0, tf32)
        bwd(x, x, stats, -1.0, tf32, [True])

    def run_co_attention(fwd, bwd, b=batch):  # q = k = X_A, v = [X_A | X_B]: one W, two outputs
        q, v = x_like(b=b), x_like(2 * length, b=b)
        _, stats = fwd(q, q, v, -1.0, tf32)
        bwd(v, q, q, v, stats, -1.0, tf32, [True, True, True])

    def run_contrastive(fwd, bwd):
        a, b, eta = x_like(), x_like(), torch.rand(batch)
        _, lse_a, lse_b = fwd(a, b, eta, -1.0, tf32)
        bwd(a, a, b, eta, lse_a, lse_b, -1.0, tf32, [True, True, True])

    runs = [
        ("self", lambda: run_self(tiled.triton_tiled_self_fwd, tiled.triton_tiled_self_bwd)),
        (
            "self channels_last",
            lambda: run_self(tiled.triton_tiled_self_fwd, tiled.triton_tiled_self_bwd, True),
        ),
        (
            "co-attention",
            lambda: run_co_attention(tiled.triton_tiled_cross_fwd, tiled.triton_tiled_cross_bwd),
        ),
        (
            "contrastive",
            lambda: run_contrastive(
                tiled.triton_tiled_contrastive_fwd, tiled.triton_tiled_contrastive_bwd
            ),
        ),
    ]
    if length <= tuning.FLASH_MAX_LENGTH:  # the flash-shaped kernels keep a whole row of q
        runs += [
            ("fa self", lambda: run_self(flash.triton_flash_self_fwd, flash.triton_flash_self_bwd)),
            (
                "fa co-attention",
                lambda: run_co_attention(
                    flash.triton_flash_cross_fwd, flash.triton_flash_cross_bwd
                ),
            ),
            (
                "fa contrastive",
                lambda: run_contrastive(
                    flash.triton_flash_contrastive_fwd, flash.triton_flash_contrastive_bwd
                ),
            ),
        ]
    else:  # where the flash-shaped kernels stop
        # The Gram kernels' launchers also run torch ops (statistics, cuBLAS products), here on
        # CPU: one batch element keeps them short (the compiled kernels do not depend on B).
        runs += [
            (
                "gram self",
                lambda: run_self(gram.triton_gram_self_fwd, gram.triton_gram_self_bwd, b=1),
            ),
            (
                "gram co-attention",
                lambda: run_co_attention(
                    gram.triton_gram_cross_fwd, gram.triton_gram_cross_bwd, b=1
                ),
            ),
        ]
    return runs


def find_kernels() -> dict:
    """{(module, name): JITFunction} of every kernel the Triton backend launches."""
    import importlib

    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    found = {}
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(module_name)
        for name, obj in vars(module).items():
            if isinstance(obj, (JITFunction, Autotuner)) and name.endswith("_kernel"):
                found[(module, name)] = obj
    return found


def jit_function(fn):
    """The JITFunction under an autotuned kernel (or the kernel itself)."""
    from triton.runtime.autotuner import Autotuner

    return fn.fn if isinstance(fn, Autotuner) else fn


def qualified(fn) -> str:
    """'triton_flash._fwd_kernel': the implementation's name and the kernel's (two families both
    have a _fwd_kernel)."""
    return f"triton_{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"


def selected(fn, patterns) -> bool:
    """Whether `--kernel` patterns (substrings of the qualified name; none: all) take `fn`."""
    return not patterns or any(p in qualified(jit_function(fn)) for p in patterns)


def compile_all(args) -> tuple[list[dict], list[dict]]:
    """(a record per compiled kernel, a record per workload whose kernels refused the arch:
    the flash-shaped kernels raise DoesNotFit where no tile config fits its shared memory)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    if triton.knobs.runtime.interpret:
        raise SystemExit("kernel_resources: unset TRITON_INTERPRET (kernels must be JIT functions)")
    from fgattn.ops.triton import library, tuning

    kernels = find_kernels()
    smem_limit, target_arch = tuning.shared_memory_limit, tuning.target_arch
    check_device = library.check_device
    log, records, refused, seen = [], [], [], set()
    # The active driver, restored afterwards without creating one (reset_active() needs a real GPU):
    # Triton >= 3.5 keeps it in `_active` (None until first use), 3.4 in a plain `active`.
    active_attr = "_active" if hasattr(driver, "_active") else "active"
    previous_driver = getattr(driver, active_attr)
    try:
        library.check_device = lambda *xs: None  # CPU tensors stand in for CUDA ones
        for (module, name), fn in kernels.items():
            wanted = selected(fn, args.kernel)
            setattr(module, name, Recorder(fn, log, wanted, args.first_config))
        for arch in args.arch:
            driver.set_active(StubDriver(GPUTarget("cuda", arch, 32)))
            limit = ARCH_LIMITS[arch]["smem_block"]
            tuning.shared_memory_limit = lambda device, limit=limit: limit  # tiles as there
            tuning.target_arch = lambda device, arch=arch: arch  # the flash kernels' configs
            for fn in map(jit_function, kernels.values()):  # binders and caches hold the target
                fn.device_caches = defaultdict(fn.create_binder)
            variants = [(d, False) for d in args.dtype if not (arch < 80 and d == "bf16")]
            if args.tf32 and "fp32" in args.dtype:
                variants.append(("fp32", True))
            for dname, tf32 in variants:
                for length in args.length:
                    for label, run in workloads(
                        DTYPES[dname], tf32, length, args.channels, args.batch
                    ):
                        if args.workload and not label.startswith(tuple(args.workload)):
                            continue
                        variant = {"arch": arch, "dtype": dname + ("+tf32" if tf32 else "")}
                        try:
                            run()
                        except tuning.DoesNotFit as err:
                            where = {"L": length, "workload": label, "reason": str(err)}
                            refused.append(variant | where)
                        for fn, grid, kwargs, compiled, secs in log:
                            if (arch, id(compiled)) in seen:  # same specialisation, cached
                                continue
                            seen.add((arch, id(compiled)))
                            records.append(
                                describe(compiled, fn, grid, kwargs, secs)
                                | variant
                                | {"L": length, "workload": label}
                            )
                        log.clear()
    finally:
        for (module, name), fn in kernels.items():
            setattr(module, name, fn)
        library.check_device = check_device
        setattr(driver, active_attr, previous_driver)
        tuning.shared_memory_limit = smem_limit
        tuning.target_arch = target_arch
    return records, refused


def describe(compiled, fn, grid, kwargs, secs) -> dict:
    arch = compiled.metadata.target.arch
    limits = ARCH_LIMITS[arch]
    usage = resource_usage(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    # Which matrix instructions ptxas got: Hopper's warpgroup MMA, Ampere-style mma.sync, or
    # none (exact-fp32 tl.dot runs on FMA units).
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "fma"
    # How tiles reach shared memory: Hopper's TMA unit (bulk tensor copies from descriptors),
    # cp.async (Ampere's asynchronous copies, what software pipelining emits), or neither
    loads = "tma" if "cp.async.bulk.tensor" in ptx else "cp.async" if "cp.async" in ptx else "-"
    warps = compiled.metadata.num_warps
    shared = compiled.metadata.shared
    by_regs = limits["regs_sm"] // (usage["regs"] * 32 * warps)
    by_smem = limits["smem_sm"] // shared if shared else by_regs
    return {
        "kernel": qualified(fn),
        "grid": list(grid),
        "blocks": {k: v for k, v in kwargs.items() if k.startswith("BLOCK_")},
        "precision": kwargs.get("PRECISION"),
        "num_warps": warps,
        "num_stages": compiled.metadata.num_stages,
        "shared_bytes": shared,
        **usage,
        "mma": mma,
        "loads": loads,
        "use_tma": kwargs.get("USE_TMA"),
        "global_scratch_bytes": getattr(compiled.metadata, "global_scratch_size", 0),
        "blocks_per_sm": min(by_regs, by_smem),
        "smem_ok": shared <= limits["smem_block"],
        "compile_s": round(secs, 2),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    records, refused = compile_all(args)
    print(
        f"{'arch':>4} {'dtype':9}{'L':>4} {'workload':19}{'kernel':45}{'blocks':24}"
        f"{'warps':>5}{'stages':>7}{'smem KB':>8}{'regs':>5}{'spill':>6}{'stack':>6}{'blk/SM':>7}"
        "  mma      loads"
    )
    for r in records:
        blocks = "x".join(str(v) for v in r["blocks"].values())
        print(
            f"{r['arch']:>4} {r['dtype']:9}{r['L']:>4} {r['workload']:19}{r['kernel']:45}"
            f"{blocks:24}{r['num_warps']:>5}{r['num_stages']:>7}{r['shared_bytes'] / 1024:8.1f}"
            f"{r['regs']:>5}"
            f"{r['local_bytes']:>6}{r['stack_bytes']:>6}{r['blocks_per_sm']:>7}  {r['mma']:9}"
            f"{r['loads']}"
            f"{'' if r['smem_ok'] else '  SMEM!'}"
        )
    kernels = find_kernels().values()
    names = sorted({qualified(jit_function(fn)) for fn in kernels if selected(fn, args.kernel)})
    compiled = sorted({r["kernel"] for r in records})
    print(f"\n{len(records)} kernels compiled for sm_{args.arch}; kernels: {', '.join(compiled)}")
    for r in refused:
        print(f"refused: sm_{r['arch']} {r['dtype']} L={r['L']} {r['workload']}: {r['reason']}")
    if args.json:
        meta = {"triton": __import__("triton").__version__, "command": " ".join(sys.argv)}
        with open(args.json, "w") as f:
            result = {"meta": meta, "kernels": names, "records": records, "refused": refused}
            json.dump(result, f, indent=1)
    bad = [r for r in records if not r["smem_ok"]]
    if args.check and (bad or (compiled != names and not args.workload)):
        print(f"kernel_resources: {len(bad)} over the shared-memory limit; "
              f"not launched: {sorted(set(names) - set(compiled))}", file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
