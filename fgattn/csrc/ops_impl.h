// Host-side implementations of the ops declared in schema.h: checks, allocation, launches.
// Included by fgattn_cuda_kernels.cu (launches real kernels) and by cpu_emulation.cpp (runs the
// same kernel bodies on CPU threads); the includer defines FG_LAUNCH1, FG_DEVICE_OK, FG_GUARD.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <tuple>
#include <type_traits>

#include "kernels.cuh"

namespace fgattn {

using at::Tensor;

struct Grid {
  int64_t x, y, z;
};

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Kernel NAME for scalar type T on the grid: tensor cores (TC) for fp16/bf16 always, for fp32
// only when TF32 is allowed (the plain-FMA fp32 instantiation keeps exact fp32 products). The
// generic lambda makes `if constexpr` discard the <fp16/bf16, FMA> branch (the dispatch lambda
// around it is not a template, where a discarded branch would still be instantiated).
#define FG_LAUNCH(NAME, T, GRID, P, TF32)             \
  [&](auto type_tag_) {                               \
    using T_ = typename decltype(type_tag_)::type;    \
    const Grid g_ = GRID;                             \
    if constexpr (std::is_same_v<T_, float>) {        \
      if (TF32)                                       \
        FG_LAUNCH1(NAME, T_, true, g_, P);            \
      else                                            \
        FG_LAUNCH1(NAME, T_, false, g_, P);           \
    } else {                                          \
      FG_LAUNCH1(NAME, T_, true, g_, P);              \
    }                                                 \
  }(std::type_identity<T>{})

// One switch for the three dtypes the kernels support; float64 goes to the reference in Python.
#define FG_DISPATCH(TYPE, NAME, ...)                                                   \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

template <typename T>
Mat<T> mat(const Tensor& t) {
  return Mat<T>{t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2), int(t.size(1)),
                int(t.size(2))};
}

inline void check_bcl(const Tensor& t, const char* name, const Tensor& like) {
  TORCH_CHECK(t.dim() == 3, "fgattn cuda: ", name, " must be (B, C, L), got shape ", t.sizes());
  TORCH_CHECK(FG_DEVICE_OK(t), "fgattn cuda: ", name, " must be a ", FG_DEVICE_NAME,
              " tensor, got device ", t.device());
  TORCH_CHECK(t.device() == like.device(), "fgattn cuda: ", name, " is on ", t.device(),
              ", expected ", like.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "fgattn cuda: ", name, " has dtype ",
              t.scalar_type(), ", expected ", like.scalar_type(), " (one dtype per call)");
  TORCH_CHECK(t.size(0) == like.size(0) && t.size(1) == like.size(1), "fgattn cuda: ", name,
              " has shape ", t.sizes(), ", expected batch and channels of ", like.sizes());
  TORCH_CHECK(t.numel() > 0, "fgattn cuda: ", name, " is empty (use the torch backend)");
  TORCH_CHECK(t.size(1) < (1 << 30) && t.size(2) < (1 << 30) && t.size(0) <= 65535,
              "fgattn cuda: ", name, " too large: ", t.sizes());
}

inline Tensor rows_f32(const Tensor& t, const Tensor& like, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == like.size(0) && t.size(1) == like.size(1),
              "fgattn cuda: ", name, " must be (B, C) = ", like.sizes().slice(0, 2), ", got ",
              t.sizes());
  return t.to(t.options().dtype(at::kFloat)).contiguous();
}

