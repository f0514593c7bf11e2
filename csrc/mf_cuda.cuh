// mf_cuda.cuh: one header that lets every kernel in csrc/ compile two ways.
//
//  * With nvcc (the real extension, moon_fast._C): plain CUDA.
//  * With the host C++ compiler and -DMF_EMULATE (moon_fast._C_emu): a small emulation of the CUDA
//    execution model, so the very same kernel source runs on the CPU in CI, where there is no GPU.
//
// The emulator runs one std::thread per CUDA thread of a block and runs the blocks of a grid one
// after another (all threads of a block are alive together, as on a GPU). It provides:
//   threadIdx / blockIdx / blockDim / gridDim, __shared__ (static storage: only one block runs at a
//   time, so all threads of the running block share it), __syncthreads() (a std::barrier over the
//   block), __syncwarp() and the warp shuffles __shfl_sync / __shfl_xor_sync / __shfl_down_sync
//   (a barrier per warp of 32 lanes), and atomicAdd / atomicMax / atomicMin / atomicCAS
//   (std::atomic_ref).
// Rules a kernel must follow to run under both (they are CUDA's own rules, made strict):
//   * launch with MF_LAUNCH(kernel, grid, block, args...), never <<<...>>> directly; for a template
//     kernel take a pointer first: `auto k = my_kernel<scalar_t, 128>; MF_LAUNCH(k, ...)`;
//   * static __shared__ arrays only (no `extern __shared__` dynamic shared memory);
//   * every thread of a block reaches every __syncthreads(), and every lane of a warp every shuffle
//     (CUDA requires the same; the emulator deadlocks where a GPU would misbehave);
//   * scalar types are c10::Half / c10::BFloat16 / float (static_cast<float> to convert), never the
//     cuda_fp16 intrinsics, so the host compiler understands them;
//   * warp shuffles assume blockDim.x * blockDim.y * blockDim.z is a multiple of 32.
// The emulator is for correctness, not speed: keep test shapes small.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#ifndef MF_EMULATE
// ---------------------------------------------------------------------------- real CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#define MF_NS moon_fast_cuda
#define MF_CHECK_DEVICE(t, name) \
  TORCH_CHECK((t).is_cuda(), "moon_fast CUDA op: ", name, " must be a CUDA tensor, got device ", \
              (t).device(), ". On the CPU use backend='torch' (or 'cuda_emu' to run this kernel under the CPU emulator).")
#define MF_LAUNCH(kernel, grid, block, ...)                                              \
  do {                                                                                   \
    kernel<<<(grid), (block), 0, at::cuda::getCurrentCUDAStream()>>>(__VA_ARGS__);      \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                      \
  } while (0)
#define MF_EMULATED 0

#else
// ---------------------------------------------------------------------------- CPU emulation
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define MF_NS moon_fast_emu
#define MF_CHECK_DEVICE(t, name) \
  TORCH_CHECK((t).device().is_cpu(), "moon_fast emulated CUDA op: ", name, " must be a CPU tensor, got ", (t).device())
#define MF_EMULATED 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __restrict__ __restrict

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct mf_uint3 { unsigned x = 0, y = 0, z = 0; };

