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
# Bounds a hang, not a speed: the scripts take seconds on idle cores and several minutes on a
# loaded 2-core machine (importing torch and Triton's interpreter alone).
HANG_TIMEOUT_S = 1800


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT_S,
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
    proc = _run("bench_channel_attention.py", "--device", "cuda", "--quick")
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr


def test_bench_models_help():
    proc = _run("bench_models.py", "--help")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--backend" in proc.stdout


def _bench_json(path, device, rows, tf32=False):
    path.write_text(json.dumps({"meta": {"device": device, "tf32": tf32}, "rows": rows}))
    return str(path)


def _row(impl, op="self", dtype="bf16", length=196, fwd=1.0, fwd_bwd=2.0, peak=10.0, error=None):
    return {"op": op, "dtype": dtype, "B": 32, "C": 2048, "L": length, "impl": impl,
            "fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd, "peak_mb": peak, "error": error}  # fmt: skip


def test_kernel_targets_verdicts(tmp_path):
    from _scripts import load_script

    targets = load_script("benchmarks/kernel_targets.py")
    rows = [
        # L=196 bf16: triton_fa beats cuDNN forward at 0.2 ms, misses the backward ratio
        _row("sdpa_cudnn", fwd=0.25, fwd_bwd=1.6, peak=200.0),
        _row("triton_fa", fwd=0.20, fwd_bwd=1.5, peak=40.0),
        _row("triton", fwd=1.5, fwd_bwd=7.0, peak=50.0),
        _row("reference", fwd=3.4, fwd_bwd=10.0, peak=2000.0),
        # fp32: the kernel errors; eager alone is timed
        _row("triton_fa", dtype="fp32", error="error: DoesNotFit"),
        _row("reference", dtype="fp32", fwd=3.3, fwd_bwd=10.0, peak=2100.0),
        # contrastive: 6.5x eager but over the H100 budget of 3.0 ms
        _row("triton", op="contrastive", fwd=2.0, fwd_bwd=3.2, peak=1000.0),
        _row("reference", op="contrastive", fwd=7.0, fwd_bwd=21.0, peak=3000.0),
    ]
    tf32 = [_row("triton_fa", dtype="fp32", fwd_bwd=9.0), _row("reference", dtype="fp32")]
    files = [_bench_json(tmp_path / "a.json", "NVIDIA H100 80GB HBM3", rows)]
    files.append(_bench_json(tmp_path / "b.json", "NVIDIA H100 80GB HBM3", tf32, tf32=True))
    rows_read, h100 = targets.load_rows(files)
    assert h100 and len(rows_read) == len(rows) + len(tf32)
    verdicts = {r["target"]: r["verdict"] for r in map(
        lambda t: targets.check_target(t, rows_read, h100), targets.TARGETS)}  # fmt: skip
    assert verdicts["self L=196 forward (cuDNN parity)"] == "met"
    assert verdicts["self L=196 fwd+bwd (>= 1.4x cuDNN)"] == "missed"  # 1.5 > 1.6 / 1.4
    assert verdicts["self L=784 forward (>= 3.8x mem-efficient)"] == "not measured"
    assert verdicts["contrastive L=196 fwd+bwd (>= 6x eager)"] == "missed"  # 3.2 ms > 3.0
    assert verdicts["fp32 exact self L=196 fwd+bwd (<= eager)"] == "not measured"
    assert verdicts["fp32 TF32 self L=196 fwd+bwd (<= eager, TF32)"] == "missed"  # 9.0 > 2.0
    # memory: 40 / 2000 at self bf16 met; contrastive 1000 / 3000 missed
    memory = {m["size"][0]: m["verdict"] for m in targets.check_memory(rows)}
    assert memory == {"self": "met", "contrastive": "missed"}
    # off the H100 the ms budgets are not checked: the contrastive 6.6x is met
    files[0] = _bench_json(tmp_path / "c.json", "NVIDIA A100-SXM4-80GB", rows)
    assert (
        "| contrastive L=196 fwd+bwd (>= 6x eager) | triton | 3.200 | 21.000 | 0.152 | met |"
        in (targets.report(files[:1]))
    )
