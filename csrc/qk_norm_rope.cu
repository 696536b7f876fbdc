// Fused QK RMSNorm (+weight) and interleaved 3D RoPE, in place, q and k in one launch
// (same math as kernels/qk_norm_rope.py):
//   y = x * rsqrt(mean(x^2) + eps) * w      mean over one head's D features (norm_all = false)
//                                           or over the token's H * D features (norm_all = true)
//   out[2i] = y[2i] cos_i - y[2i+1] sin_i,  out[2i+1] = y[2i] sin_i + y[2i+1] cos_i
// Grid (B * S, 2): block (token, which) handles one token of q (which = 0) or k (which = 1).
// Pass 1 reduces the sums of squares (per head: one warp per head, warp shuffle; all heads: block
// reduction), pass 2 re-reads the token (an L1/L2 hit), applies norm, weight and rotation, writes.
// Each element is read and written by the same thread, so in place is safe.
#include <cstdint>

#include "common.cuh"
#include "launchers.h"

namespace wmsd {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxHeads = 1024;

struct QKArgs {
  uintptr_t ptr[2], w[2];
  int64_t H[2], sb[2], ss[2], sh[2];
  const float* cos;
  const float* sin;
  int64_t S, D;
  float eps;
};

template <typename T, bool NORM_ALL>
__global__ void __launch_bounds__(kThreads) qk_norm_rope_kernel(QKArgs a) {
  __shared__ float rstd_h[kMaxHeads];
  const int which = blockIdx.y;
  const int64_t token = blockIdx.x, bi = token / a.S, si = token % a.S;
  const int64_t H = a.H[which], half = a.D / 2, pairs = H * half;
  T* base = reinterpret_cast<T*>(a.ptr[which]) + bi * a.sb[which] + si * a.ss[which];
  const float* w = reinterpret_cast<const float*>(a.w[which]);
  const int64_t sh = a.sh[which];
  float rstd_all = 0.f;
  if (NORM_ALL) {
    float acc = 0.f;
    for (int64_t p = threadIdx.x; p < pairs; p += kThreads) {
      const T* e = base + (p / half) * sh + 2 * (p % half);
      const float x0 = to_f32(e[0]), x1 = to_f32(e[1]);
      acc += x0 * x0 + x1 * x1;
    }
    rstd_all = rsqrtf(block_sum(acc) / static_cast<float>(H * a.D) + a.eps);
  } else {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int64_t h = warp; h < H; h += kThreads / 32) {
      float acc = 0.f;
      for (int64_t i = lane; i < half; i += 32) {
        const float x0 = to_f32(base[h * sh + 2 * i]), x1 = to_f32(base[h * sh + 2 * i + 1]);
        acc += x0 * x0 + x1 * x1;
      }
      acc = warp_sum(acc);
      if (lane == 0) rstd_h[h] = rsqrtf(acc / static_cast<float>(a.D) + a.eps);
    }
    __syncthreads();
  }
  const float* cs = a.cos + si * half;
  const float* sn = a.sin + si * half;
  for (int64_t p = threadIdx.x; p < pairs; p += kThreads) {
    const int64_t h = p / half, i = p % half;
    T* e = base + h * sh + 2 * i;
    const float r = NORM_ALL ? rstd_all : rstd_h[h];
    const int64_t wi = NORM_ALL ? h * a.D + 2 * i : 2 * i;
    const float y0 = to_f32(e[0]) * r * w[wi], y1 = to_f32(e[1]) * r * w[wi + 1];
    const float c = cs[i], s = sn[i];
    e[0] = from_f32<T>(y0 * c - y1 * s);
    e[1] = from_f32<T>(y0 * s + y1 * c);
  }
}

template <typename T>
void launch(const QKArgs& a, bool norm_all, dim3 grid, cudaStream_t st) {
  if (norm_all) qk_norm_rope_kernel<T, true><<<grid, kThreads, 0, st>>>(a);
  else qk_norm_rope_kernel<T, false><<<grid, kThreads, 0, st>>>(a);
}

}  // namespace

std::string qk_norm_rope(uintptr_t q, uintptr_t k, uintptr_t wq, uintptr_t wk, uintptr_t cos,
                         uintptr_t sin, int64_t B, int64_t S, int64_t Hq, int64_t Hk, int64_t D,
                         int64_t qsb, int64_t qss, int64_t qsh, int64_t ksb, int64_t ksh_s, int64_t ksh,
                         float eps, bool norm_all, int dtype, int device, uintptr_t stream) {
  if (dtype < kFloat32 || dtype > kBFloat16) return "qk_norm_rope: dtype code must be 0, 1 or 2";
  if (B <= 0 || S <= 0 || D <= 0 || D % 2 != 0) return "qk_norm_rope: need B, S > 0 and D even";
  if (Hq <= 0 || Hk <= 0 || Hq > kMaxHeads || Hk > kMaxHeads) return "qk_norm_rope: need 0 < H <= 1024";
  if (B * S > 0x7fffffff) return "qk_norm_rope: B * S too large";
  DeviceScope scope;
  std::string err = scope.enter(device);
  if (!err.empty()) return err;
  QKArgs a{{q, k}, {wq, wk}, {Hq, Hk}, {qsb, ksb}, {qss, ksh_s}, {qsh, ksh},
           reinterpret_cast<const float*>(cos), reinterpret_cast<const float*>(sin), S, D, eps};
  const dim3 grid(static_cast<unsigned>(B * S), 2);
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  if (dtype == kFloat32) launch<float>(a, norm_all, grid, st);
  if (dtype == kFloat16) launch<__half>(a, norm_all, grid, st);
  if (dtype == kBFloat16) launch<__nv_bfloat16>(a, norm_all, grid, st);
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? "" : cuda_error("qk_norm_rope launch", e);
}

}  // namespace wmsd
