// Host launchers of the CUDA kernels, callable from plain C++ (bindings.cpp is compiled without CUDA
// headers). Every pointer is a raw device address; every launcher returns "" on success or an error
// message (CUDA's error string, or a description of the bad argument).
#pragma once
#include <cstdint>
#include <string>

namespace wmsd {

// dtype codes shared with kernels/cuda.py
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Number of visible CUDA devices; fills err when the runtime cannot talk to a driver.
int device_count(std::string* err);

// Flow sampler step, see kernels/sampler.py. mode 0: ODE (out = x + dt v); 1: SDE with noise
// (out = mean + s noise, log-prob); 2: log-prob of the given x_next (no store). Tensors (B, N)
// contiguous, all of dtype `dtype`; absent ones are 0. t_ptr/tn_ptr: (B,) float32 per-sample times,
// or 0 to use t/tn. part: (B, part_capacity) float32 scratch with part_capacity >= n_blocks of
// flow_step_plan; logprob: (B,) float32 (modes 1 and 2).
void flow_step_plan(int64_t N, int dtype, bool aligned, int64_t* n_blocks, bool* vectorized);
std::string flow_step(uintptr_t x, uintptr_t vc, uintptr_t vu, uintptr_t noise, uintptr_t x_next,
                      uintptr_t out, uintptr_t part, int64_t part_capacity, uintptr_t logprob, uintptr_t t_ptr,
                      uintptr_t tn_ptr, float t, float tn, float guidance, float sigma, int64_t B, int64_t N,
                      int dtype, int mode, int device, uintptr_t stream);

// In-place fused RMSNorm (+weight) and interleaved RoPE of q (B,S,Hq,D) and k (B,S,Hk,D), one
// launch. Strides in elements for the (b, s, h) dims; the last dim is contiguous. w: float32 (D,)
// (norm_all = false) or (H*D,) (norm_all = true); cos/sin: float32 (S, D/2) contiguous.
std::string qk_norm_rope(uintptr_t q, uintptr_t k, uintptr_t wq, uintptr_t wk, uintptr_t cos,
                         uintptr_t sin, int64_t B, int64_t S, int64_t Hq, int64_t Hk, int64_t D,
                         int64_t qsb, int64_t qss, int64_t qsh, int64_t ksb, int64_t kss, int64_t ksh,
                         float eps, bool norm_all, int dtype, int device, uintptr_t stream);

}  // namespace wmsd