inline std::tuple<Tensor, Tensor> channel_attention_fwd(const Tensor& q, const Tensor& k,
                                                        const Tensor& v, double scale,
                                                        bool tf32) {
  check_bcl(q, "q", q);
  check_bcl(k, "k", q);
  check_bcl(v, "v", q);
  TORCH_CHECK(k.size(2) == q.size(2), "fgattn cuda: k must have q's length, got ", k.sizes(),
              " and ", q.sizes());
  FG_GUARD(q);
  const int64_t B = q.size(0), C = q.size(1), Lv = v.size(2);
  Tensor out = at::empty({B, C, Lv}, v.options());
  Tensor lse = at::empty({B, C}, q.options().dtype(at::kFloat));
  FG_DISPATCH(q.scalar_type(), "fgattn_channel_attention_fwd", [&] {
    CaParams<scalar_t> p{};
    p.q = mat<scalar_t>(q);
    p.k = mat<scalar_t>(k);
    p.v = mat<scalar_t>(v);
    p.out = out.data_ptr<scalar_t>();
    p.lse_out = lse.data_ptr<float>();
    p.C = int(C);
    p.L = int(q.size(2));
    p.Lv = int(Lv);
    p.scale = float(scale);
    FG_LAUNCH(ca_fwd, scalar_t, (Grid{cdiv(C, kBM), cdiv(Lv, kBD * kNPFwd), B}), p, tf32);
  });
  return {out, lse};
}

inline std::tuple<Tensor, Tensor, Tensor> channel_attention_bwd(const Tensor& grad,
                                                                const Tensor& q, const Tensor& k,
                                                                const Tensor& v, const Tensor& out,
                                                                const Tensor& lse, double scale,
                                                                bool tf32) {
  check_bcl(q, "q", q);
  check_bcl(k, "k", q);
  check_bcl(v, "v", q);
  TORCH_CHECK(grad.sizes() == v.sizes() && out.sizes() == v.sizes(),
              "fgattn cuda: grad and out must have v's shape ", v.sizes());
  FG_GUARD(q);
  const Tensor g = grad.to(v.scalar_type());
  check_bcl(g, "grad", q);
  const int64_t B = q.size(0), C = q.size(1), L = q.size(2), Lv = v.size(2);
  // δ_i = Σ_k p_ik dp_ik = grad_i · out_i: a (B, C) reduction, cheap next to the C x C work.
  const Tensor delta = (g.to(at::kFloat) * out.to(at::kFloat)).sum(-1).contiguous();
  const Tensor lse32 = rows_f32(lse, q, "lse");
  Tensor dq = at::empty({B, C, L}, q.options());
  Tensor dk = at::empty({B, C, L}, q.options());
  Tensor dv = at::empty({B, C, Lv}, q.options());
  FG_DISPATCH(q.scalar_type(), "fgattn_channel_attention_bwd", [&] {
    CaParams<scalar_t> p{};
    p.q = mat<scalar_t>(q);
    p.k = mat<scalar_t>(k);
    p.v = mat<scalar_t>(v);
    p.g = mat<scalar_t>(g);
    p.lse = lse32.data_ptr<float>();
    p.delta = delta.data_ptr<float>();
    p.C = int(C);
    p.L = int(L);
    p.Lv = int(Lv);
    p.scale = float(scale);
    p.out = dq.data_ptr<scalar_t>();
    FG_LAUNCH(ca_bwd_dq, scalar_t, (Grid{cdiv(C, kBM), cdiv(L, kBD * kNPDq), B}), p, tf32);
    p.out = dk.data_ptr<scalar_t>();
    p.out2 = dv.data_ptr<scalar_t>();
    const int64_t tiles = cdiv(std::max(L, Lv), kBD * kNPDkdv);
    FG_LAUNCH(ca_bwd_dkdv, scalar_t, (Grid{cdiv(C, kBN), tiles, B}), p, tf32);
  });
  return {dq, dk, dv};
}

inline Tensor eta_f32(const Tensor& eta, const Tensor& x_a) {
  TORCH_CHECK(eta.dim() == 1 && eta.size(0) == x_a.size(0) && eta.device() == x_a.device(),
              "fgattn cuda: eta must be (B,) = (", x_a.size(0), ",) on ", x_a.device(), ", got ",
              eta.sizes(), " on ", eta.device());
  return eta.to(at::kFloat).contiguous();
}

