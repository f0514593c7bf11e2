// contrastive.cu: the memory-bound parts of the chunked contrastive loss (the `cuda` backend of
// moon_fast.ops.contrastive_loss; the matrix products stay on at::matmul / cuBLAS).
//
// All three work on a float32 logits tile S (c, n) with row stride ld (a view of a (c, Nc) chunk;
// excluded entries are already -inf):
//
// contrastive_row_lse(S) -> lse (c,)
//     lse[r] = log sum_j exp(S[r, j])                        one block of 128 threads per row
// contrastive_col_merge_(S, cmax (n,), csum (n,))            online merge of this tile's column
//     partials into running (max, sum exp(S - max)), in place; one thread per column
// contrastive_tile_grad_(S, lse (c,), a (c,), clse (n2,)?, b (n2,)?, pos (c,) int64, pos_coef (c,))
//     S[r, j] <- a[r] exp(S[r, j] - lse[r]) + [j < n2] b[j] exp(S[r, j] - clse[j])
//                - [j == pos[r]] pos_coef[r]                  in place: dLoss/dS of both directions
#include "mf_cuda.cuh"

namespace {
constexpr int kRowThreads = 128;
constexpr int kColThreads = 256;

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Every thread of the block gets the block-wide max (is_max) or sum of v.
__device__ float block_reduce(float v, bool is_max, float* smem) {
  v = is_max ? warp_max(v) : warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  float w = lane < kRowThreads / 32 ? smem[lane] : (is_max ? -INFINITY : 0.f);
  w = is_max ? warp_max(w) : warp_sum(w);
  __syncthreads();  // smem is reused by the next reduction
  return w;
}

__global__ void __launch_bounds__(kRowThreads)
row_lse_kernel(const float* __restrict__ S, long n, long ld, float* __restrict__ lse) {
  __shared__ float smem[kRowThreads / 32];
  const float* row = S + long(blockIdx.x) * ld;
  float m = -INFINITY;
  for (long j = threadIdx.x; j < n; j += kRowThreads) m = fmaxf(m, row[j]);
  m = block_reduce(m, true, smem);
  const float safe = m == -INFINITY ? 0.f : m;  // a fully excluded row: sum 0, lse -inf
  float s = 0.f;
  for (long j = threadIdx.x; j < n; j += kRowThreads) s += expf(row[j] - safe);
  s = block_reduce(s, false, smem);
  if (threadIdx.x == 0) lse[blockIdx.x] = safe + logf(s);
}

__global__ void __launch_bounds__(kColThreads)
col_merge_kernel(const float* __restrict__ S, long rows, long n, long ld, float* __restrict__ cmax,
                 float* __restrict__ csum) {
  const long col = long(blockIdx.x) * kColThreads + threadIdx.x;
  if (col >= n) return;
  float m = -INFINITY;
  for (long r = 0; r < rows; ++r) m = fmaxf(m, S[r * ld + col]);
  const float old_m = cmax[col];
  const float new_m = fmaxf(old_m, m);
  const float safe = new_m == -INFINITY ? 0.f : new_m;
  float s = 0.f;
  for (long r = 0; r < rows; ++r) s += expf(S[r * ld + col] - safe);
  csum[col] = csum[col] * expf(old_m - safe) + s;
  cmax[col] = new_m;
}

__global__ void __launch_bounds__(kColThreads)
tile_grad_kernel(float* __restrict__ S, long n, long ld, const float* __restrict__ lse,
                 const float* __restrict__ a, const float* __restrict__ clse, const float* __restrict__ b,
                 long n2, const int64_t* __restrict__ pos, const float* __restrict__ pos_coef) {
  const long r = blockIdx.y;
  const long j = long(blockIdx.x) * kColThreads + threadIdx.x;
  if (j >= n) return;
  float* p = S + r * ld + j;
  const float s = *p;
  float g = a[r] * expf(s - lse[r]);
  if (clse != nullptr && j < n2) {
    float cl = clse[j];
    if (cl == -INFINITY) cl = 0.f;  // a column with no entries: its terms are exp(-inf) = 0
    g += b[j] * expf(s - cl);
  }
  if (j == pos[r]) g -= pos_coef[r];
  *p = g;
}

void check_tile(const at::Tensor& S) {
  MF_CHECK_DEVICE(S, "S");
  TORCH_CHECK(S.dim() == 2 && S.scalar_type() == at::kFloat, "contrastive: S must be a 2-D float32 tile");
  TORCH_CHECK(S.stride(1) == 1 || S.size(1) <= 1, "contrastive: S rows must be contiguous (stride(1) == 1)");
}

void check_vec(const at::Tensor& t, const char* name, long n, at::ScalarType type = at::kFloat) {
  MF_CHECK_DEVICE(t, name);
  MF_CHECK_CONTIGUOUS(t, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n && t.scalar_type() == type, "contrastive: ", name,
              " must be a contiguous 1-D tensor of ", n, " elements of type ", type, ", got ", t.sizes(), " ",
              t.scalar_type());
}

at::Tensor row_lse(const at::Tensor& S) {
  check_tile(S);
  const long rows = S.size(0), n = S.size(1);
  auto lse = at::full({rows}, NAN, S.options());
  if (rows == 0) return lse;
  MF_LAUNCH(row_lse_kernel, dim3(rows), dim3(kRowThreads), S.data_ptr<float>(), n, S.stride(0),
            lse.data_ptr<float>());
  return lse;
}

void col_merge(const at::Tensor& S, const at::Tensor& cmax, const at::Tensor& csum) {
  check_tile(S);
  const long rows = S.size(0), n = S.size(1);
  check_vec(cmax, "cmax", n);
  check_vec(csum, "csum", n);
  if (n == 0) return;
  MF_LAUNCH(col_merge_kernel, dim3(mf_ceil_div(n, kColThreads)), dim3(kColThreads), S.data_ptr<float>(), rows,
            n, S.stride(0), cmax.data_ptr<float>(), csum.data_ptr<float>());
}

void tile_grad(const at::Tensor& S, const at::Tensor& lse, const at::Tensor& a, const c10::optional<at::Tensor>& clse,
               const c10::optional<at::Tensor>& b, const at::Tensor& pos, const at::Tensor& pos_coef) {
  check_tile(S);
  const long rows = S.size(0), n = S.size(1);
  check_vec(lse, "lse", rows);
  check_vec(a, "a", rows);
  check_vec(pos, "pos", rows, at::kLong);
  check_vec(pos_coef, "pos_coef", rows);
  const float* clse_p = nullptr;
  const float* b_p = nullptr;
  long n2 = 0;
  if (clse.has_value()) {
    TORCH_CHECK(b.has_value(), "contrastive_tile_grad_: clse given without b");
    n2 = clse->size(0);
    TORCH_CHECK(n2 <= n, "contrastive_tile_grad_: clse longer than the tile is wide");
    check_vec(*clse, "clse", n2);
    check_vec(*b, "b", n2);
    clse_p = clse->data_ptr<float>();
    b_p = b->data_ptr<float>();
  }
  if (rows == 0 || n == 0) return;
  TORCH_CHECK(rows <= 65535, "contrastive_tile_grad_: at most 65535 rows per tile");
  MF_LAUNCH(tile_grad_kernel, dim3(mf_ceil_div(n, kColThreads), rows), dim3(kColThreads), S.data_ptr<float>(), n,
            S.stride(0), lse.data_ptr<float>(), a.data_ptr<float>(), clse_p, b_p, n2, pos.data_ptr<int64_t>(),
            pos_coef.data_ptr<float>());
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(MF_NS, m) {
  m.def("contrastive_row_lse(Tensor S) -> Tensor", &row_lse);
  m.def("contrastive_col_merge_(Tensor S, Tensor(a!) cmax, Tensor(b!) csum) -> ()", &col_merge);
  m.def("contrastive_tile_grad_(Tensor(a!) S, Tensor lse, Tensor a, Tensor? clse, Tensor? b, Tensor pos, "
        "Tensor pos_coef) -> ()", &tile_grad);
}
