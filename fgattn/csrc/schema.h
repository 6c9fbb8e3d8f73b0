// Operator schemas of fgattn's CUDA backend, shared by the real library (fgattn_cuda) and the CPU
// emulation used in tests (fgattn_cuda_emu). The Python side (fgattn/ops/cuda_backend.py) adds
// the fake (shape) and autograd registrations.
// tf32: fp32 inputs may use the TF32 tensor cores (bf16/fp16 always do: their products are exact
// in TF32).
#pragma once

#include <torch/library.h>

namespace fgattn {

inline void define_ops(torch::Library& m) {
  // out (B, C, Lv) in v's dtype, lse (B, C) fp32
  m.def(
      "channel_attention_fwd(Tensor q, Tensor k, Tensor v, float scale, bool tf32) -> "
      "(Tensor, Tensor)");
  // dq, dk, dv
  m.def(
      "channel_attention_bwd(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "float scale, bool tf32) -> (Tensor, Tensor, Tensor)");
  // out (B, C, L) in x_a's dtype, lse_a, lse_b (B, C) fp32
  m.def(
      "contrastive_channel_attention_fwd(Tensor x_a, Tensor x_b, Tensor eta, float scale, "
      "bool tf32) -> (Tensor, Tensor, Tensor)");
  // dx_a, dx_b, deta
  m.def(
      "contrastive_channel_attention_bwd(Tensor grad, Tensor x_a, Tensor x_b, Tensor eta, "
      "Tensor lse_a, Tensor lse_b, float scale, bool tf32) -> (Tensor, Tensor, Tensor)");
}

}  // namespace fgattn
