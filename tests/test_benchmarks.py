"""The benchmark scripts run end to end on CPU (tiny sizes; the figures themselves are not checked).

The subprocess inherits TRITON_INTERPRET=1 from conftest where there is no GPU, so the Triton
kernels are CPU candidates there, through the interpreter.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
OPS = ("self", "cross", "contrastive")


def _run(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_bench_channel_attention_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--device", "cpu", "--batch", "2", "--channels", "32", "--length", "7"]
    args += ["--dtype", "fp32", "--iters", "2", "--warmup", "1", "--out", str(out)]
    proc = _run("bench_channel_attention.py", *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "auto within 10 % of the fastest candidate:" in proc.stdout
    result = json.loads(out.read_text())
    assert result["complete"]
    assert {"device", "date", "torch", "triton", "command"} <= result["meta"].keys()
    rows = result["rows"]
    for op in OPS:
        impls = {row["impl"] for row in rows if row["op"] == op}
        assert "reference" in impls and "auto" in impls, (op, impls)
        if op != "contrastive":  # SDPA runs self and cross attention only
            assert "sdpa_flash" in impls, (op, impls)
    for row in rows:
        if row["error"] is None:
            assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0, row
            assert row["peak_mb"] is None, row  # CUDA only
    assert len(result["sizes"]) == len(OPS)
    for size in result["sizes"]:
        for metric in ("fwd", "fwd_bwd"):
            assert size[f"auto_{metric}"] in size[f"candidates_{metric}"], size
        auto = next(r for r in rows if r["impl"] == "auto" and r["op"] == size["op"])
        assert auto["auto_fwd"] == size["auto_fwd"] and auto["error"] is None, auto
        assert auto["auto_fwd_bwd"] in size["candidates_fwd_bwd"], auto


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_bench_channel_attention_needs_a_gpu_for_cuda():
    proc = _run("bench_channel_attention.py", "--device", "cuda", "--quick", timeout=60)
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr


def test_bench_models_help():
    proc = _run("bench_models.py", "--help", timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--backend" in proc.stdout