inline thread_local mf_uint3 threadIdx;
inline thread_local mf_uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace mf_emu {

struct Warp {
  explicit Warp(int lanes) : bar(lanes) {}
  std::barrier<> bar;
  alignas(8) unsigned char slot[32][8];
};

inline thread_local std::barrier<>* block_barrier = nullptr;
inline thread_local Warp* warp = nullptr;
inline thread_local int lane = 0;

// Runs kernel_body() for every thread of every block. Blocks run one at a time; within a block all
// threads run concurrently so barriers and shared memory behave as on the GPU.
template <class Body>
void launch(dim3 grid, dim3 block, Body&& kernel_body) {
  static std::mutex one_launch_at_a_time;  // __shared__ statics are per kernel, not per launch
  std::lock_guard<std::mutex> guard(one_launch_at_a_time);
  const int nthreads = int(block.x * block.y * block.z);
  TORCH_CHECK(nthreads >= 1 && nthreads <= 1024, "emulated launch: block of ", nthreads, " threads");
  const long nblocks = long(grid.x) * grid.y * grid.z;
  if (nblocks == 0) return;
  std::barrier<> bar(nthreads);
  std::vector<std::unique_ptr<Warp>> warps;
  for (int w = 0; w < (nthreads + 31) / 32; ++w)
    warps.emplace_back(std::make_unique<Warp>(std::min(32, nthreads - 32 * w)));
  auto worker = [&](int tid) {
    threadIdx.x = tid % block.x;
    threadIdx.y = (tid / block.x) % block.y;
    threadIdx.z = tid / (block.x * block.y);
    blockDim = block;
    gridDim = grid;
    block_barrier = &bar;
    warp = warps[tid / 32].get();
    lane = tid % 32;
    for (long b = 0; b < nblocks; ++b) {
      blockIdx.x = unsigned(b % grid.x);
      blockIdx.y = unsigned((b / grid.x) % grid.y);
      blockIdx.z = unsigned(b / (long(grid.x) * grid.y));
      kernel_body();
      bar.arrive_and_wait();  // the next block may reuse shared memory only when all are done
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(nthreads);
  for (int t = 0; t < nthreads; ++t) threads.emplace_back(worker, t);
  for (auto& t : threads) t.join();
}

template <class T>
T shuffle_from(T value, int src_lane) {
  static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
  std::memcpy(warp->slot[lane], &value, sizeof(T));
  warp->bar.arrive_and_wait();
  T out;
  std::memcpy(&out, warp->slot[src_lane], sizeof(T));
  warp->bar.arrive_and_wait();
  return out;
}

}  // namespace mf_emu

inline void __syncthreads() { mf_emu::block_barrier->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { mf_emu::warp->bar.arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <class T>
T __shfl_sync(unsigned, T v, int src, int width = 32) {
  return mf_emu::shuffle_from(v, (mf_emu::lane / width) * width + (src % width));
}
template <class T>
T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
  int src = mf_emu::lane ^ mask;
  if ((src / width) != (mf_emu::lane / width)) src = mf_emu::lane;
  return mf_emu::shuffle_from(v, src);
}
template <class T>
T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
  int src = mf_emu::lane + int(delta);
  if ((src / width) != (mf_emu::lane / width)) src = mf_emu::lane;
  return mf_emu::shuffle_from(v, src);
}
template <class T>
T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
  int src = mf_emu::lane - int(delta);
  if (src < 0 || (src / width) != (mf_emu::lane / width)) src = mf_emu::lane;
  return mf_emu::shuffle_from(v, src);
}

template <class T>
T atomicAdd(T* addr, T v) { return std::atomic_ref<T>(*addr).fetch_add(v); }
template <class T>
T atomicCAS(T* addr, T expected, T desired) {
  std::atomic_ref<T>(*addr).compare_exchange_strong(expected, desired);
  return expected;
}
template <class T>
T atomicMax(T* addr, T v) {
  std::atomic_ref<T> a(*addr);
  T old = a.load();
  while (old < v && !a.compare_exchange_weak(old, v)) {}
  return old;
}
template <class T>
T atomicMin(T* addr, T v) {
  std::atomic_ref<T> a(*addr);
  T old = a.load();
  while (old > v && !a.compare_exchange_weak(old, v)) {}
  return old;
}
template <class T>
T __ldg(const T* p) { return *p; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
// expf, logf, fmaxf, ... come from <math.h> in the global namespace, as on the device.

#define MF_LAUNCH(kernel, grid, block, ...) \
  ::mf_emu::launch((grid), (block), [&]() { kernel(__VA_ARGS__); })

#endif  // MF_EMULATE

// Helpers shared by both builds.
#define MF_CHECK_CONTIGUOUS(t, name) \
  TORCH_CHECK((t).is_contiguous(), "moon_fast CUDA op: ", name, " must be contiguous")

__host__ __device__ inline int mf_ceil_div(long a, long b) { return int((a + b - 1) / b); }
