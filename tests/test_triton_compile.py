"""Every fused Triton kernel compiles for real GPUs, and fits their shared memory, with no GPU.

The interpreter tests check the kernels' arithmetic; they never run Triton's NVIDIA pipeline
(TTGIR -> LLVM -> PTX -> ptxas), where a kernel can still fail to compile or ask for more shared
memory than a GPU has, which would only show as "out of resources" at launch on that GPU.
`benchmarks/kernel_resources.py` runs fgattn's own launchers against a stub driver per target
architecture, so each kernel is compiled with the tiles, warps and specialisations it would get
there; this test runs it in a subprocess (kernels must not be interpreted) and checks the result.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_resources.py"
# Shared memory one block may opt into, per compute capability (CUDA programming guide).
SMEM_PER_BLOCK = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 90: 227 * 1024}


def _ptxas() -> Path:
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    if not _ptxas().exists():
        pytest.skip(f"Triton's NVIDIA backend has no ptxas at {_ptxas()}")
    out = tmp_path_factory.mktemp("kernels") / "resources.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(SCRIPT), "--arch", *map(str, SMEM_PER_BLOCK),
           "--dtype", "fp32", "bf16", "--length", "196", "--channels", "256", "--batch", "2",
           "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_kernel_compiles_for_every_arch(compiled):
    # triton_tiled: 5 channel-attention + 4 contrastive kernels; triton_flash: 7 + 4; gram: 6
    assert len(compiled["kernels"]) >= 26
    for arch in SMEM_PER_BLOCK:
        got = {r["kernel"] for r in compiled["records"] if r["arch"] == arch}
        missing = set(compiled["kernels"]) - got
        # the flash-shaped kernels refuse (DoesNotFit) where no tile fits, e.g. fp32 on sm_75/86
        refused = [r for r in compiled["refused"] if r["arch"] == arch]
        if refused:
            assert all(r["workload"].startswith("fa ") for r in refused), refused
            missing = {k for k in missing if not k.startswith("triton_flash")}
        # the Gram kernels are for L > 256: tests/test_triton_gram.py compiles them at L = 400
        missing = {k for k in missing if not k.startswith("triton_gram")}
        assert not missing, f"sm_{arch} never launched {missing}"


@pytest.mark.parametrize("arch", sorted(SMEM_PER_BLOCK))
def test_shared_memory_fits_the_arch(compiled, arch):
    over = [
        (r["kernel"], r["dtype"], r["blocks"], r["shared_bytes"])
        for r in compiled["records"]
        if r["arch"] == arch and r["shared_bytes"] > SMEM_PER_BLOCK[arch]
    ]
    assert not over, f"sm_{arch} allows {SMEM_PER_BLOCK[arch]} bytes per block: {over}"


def test_small_shared_memory_takes_narrower_tiles(compiled):
    """The same kernel gets a narrower fp32 tile on sm_86 (99 KiB) than on sm_90 (227 KiB)."""

    def widest(arch, dtype):
        return max(
            r["blocks"]["BLOCK_DL"]
            for r in compiled["records"]
            if r["arch"] == arch
            and r["dtype"] == dtype
            and r["kernel"] == "triton_tiled._bwd_self_kernel"
        )

    assert widest(90, "fp32") == 256
    assert widest(86, "fp32") < 256
    assert widest(86, "bf16") == 256