inline std::tuple<Tensor, Tensor, Tensor> contrastive_channel_attention_fwd(const Tensor& x_a,
                                                                            const Tensor& x_b,
                                                                            const Tensor& eta,
                                                                            double scale,
                                                                            bool tf32) {
  check_bcl(x_a, "x_a", x_a);
  check_bcl(x_b, "x_b", x_a);
  TORCH_CHECK(x_b.size(2) == x_a.size(2), "fgattn cuda: x_b must have x_a's shape");
  FG_GUARD(x_a);
  const int64_t B = x_a.size(0), C = x_a.size(1), L = x_a.size(2);
  const Tensor eta32 = eta_f32(eta, x_a);
  Tensor out = at::empty({B, C, L}, x_a.options());
  Tensor lse_a = at::empty({B, C}, x_a.options().dtype(at::kFloat));
  Tensor lse_b = at::empty({B, C}, x_a.options().dtype(at::kFloat));
  FG_DISPATCH(x_a.scalar_type(), "fgattn_contrastive_fwd", [&] {
    CoParams<scalar_t> p{};
    p.a = mat<scalar_t>(x_a);
    p.xb = mat<scalar_t>(x_b);
    p.eta = eta32.data_ptr<float>();
    p.C = int(C);
    p.L = int(L);
    p.scale = float(scale);
    p.lse_out_a = lse_a.data_ptr<float>();
    p.lse_out_b = lse_b.data_ptr<float>();
    FG_LAUNCH(co_lse, scalar_t, (Grid{cdiv(C, kBM), 2, B}), p, tf32);
    p.lse_a = lse_a.data_ptr<float>();
    p.lse_b = lse_b.data_ptr<float>();
    p.out = out.data_ptr<scalar_t>();
    FG_LAUNCH(co_fwd, scalar_t, (Grid{cdiv(C, kBM), cdiv(L, kBD * kNPFwd), B}), p, tf32);
  });
  return {out, lse_a, lse_b};
}

inline std::tuple<Tensor, Tensor, Tensor> contrastive_channel_attention_bwd(
    const Tensor& grad, const Tensor& x_a, const Tensor& x_b, const Tensor& eta,
    const Tensor& lse_a, const Tensor& lse_b, double scale, bool tf32) {
  check_bcl(x_a, "x_a", x_a);
  check_bcl(x_b, "x_b", x_a);
  TORCH_CHECK(grad.sizes() == x_a.sizes() && x_b.sizes() == x_a.sizes(),
              "fgattn cuda: grad and x_b must have x_a's shape ", x_a.sizes());
  FG_GUARD(x_a);
  const Tensor g = grad.to(x_a.scalar_type());
  const int64_t B = x_a.size(0), C = x_a.size(1), L = x_a.size(2);
  const Tensor eta32 = eta_f32(eta, x_a);
  const Tensor la = rows_f32(lse_a, x_a, "lse_a"), lb = rows_f32(lse_b, x_a, "lse_b");
  Tensor delta = at::empty({B, C}, x_a.options().dtype(at::kFloat));
  Tensor eps = at::empty({B, C}, x_a.options().dtype(at::kFloat));
  Tensor da = at::empty({B, C, L}, x_a.options());
  Tensor db = at::empty({B, C, L}, x_a.options());
  FG_DISPATCH(x_a.scalar_type(), "fgattn_contrastive_bwd", [&] {
    CoParams<scalar_t> p{};
    p.a = mat<scalar_t>(x_a);
    p.xb = mat<scalar_t>(x_b);
    p.g = mat<scalar_t>(g);
    p.eta = eta32.data_ptr<float>();
    p.lse_a = la.data_ptr<float>();
    p.lse_b = lb.data_ptr<float>();
    p.C = int(C);
    p.L = int(L);
    p.scale = float(scale);
    p.delta_out = delta.data_ptr<float>();
    p.eps_out = eps.data_ptr<float>();
    FG_LAUNCH(co_rowsum, scalar_t, (Grid{cdiv(C, kBM), 1, B}), p, tf32);
    p.delta = delta.data_ptr<float>();
    p.eps = eps.data_ptr<float>();
    p.out = da.data_ptr<scalar_t>();
    p.out2 = db.data_ptr<scalar_t>();
    FG_LAUNCH(co_bwd, scalar_t, (Grid{cdiv(C, kBN), cdiv(L, kBD), B}), p, tf32);
  });
  Tensor deta = (-eps.sum(1)).to(eta.scalar_type());  // dη = −Σ_i ε_i
  return {da, db, deta};
}

}  // namespace fgattn
