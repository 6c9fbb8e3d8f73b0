// TEST-ONLY: runs the CUDA kernel bodies of kernels.cuh on the CPU, one block at a time with
// kThreads std::threads and a barrier for __syncthreads, as the library "fgattn_cuda_emu" with the
// same schemas as "fgattn_cuda". It lets the tests check the kernels' index math, masking, shared
// memory phases and the backward derivations against the reference without a GPU. Slow by design
// (thousands of thread switches per block); never part of the shipped extension.
#include <torch/library.h>

#include <thread>
#include <vector>

#include "kernels.cuh"
#include "schema.h"

namespace fgattn {

// Every thread walks the whole grid in order; the barrier after each block keeps the blocks (and
// their FG_SHARED statics) apart.
template <class Body>
void emulate(int64_t gx, int64_t gy, int64_t gz, const Body& body) {
  Barrier bar(kThreads);
  std::vector<std::thread> threads;
  threads.reserve(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int64_t z = 0; z < gz; ++z)
        for (int64_t y = 0; y < gy; ++y)
          for (int64_t x = 0; x < gx; ++x) {
            const Ctx ctx{t, int(x), int(y), int(z), &bar};
            body(ctx);
            bar.wait();
          }
    });
  }
  for (auto& th : threads) th.join();
}

}  // namespace fgattn

#define FG_DEVICE_OK(t) ((t).is_cpu())
#define FG_DEVICE_NAME "CPU (emulation)"
#define FG_GUARD(t) (void)0
#define FG_LAUNCH1(NAME, T, TC, G, P) \
  emulate(G.x, G.y, G.z, [&](const Ctx& ctx_) { NAME##_body<T, TC>(ctx_, P); })

#include "ops_impl.h"

TORCH_LIBRARY(fgattn_cuda_emu, m) { fgattn::define_ops(m); }

TORCH_LIBRARY_IMPL(fgattn_cuda_emu, CPU, m) {
  m.impl("channel_attention_fwd", &fgattn::channel_attention_fwd);
  m.impl("channel_attention_bwd", &fgattn::channel_attention_bwd);
  m.impl("contrastive_channel_attention_fwd", &fgattn::contrastive_channel_attention_fwd);
  m.impl("contrastive_channel_attention_bwd", &fgattn::contrastive_channel_attention_bwd);
}
