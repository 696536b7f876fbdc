// Fused flow sampler step (same semantics as kernels/sampler.py):
//   v = v_u + g (v_c - v_u)                                  (UNCOND) else v = v_c
//   ODE: out = x + dt v
//   SDE: var_t = sigma^2 t / (1 - min(t, 0.999)), a = 1 + var_t / (2t) dt,
//        c = (1 + var_t (1 - t) / (2t)) dt, s = sqrt(var_t (-dt)), mean = a x + c v,
//        out = mean + s noise; logprob[b] = -0.5 sum z^2 - N (log s + 0.5 log 2 pi), z = (out - mean) / s
// Grid (n_blocks, B): block j of sample b handles kIters * 256 * VEC consecutive elements; VEC =
// 16 / sizeof(T) when every pointer is 16-byte aligned and N % VEC == 0 (128-bit loads), else 1.
// Each block writes one fp32 partial sum; a second kernel sums the partials of a sample in a fixed
// order (deterministic, no atomics) and adds the constant term.
#include <cstdint>

#include "common.cuh"
#include "launchers.h"

namespace wmsd {
namespace {

constexpr int kThreads = 256;
constexpr int kIters = 4;
constexpr float kHalfLog2Pi = 0.91893853320467274f;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

struct Coef {
  float a, c, s;
};

__device__ __forceinline__ Coef step_coef(bool sde, float t, float tn, float sigma) {
  const float dt = tn - t;
  if (!sde) return {1.f, dt, 0.f};
  const float var_t = sigma * sigma * t / (1.f - fminf(t, 0.999f));
  return {1.f + var_t / (2.f * t) * dt, (1.f + var_t * (1.f - t) / (2.f * t)) * dt, sqrtf(var_t * -dt)};
}

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

template <typename T, int VEC, int MODE, bool UNCOND>
__global__ void __launch_bounds__(kThreads)
    flow_step_kernel(const T* __restrict__ x, const T* __restrict__ vc, const T* __restrict__ vu,
                     const T* __restrict__ noise, const T* __restrict__ xn, T* __restrict__ out,
                     float* __restrict__ part, const float* __restrict__ t_ptr, const float* __restrict__ tn_ptr,
                     float t, float tn, float g, float sigma, int64_t N, int n_blocks) {
  const int j = blockIdx.x, b = blockIdx.y;
  if (t_ptr != nullptr) {
    t = t_ptr[b];
    tn = tn_ptr[b];
  }
  const Coef k = step_coef(MODE != 0, t, tn, sigma);
  const float inv_s = MODE != 0 ? 1.f / k.s : 0.f;
  const int64_t base = static_cast<int64_t>(b) * N;
  const int64_t start = static_cast<int64_t>(j) * kIters * kThreads * VEC;
  Pack<T, VEC> px[kIters], pc[kIters], pu[kIters], pz[kIters];
  // Load phase: all loads of this thread in flight together.
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int64_t i = start + (static_cast<int64_t>(it) * kThreads + threadIdx.x) * VEC;
    if (i < N) {
      px[it] = load<T, VEC>(x + base + i);
      pc[it] = load<T, VEC>(vc + base + i);
      if (UNCOND) pu[it] = load<T, VEC>(vu + base + i);
      if (MODE == 1) pz[it] = load<T, VEC>(noise + base + i);
      if (MODE == 2) pz[it] = load<T, VEC>(xn + base + i);
    }
  }
  float acc = 0.f;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int64_t i = start + (static_cast<int64_t>(it) * kThreads + threadIdx.x) * VEC;
    if (i >= N) continue;
    Pack<T, VEC> po;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      float v = to_f32(pc[it].v[e]);
      if (UNCOND) {
        const float u = to_f32(pu[it].v[e]);
        v = u + g * (v - u);
      }
      const float mean = k.a * to_f32(px[it].v[e]) + k.c * v;
      if (MODE == 0) {
        po.v[e] = from_f32<T>(mean);
      } else if (MODE == 1) {
        po.v[e] = from_f32<T>(mean + k.s * to_f32(pz[it].v[e]));
        const float z = (to_f32(po.v[e]) - mean) * inv_s;  // score the stored (rounded) sample
        acc += z * z;
      } else {
        const float z = (to_f32(pz[it].v[e]) - mean) * inv_s;
        acc += z * z;
      }
    }
    if (MODE != 2) *reinterpret_cast<Pack<T, VEC>*>(out + base + i) = po;
  }
  if (MODE != 0) {
    acc = block_sum(acc);
    if (threadIdx.x == 0) part[static_cast<int64_t>(b) * n_blocks + j] = -0.5f * acc;
  }
}

// logprob[b] = sum_j part[b, j] - N (log s_b + 0.5 log 2 pi), one block per sample, fixed order.
__global__ void __launch_bounds__(kThreads)
    logprob_finalize_kernel(const float* __restrict__ part, float* __restrict__ logprob,
                            const float* __restrict__ t_ptr, const float* __restrict__ tn_ptr, float t,
                            float tn, float sigma, int64_t N, int n_blocks) {
  const int b = blockIdx.x;
  if (t_ptr != nullptr) {
    t = t_ptr[b];
    tn = tn_ptr[b];
  }
  float acc = 0.f;
  for (int j = threadIdx.x; j < n_blocks; j += kThreads) acc += part[static_cast<int64_t>(b) * n_blocks + j];
  acc = block_sum(acc);
  if (threadIdx.x == 0) {
    const Coef k = step_coef(true, t, tn, sigma);
    logprob[b] = acc - static_cast<float>(N) * (logf(k.s) + kHalfLog2Pi);
  }
}

