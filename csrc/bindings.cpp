// pybind11 module kernels._C: thin bindings over the launchers in launchers.h. Arguments are raw
// device addresses (uintptr_t), sizes, strides, dtype codes and a cudaStream_t handle; the Python
// wrappers in kernels/cuda.py validate tensors before calling. Errors raise RuntimeError.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "launchers.h"

namespace py = pybind11;

namespace {

void raise_if(const std::string& err) {
  if (!err.empty()) throw std::runtime_error(err);
}

int device_count() {
  std::string err;
  int n = wmsd::device_count(&err);
  raise_if(err);
  return n;
}

py::tuple flow_step_plan(int64_t N, int dtype, bool aligned) {
  int64_t n_blocks = 0;
  bool vec = false;
  wmsd::flow_step_plan(N, dtype, aligned, &n_blocks, &vec);
  return py::make_tuple(n_blocks, vec);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "CUDA kernels of the WMSD engine (csrc/); call through kernels/cuda.py";
  m.def("device_count", &device_count, "Number of CUDA devices; RuntimeError when no driver is usable");
  m.def("flow_step_plan", &flow_step_plan, py::arg("N"), py::arg("dtype"), py::arg("aligned"),
        "(n_blocks, vectorized) of flow_step for N elements per sample");
  m.def(
      "flow_step",
      [](uintptr_t x, uintptr_t vc, uintptr_t vu, uintptr_t noise, uintptr_t x_next, uintptr_t out, uintptr_t part,
         int64_t part_capacity, uintptr_t logprob, uintptr_t t_ptr, uintptr_t tn_ptr, float t, float tn,
         float guidance, float sigma, int64_t B, int64_t N, int dtype, int mode, int device, uintptr_t stream) {
        py::gil_scoped_release release;
        raise_if(wmsd::flow_step(x, vc, vu, noise, x_next, out, part, part_capacity, logprob, t_ptr, tn_ptr, t,
                                 tn, guidance, sigma, B, N, dtype, mode, device, stream));
      },
      py::arg("x"), py::arg("vc"), py::arg("vu"), py::arg("noise"), py::arg("x_next"), py::arg("out"),
      py::arg("part"), py::arg("part_capacity"), py::arg("logprob"), py::arg("t_ptr"), py::arg("tn_ptr"),
      py::arg("t"), py::arg("tn"), py::arg("guidance"), py::arg("sigma"), py::arg("B"), py::arg("N"),
      py::arg("dtype"), py::arg("mode"), py::arg("device"), py::arg("stream"),
      "Fused flow sampler step (kernels/sampler.py semantics) on raw device pointers");
  m.def(
      "qk_norm_rope",
      [](uintptr_t q, uintptr_t k, uintptr_t wq, uintptr_t wk, uintptr_t cos, uintptr_t sin, int64_t B, int64_t S,
         int64_t Hq, int64_t Hk, int64_t D, int64_t qsb, int64_t qss, int64_t qsh, int64_t ksb, int64_t kss,
         int64_t ksh, float eps, bool norm_all, int dtype, int device, uintptr_t stream) {
        py::gil_scoped_release release;
        raise_if(wmsd::qk_norm_rope(q, k, wq, wk, cos, sin, B, S, Hq, Hk, D, qsb, qss, qsh, ksb, kss, ksh, eps,
                                    norm_all, dtype, device, stream));
      },
      py::arg("q"), py::arg("k"), py::arg("wq"), py::arg("wk"), py::arg("cos"), py::arg("sin"), py::arg("B"),
      py::arg("S"), py::arg("Hq"), py::arg("Hk"), py::arg("D"), py::arg("qsb"), py::arg("qss"), py::arg("qsh"),
      py::arg("ksb"), py::arg("kss"), py::arg("ksh"), py::arg("eps"), py::arg("norm_all"), py::arg("dtype"),
      py::arg("device"), py::arg("stream"), "In-place fused QK RMSNorm + interleaved RoPE of q and k, one launch");
}
