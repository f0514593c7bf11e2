// A kernel that uses every feature of the execution model the other kernels rely on (shared memory,
// __syncthreads, warp shuffles, atomics, a 2-D grid), so tests can check the CPU emulator itself
// against torch before trusting it with the real kernels.
//
// block_sum(x: (R, C) float32) -> (sums: (R, ceil(C / 256)) float32, total: (R,) float32)
//   sums[r, b] = sum of x[r, 256*b : 256*(b+1)]; total[r] = sum of x[r, :] (by atomicAdd)
#include "mf_cuda.cuh"

namespace {
constexpr int kThreads = 256;

__global__ void block_sum_kernel(const float* __restrict__ x, float* __restrict__ sums,
                                 float* __restrict__ total, long cols, int blocks_per_row) {
  __shared__ float warp_sums[kThreads / 32];
  const long row = blockIdx.y;
  const long col = long(blockIdx.x) * kThreads + threadIdx.x;
  float v = col < cols ? x[row * cols + col] : 0.f;
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float w = lane < kThreads / 32 ? warp_sums[lane] : 0.f;
    for (int mask = 16; mask > 0; mask /= 2) w += __shfl_xor_sync(0xffffffffu, w, mask);
    if (lane == 0) {
      sums[row * blocks_per_row + blockIdx.x] = w;
      atomicAdd(total + row, w);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> block_sum(const at::Tensor& x) {
  MF_CHECK_DEVICE(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "block_sum: x must be a 2-D float32 tensor");
  auto xc = x.contiguous();
  const long rows = xc.size(0), cols = xc.size(1);
  const int blocks_per_row = std::max(1, mf_ceil_div(cols, kThreads));
  auto sums = at::full({rows, blocks_per_row}, NAN, xc.options());
  auto total = at::zeros({rows}, xc.options());
  if (rows == 0) return {sums, total};
  MF_LAUNCH(block_sum_kernel, dim3(blocks_per_row, rows), dim3(kThreads), xc.data_ptr<float>(),
            sums.data_ptr<float>(), total.data_ptr<float>(), cols, blocks_per_row);
  return {sums, total};
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(MF_NS, m) {
  m.def("selftest_block_sum(Tensor x) -> (Tensor, Tensor)", &block_sum);
}
