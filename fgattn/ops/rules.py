"""The rule table: where `auto` prefers which implementation, written from measurements.

Pure data: each row says where it applies (op, device, dtype, compute capability, L, C, whether a
backward follows; None: anywhere) and which implementations it prefers there, in order, with the
figures it rests on (`measured`; the commands and raw data are in benchmarks/README.md and
benchmarks/results/). The first matching row decides; within it, the first implementation that
supports the call runs, then `LAST_RESORT` (`fgattn.ops.dispatch.by_rule`).
"""

from __future__ import annotations

import dataclasses

import torch

from .call import ATTENTION, FP32, HALF, Call


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


# "tiled" in the figures is triton_tiled (its kernels, named "triton" when measured).
H100 = "H100, torch 2.11, 2026-11-23, fwd / fwd+bwd ms"
RULES = (
    Rule(("reference",), ops=(*ATTENTION, "contrastive"), dtypes=(torch.float64,),
         measured="fp64: the ground truth; no fused path is faster there"),
    # --- the contrastive op |W_A − η W_B| X_A: fgattn's Triton kernels or eager
    Rule(("triton_tiled", "reference"), ops=("contrastive",), device="cuda", dtypes=HALF,
         max_length=256,
         measured=f"{H100}: C=2048 L=196 eager 6.78 / 20.56, tiled 3.47 / 18.75; L=49 "
                  "eager 4.31 / 12.34, tiled 1.94 / 6.33; tiled needs 1/40 of the memory"),
    Rule(("triton_tiled", "reference"), ops=("contrastive",), device="cuda", dtypes=HALF,
         grad=False,
         measured=f"{H100}: C=2048 L=784 eager 16.8, tiled 15.1"),
    Rule(("reference", "triton_tiled"), ops=("contrastive",),
         measured=f"{H100}: L=784 eager f+b 2x faster than tiled (52.4 vs 100.0); fp32 "
                  "eager 6.47 / 20.06, tiled 32.34 / 128.46; CPU: Triton needs a GPU"),
    # --- self / cross attention on CUDA, fp16 and bf16: SDPA wherever its head dim allows
    Rule(("sdpa_cudnn", "sdpa_flash", "sdpa_efficient"), device="cuda", dtypes=HALF,
         min_capability=(9, 0), max_length=256, min_channels=1024,
         measured=f"{H100}: C=2048 L=196 cuDNN 0.24-0.34 / 1.67, flash 0.66 / 2.50, "
                  "tiled 1.57 / 7.02, eager 3.46 / 10.40; C=1024 L=196 cuDNN 0.22 / 0.93, "
                  "flash 0.24 / 1.09"),
    Rule(("sdpa_flash", "sdpa_cudnn", "sdpa_efficient"), device="cuda", dtypes=HALF,
         max_length=256,
         measured=f"{H100}: C=512 L=49 flash 0.18 / 0.66, cuDNN 0.19 / 0.77; L=196 flash "
                  "0.17 / 0.60, cuDNN 0.19 / 0.64. cuDNN is only measured on sm_90"),
    Rule(("triton_tiled", "reference", "sdpa_efficient"), device="cuda", dtypes=HALF, grad=True,
         measured=f"{H100}: L=784 (flash and cuDNN refuse head dims > 256) C=2048 tiled "
                  "30.85 (198 MB), eager 31.54 (2636 MB), mem-efficient 37.30; C=512 tiled "
                  "2.48, eager 2.57, mem-efficient 4.21"),
    Rule(("sdpa_efficient", "triton_tiled"), device="cuda", dtypes=HALF,
         measured=f"{H100}: L=784 forward C=2048 mem-efficient 3.84, tiled 7.49, eager "
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
    Rule(("reference", "sdpa_efficient", "triton_tiled"), device="cuda", dtypes=FP32,
         measured=f"{H100}: C=512 L=196 eager 0.30 / 0.95, mem-efficient 0.35 / 1.27; "
                  "L=784 C=2048 eager 9.67 / 30.78, mem-efficient 10.68 / 42.98, tiled 137 / 630"),
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
LAST_RESORT = ("sdpa_efficient", "triton_tiled", "sdpa_flash", "reference")


def rule_for(call: Call) -> Rule:
    """The first row of `RULES` that matches `call` (the last row matches everything)."""
    return next(r for r in RULES if r.matches(call))
