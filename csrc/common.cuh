// Shared device helpers: fp32 conversion of the I/O dtypes, warp and block sum reductions.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

namespace wmsd {

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, <= 1024); every thread gets the result.
// Fixed reduction tree: deterministic.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float smem[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < nwarps ? smem[lane] : 0.f;
  return warp_sum(v);
}

inline std::string cuda_error(const char* what, cudaError_t e) {
  return std::string(what) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
}

// A launch needs a usable device: report a missing driver or device before touching pointers,
// then make `device` (the tensors' device) current for the launch.
// Makes `device` current for a launch and restores the caller's device when it goes out of scope (torch
// keeps its own current device per thread; a launch on cuda:1 must not leave cuda:1 current behind it).
class DeviceScope {
 public:
  DeviceScope() = default;
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;
  ~DeviceScope() {
    if (prev_ >= 0) cudaSetDevice(prev_);
  }
  std::string enter(int device) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) return cuda_error("kernels._C: no usable CUDA device", e);
    if (device < 0 || device >= n) return "kernels._C: device " + std::to_string(device) + " not among " + std::to_string(n) + " visible";
    int prev = -1;
    e = cudaGetDevice(&prev);
    if (e != cudaSuccess) return cuda_error("kernels._C: cudaGetDevice", e);
    if (prev == device) return "";
    e = cudaSetDevice(device);
    if (e != cudaSuccess) return cuda_error("kernels._C: cudaSetDevice", e);
    prev_ = prev;
    return "";
  }

 private:
  int prev_ = -1;
};

}  // namespace wmsd
