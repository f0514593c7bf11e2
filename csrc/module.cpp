// The Python module of both extensions: moon_fast._C (nvcc) and moon_fast._C_emu (host compiler,
// -DMF_EMULATE). The ops themselves register with the PyTorch dispatcher from their own .cu files
// (TORCH_LIBRARY_FRAGMENT), under torch.ops.moon_fast_cuda or torch.ops.moon_fast_emu.
#include <torch/extension.h>

#ifndef MF_CUDA_ARCHS
#define MF_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef MF_EMULATE
  m.attr("emulated") = true;
  m.attr("ops_namespace") = "moon_fast_emu";
  m.attr("cuda_archs") = "";
#else
  m.attr("emulated") = false;
  m.attr("ops_namespace") = "moon_fast_cuda";
  m.attr("cuda_archs") = MF_CUDA_ARCHS;
#endif
}