struct StepArgs {
  uintptr_t x, vc, vu, noise, xn, out, part, t_ptr, tn_ptr;
  float t, tn, g, sigma;
  int64_t N;
  int n_blocks;
};

template <typename T, int VEC, int MODE, bool UNCOND>
void launch_step(const StepArgs& a, dim3 grid, cudaStream_t st) {
  flow_step_kernel<T, VEC, MODE, UNCOND><<<grid, kThreads, 0, st>>>(
      reinterpret_cast<const T*>(a.x), reinterpret_cast<const T*>(a.vc), reinterpret_cast<const T*>(a.vu),
      reinterpret_cast<const T*>(a.noise), reinterpret_cast<const T*>(a.xn), reinterpret_cast<T*>(a.out),
      reinterpret_cast<float*>(a.part), reinterpret_cast<const float*>(a.t_ptr),
      reinterpret_cast<const float*>(a.tn_ptr), a.t, a.tn, a.g, a.sigma, a.N, a.n_blocks);
}

template <typename T, int VEC>
void dispatch_mode(const StepArgs& a, int mode, bool uncond, dim3 grid, cudaStream_t st) {
  if (mode == 0) uncond ? launch_step<T, VEC, 0, true>(a, grid, st) : launch_step<T, VEC, 0, false>(a, grid, st);
  if (mode == 1) uncond ? launch_step<T, VEC, 1, true>(a, grid, st) : launch_step<T, VEC, 1, false>(a, grid, st);
  if (mode == 2) uncond ? launch_step<T, VEC, 2, true>(a, grid, st) : launch_step<T, VEC, 2, false>(a, grid, st);
}

}  // namespace

int device_count(std::string* err) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    *err = cuda_error("cudaGetDeviceCount", e);
    return 0;
  }
  return n;
}

void flow_step_plan(int64_t N, int dtype, bool aligned, int64_t* n_blocks, bool* vectorized) {
  const int V = 16 / (dtype == kFloat32 ? 4 : 2);
  *vectorized = aligned && N % V == 0;
  const int64_t per_block = static_cast<int64_t>(kIters) * kThreads * (*vectorized ? V : 1);
  *n_blocks = (N + per_block - 1) / per_block;
}

std::string flow_step(uintptr_t x, uintptr_t vc, uintptr_t vu, uintptr_t noise, uintptr_t x_next,
                      uintptr_t out, uintptr_t part, int64_t part_capacity, uintptr_t logprob, uintptr_t t_ptr,
                      uintptr_t tn_ptr, float t, float tn, float guidance, float sigma, int64_t B, int64_t N,
                      int dtype, int mode, int device, uintptr_t stream) {
  if (dtype < kFloat32 || dtype > kBFloat16) return "flow_step: dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16)";
  if (mode < 0 || mode > 2) return "flow_step: mode must be 0 (ODE), 1 (SDE sample) or 2 (SDE score)";
  if (B <= 0 || B > 65535 || N <= 0) return "flow_step: need 0 < B <= 65535 and N > 0";
  bool aligned = true;
  for (uintptr_t p : {x, vc, vu, noise, x_next, out}) aligned = aligned && (p % 16 == 0);
  int64_t n_blocks = 0;
  bool vec = false;
  flow_step_plan(N, dtype, aligned, &n_blocks, &vec);
  if (n_blocks > 0x7fffffff) return "flow_step: N too large";
  if (mode != 0 && (part == 0 || logprob == 0 || part_capacity < n_blocks))
    return "flow_step: part needs (B, " + std::to_string(n_blocks) + ") float32 and logprob (B,) float32";
  DeviceScope scope;
  std::string err = scope.enter(device);
  if (!err.empty()) return err;
  StepArgs a{x, vc, vu, noise, x_next, out, part, t_ptr, tn_ptr, t, tn, guidance, sigma, N, static_cast<int>(n_blocks)};
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const dim3 grid(static_cast<unsigned>(n_blocks), static_cast<unsigned>(B));
  const bool uncond = vu != 0;
  auto run = [&](auto tag) {
    using T = decltype(tag);
    constexpr int VV = 16 / sizeof(T);
    if (vec) dispatch_mode<T, VV>(a, mode, uncond, grid, st);
    else dispatch_mode<T, 1>(a, mode, uncond, grid, st);
  };
  if (dtype == kFloat32) run(float{});
  if (dtype == kFloat16) run(__half{});
  if (dtype == kBFloat16) run(__nv_bfloat16{});
  if (mode != 0) {
    logprob_finalize_kernel<<<static_cast<unsigned>(B), kThreads, 0, st>>>(
        reinterpret_cast<const float*>(part), reinterpret_cast<float*>(logprob),
        reinterpret_cast<const float*>(t_ptr), reinterpret_cast<const float*>(tn_ptr), t, tn, sigma, N,
        static_cast<int>(n_blocks));
  }
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? "" : cuda_error("flow_step launch", e);
}

}  // namespace wmsd
