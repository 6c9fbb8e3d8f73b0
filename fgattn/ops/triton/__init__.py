"""fgattn's fused Triton kernels, one module per kernel family, each an implementation of the ops:

- `tiled`: "triton_tiled", the first family, any L (tiles by rule);
- `flash`: "triton_flash", FlashAttention-2-shaped, L ≤ 256 (autotuned, TMA loads on sm_90);
- `gram`: "triton_gram", the logits as an fp32 Gram GEMM, for L > 256 (autotuned).

Beside them: `language` (the `@triton.jit` helpers they share), `tuning` (config spaces, resource
estimates, prunes, the autotune decorator, TMA launches) and `library` (where the kernels run,
input preparation, the `torch.library` registration of each family's ops). Each family's ops are
``fgattn::{family}_{op}_fwd`` / ``_bwd``, e.g. ``fgattn::triton_flash_self_fwd``.

The kernels run on CUDA tensors, and on CPU tensors only under Triton's interpreter
(``TRITON_INTERPRET=1`` set before fgattn is imported), which is how CI tests them.
"""
