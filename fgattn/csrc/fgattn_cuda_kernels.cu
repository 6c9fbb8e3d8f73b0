// CUDA kernels of fgattn's "cuda" backend and their TORCH_LIBRARY_IMPL(fgattn_cuda, CUDA) bindings.
// The kernel bodies live in kernels.cuh, the host wrappers in ops_impl.h (shared with the CPU
// emulation that tests them without a GPU).
// c10/cuda only (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE headers that a
// minimal toolkit lacks).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "kernels.cuh"

namespace fgattn {

#define FG_KERNEL(NAME)                                                                  \
  template <typename T, bool TC>                                                         \
  __global__ void __launch_bounds__(kThreads) NAME##_kernel(const __grid_constant__      \
                                                                NAME##_params_t<T> p) {  \
    const Ctx ctx{int(threadIdx.x), int(blockIdx.x), int(blockIdx.y), int(blockIdx.z)}; \
    NAME##_body<T, TC>(ctx, p);                                                          \
  }

template <typename T>
using ca_fwd_params_t = CaParams<T>;
template <typename T>
using ca_bwd_dq_params_t = CaParams<T>;
template <typename T>
using ca_bwd_dkdv_params_t = CaParams<T>;
template <typename T>
using co_lse_params_t = CoParams<T>;
template <typename T>
using co_fwd_params_t = CoParams<T>;
template <typename T>
using co_rowsum_params_t = CoParams<T>;
template <typename T>
using co_bwd_params_t = CoParams<T>;

FG_KERNEL(ca_fwd)
FG_KERNEL(ca_bwd_dq)
FG_KERNEL(ca_bwd_dkdv)
FG_KERNEL(co_lse)
FG_KERNEL(co_fwd)
FG_KERNEL(co_rowsum)
FG_KERNEL(co_bwd)

}  // namespace fgattn

#define FG_DEVICE_OK(t) ((t).is_cuda())
#define FG_DEVICE_NAME "CUDA"
#define FG_GUARD(t) const c10::cuda::OptionalCUDAGuard fg_guard_(device_of(t))
#define FG_LAUNCH1(NAME, T, TC, G, P)                                                        \
  do {                                                                                       \
    NAME##_kernel<T, TC><<<dim3(unsigned(G.x), unsigned(G.y), unsigned(G.z)), kThreads, 0, \
                           c10::cuda::getCurrentCUDAStream()>>>(P);                          \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                          \
  } while (0)

#include "ops_impl.h"

TORCH_LIBRARY_IMPL(fgattn_cuda, CUDA, m) {
  m.impl("channel_attention_fwd", &fgattn::channel_attention_fwd);
  m.impl("channel_attention_bwd", &fgattn::channel_attention_bwd);
  m.impl("contrastive_channel_attention_fwd", &fgattn::contrastive_channel_attention_fwd);
  m.impl("contrastive_channel_attention_bwd", &fgattn::contrastive_channel_attention_bwd);
}
