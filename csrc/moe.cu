// moe.cu: routing metadata and data movement of moe_mlp (the GEMMs run on grouped_mm / cuBLAS).
//
// S = T * k slots; slot s = t * k + j is token t's j-th choice. "Sorted" order is expert-contiguous
// and STABLE (slots of one expert keep token-major order), so every result is deterministic.
//
//   moe_routing(expert_idx (T, k) int64, E, perm (S,) i64!, token (S,) i64!, inv_perm (S,) i64!,
//               offsets (E,) i32!, block_counts (B, E) i32! zeroed, B = cdiv(S, 256))
//     1. block_hist:  block_counts[b, e] = #slots of chunk b (256 slots) routed to e   (int atomics)
//     2. block_scan:  offsets[e] = cumulative ends; block_counts[b, e] <- first sorted position of
//                     chunk b's slots of expert e (scan over chunks per expert, then over experts)
//     3. scatter:     pos = that base + rank of the slot among the chunk's earlier slots of its expert
//                     perm[pos] = s, token[pos] = s / k, inv_perm[s] = pos
//   moe_permute(x (R, H), row_idx (S,), scale (n,)?, scale_idx (S,)?, out (S, H)!)
//     out[i] = scale[scale_idx[i]] * x[row_idx[i]]                       (gather, optional scale)
//   moe_unpermute(y (S, H), inv_perm (S,), weight (T, k)?, k, out (T, H)!)
//     out[t] = sum_j weight[t, j] * y[inv_perm[t * k + j]]   (one block per token, fixed j order in
//     fp32: deterministic, no float atomics); weight absent = 1 (the backward of the gather)
//   moe_unpermute_weight_grad(dout (T, H), y (S, H), inv_perm (S,), k, dw (T, k)!)
//     dw[t, j] = <dout[t], y[inv_perm[t * k + j]]>                        (block reduction per token)
//   moe_swiglu(gu (S, 2I), h (S, I)!)
//     h = silu(gate) * up, gate = gu[:, :I], up = gu[:, I:]               (one block per row, fp32 math)
//   moe_swiglu_backward_(dh (S, I)!, gu (S, 2I), dgu (S, 2I)!)
//     dgu = (d gate, d up) of h = silu(gate) * up; h recomputed into dh's memory (the caller's next use)
//     One pass over memory each, where torch ops take two (forward) and five (backward) launches.
// Index widths: slots and rows are int64 in memory and in address arithmetic; counts are int32, which
// the launcher guards (S < 2^31).
#include "mf_cuda.cuh"

namespace {
constexpr int kChunk = 256;    // slots per block in the routing kernels (= block size)
constexpr int kThreads = 128;  // threads per row in the row kernels

__global__ void moe_block_hist_kernel(const int64_t* __restrict__ ids, long num_slots, int num_experts,
                                      int* __restrict__ block_counts) {
  const long s = long(blockIdx.x) * kChunk + threadIdx.x;
  if (s >= num_slots) return;
  const int64_t id = ids[s];
  if (id >= 0 && id < num_experts) atomicAdd(block_counts + long(blockIdx.x) * num_experts + id, 1);  // ids are
  // range-checked by the caller; the guard only keeps a bad id from writing out of bounds
}

// One block of kChunk threads: block_counts (B, E) -> block_counts[b, e] = the first sorted position of chunk
// b's slots of expert e; offsets[e] = the end of expert e's rows. Parallel over chunks as well as experts:
// `lanes` threads share one expert, each owning a contiguous range of chunks, so a thread walks about
// B * E / kChunk entries (E <= kChunk; more experts take rounds of kChunk), plus one pass over the lanes in
// shared memory. The loop this replaced gave each expert one thread walking all B chunks twice, 2 B global
// loads one after another (B = 128 at S = 32K slots, 4096 at S = 1M); not yet timed on a GPU.
__global__ void moe_block_scan_kernel(int* __restrict__ block_counts, int num_blocks, int num_experts,
                                      int* __restrict__ starts, int* __restrict__ offsets) {
  __shared__ int lane_base[kChunk];
  const int lanes = num_experts < kChunk ? kChunk / num_experts : 1;  // threads per expert
  const int group = kChunk / lanes;                                   // experts per round, >= min(E, kChunk)
  const int el = threadIdx.x % group, lane = threadIdx.x / group;
  const int per_lane = mf_ceil_div(num_blocks, lanes);
  const int b_lo = lane * per_lane < num_blocks ? lane * per_lane : num_blocks;
  const int b_hi = b_lo + per_lane < num_blocks ? b_lo + per_lane : num_blocks;
  for (int e0 = 0; e0 < num_experts; e0 += group) {
    const int e = e0 + el;
    const bool mine = lane < lanes && e < num_experts;  // threads past group * lanes idle
    int sum = 0;
    if (mine)
      for (int b = b_lo; b < b_hi; ++b) sum += block_counts[long(b) * num_experts + e];
    lane_base[threadIdx.x] = sum;
    __syncthreads();
    if (mine && lane == 0) {  // exclusive scan over the expert's lanes, in shared memory
      int run = 0;
      for (int l = 0; l < lanes; ++l) {
        const int c = lane_base[l * group + el];
        lane_base[l * group + el] = run;
        run += c;
      }
      starts[e] = run;  // the expert's slot count until the scan over experts below
    }
    __syncthreads();
    if (mine) {  // each chunk's first position among the expert's slots
      int run = lane_base[threadIdx.x];
      for (int b = b_lo; b < b_hi; ++b) {
        const long i = long(b) * num_experts + e;
        const int c = block_counts[i];
        block_counts[i] = run;
        run += c;
      }
    }
    __syncthreads();  // lane_base is reused by the next round
  }
  if (threadIdx.x == 0) {  // exclusive scan over experts (E is small: a serial loop is the simple choice)
    int run = 0;
    for (int e = 0; e < num_experts; ++e) {
      const int c = starts[e];
      starts[e] = run;
      run += c;
      offsets[e] = run;
    }
  }
  __syncthreads();
  for (long i = threadIdx.x; i < long(num_blocks) * num_experts; i += blockDim.x)
    block_counts[i] += starts[i % num_experts];
}

__global__ void moe_scatter_kernel(const int64_t* __restrict__ ids, long num_slots, int num_experts, int top_k,
                                   const int* __restrict__ block_base, int64_t* __restrict__ perm,
                                   int64_t* __restrict__ token, int64_t* __restrict__ inv_perm) {
  __shared__ int64_t chunk_ids[kChunk];
  const long s = long(blockIdx.x) * kChunk + threadIdx.x;
  const int64_t id = s < num_slots ? ids[s] : -1;
  chunk_ids[threadIdx.x] = id;
  __syncthreads();
  if (s < num_slots && id >= 0 && id < num_experts) {
    int rank = 0;  // earlier slots of this chunk with the same expert: keeps the order stable
    for (int i = 0; i < int(threadIdx.x); ++i) rank += chunk_ids[i] == id;
    const long pos = long(block_base[long(blockIdx.x) * num_experts + id]) + rank;
    perm[pos] = s;
    token[pos] = s / top_k;
    inv_perm[s] = pos;
  }
}

template <typename scalar_t>
__global__ void moe_permute_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ row_idx,
                                   const scalar_t* __restrict__ scale, const int64_t* __restrict__ scale_idx,
                                   long hidden, scalar_t* __restrict__ out) {
  const long i = blockIdx.x;
  const scalar_t* src = x + row_idx[i] * hidden;
  scalar_t* dst = out + i * hidden;
  if (scale != nullptr) {
    const float w = static_cast<float>(scale[scale_idx[i]]);
    for (long c = threadIdx.x; c < hidden; c += blockDim.x) dst[c] = static_cast<scalar_t>(w * static_cast<float>(src[c]));
  } else {
    for (long c = threadIdx.x; c < hidden; c += blockDim.x) dst[c] = src[c];
  }
}

template <typename scalar_t>
__global__ void moe_unpermute_kernel(const scalar_t* __restrict__ y, const int64_t* __restrict__ inv_perm,
                                     const scalar_t* __restrict__ weight, int top_k, long hidden,
                                     scalar_t* __restrict__ out) {
  const long t = blockIdx.x;
  for (long c = threadIdx.x; c < hidden; c += blockDim.x) {
    float acc = 0.f;
    for (int j = 0; j < top_k; ++j) {
      const long slot = t * top_k + j;
      const float w = weight != nullptr ? static_cast<float>(weight[slot]) : 1.f;
      acc += w * static_cast<float>(y[inv_perm[slot] * hidden + c]);
    }
    out[t * hidden + c] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t>
__global__ void moe_unpermute_weight_grad_kernel(const scalar_t* __restrict__ dout, const scalar_t* __restrict__ y,
                                                 const int64_t* __restrict__ inv_perm, int top_k, long hidden,
                                                 scalar_t* __restrict__ dw) {
  __shared__ float warp_sums[kThreads / 32];
  const long t = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int j = 0; j < top_k; ++j) {
    const long slot = t * top_k + j;
    const scalar_t* row = y + inv_perm[slot] * hidden;
    float v = 0.f;
    for (long c = threadIdx.x; c < hidden; c += blockDim.x)
      v += static_cast<float>(dout[t * hidden + c]) * static_cast<float>(row[c]);
    for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
      float total = 0.f;
      for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
      dw[slot] = static_cast<scalar_t>(total);
    }
    __syncthreads();  // warp_sums is reused by the next choice
  }
}

// sigmoid in fp32; exp(-g) overflows to inf for g < -88, and 1 / inf = 0 is the right limit
__device__ __forceinline__ float moe_sigmoid(float g) { return 1.f / (1.f + __expf(-g)); }

template <typename scalar_t>
__global__ void moe_swiglu_kernel(const scalar_t* __restrict__ gu, long inter, scalar_t* __restrict__ h) {
  const long r = blockIdx.x;
  const scalar_t* gate = gu + r * 2 * inter;
  for (long c = threadIdx.x; c < inter; c += blockDim.x) {
    const float g = static_cast<float>(gate[c]);
    h[r * inter + c] = static_cast<scalar_t>(g * moe_sigmoid(g) * static_cast<float>(gate[inter + c]));
  }
}

// dh_h holds dh on entry and h on exit: each element is read before it is written, by the same thread.
template <typename scalar_t>
__global__ void moe_swiglu_backward_kernel(scalar_t* dh_h, const scalar_t* __restrict__ gu, long inter,
                                           scalar_t* __restrict__ dgu) {
  const long r = blockIdx.x;
  const scalar_t* gate = gu + r * 2 * inter;
  scalar_t* d_gate = dgu + r * 2 * inter;
  scalar_t* row = dh_h + r * inter;
  for (long c = threadIdx.x; c < inter; c += blockDim.x) {
    const float g = static_cast<float>(gate[c]), u = static_cast<float>(gate[inter + c]);
    const float d = static_cast<float>(row[c]), s = moe_sigmoid(g), silu = g * s;
    d_gate[c] = static_cast<scalar_t>(d * u * s * (1.f + g * (1.f - s)));
    d_gate[inter + c] = static_cast<scalar_t>(d * silu);
    row[c] = static_cast<scalar_t>(silu * u);
  }
}

void check_index(const at::Tensor& t, const char* name) {
  MF_CHECK_DEVICE(t, name);
  MF_CHECK_CONTIGUOUS(t, name);
  TORCH_CHECK(t.scalar_type() == at::kLong, "moe op: ", name, " must be int64, got ", t.scalar_type());
}

void check_rows(const at::Tensor& t, const char* name) {
  MF_CHECK_DEVICE(t, name);
  MF_CHECK_CONTIGUOUS(t, name);
  TORCH_CHECK(t.dim() == 2, "moe op: ", name, " must be 2-D, got ", t.dim(), " dims");
}

void moe_routing(const at::Tensor& expert_idx, int64_t num_experts, at::Tensor perm, at::Tensor token,
                 at::Tensor inv_perm, at::Tensor offsets, at::Tensor block_counts) {
  check_index(expert_idx, "expert_idx");
  for (auto* t : {&perm, &token, &inv_perm}) check_index(*t, "perm/token/inv_perm");
  MF_CHECK_DEVICE(offsets, "offsets");
  MF_CHECK_DEVICE(block_counts, "block_counts");
  TORCH_CHECK(offsets.scalar_type() == at::kInt && block_counts.scalar_type() == at::kInt,
              "moe_routing: offsets and block_counts must be int32");
  const long num_slots = expert_idx.numel();
  TORCH_CHECK(num_slots < (1L << 31), "moe_routing: ", num_slots, " slots exceed the int32 counts");
  TORCH_CHECK(expert_idx.dim() == 2 && expert_idx.size(1) > 0, "moe_routing: expert_idx must be (T, k), k > 0");
  TORCH_CHECK(num_experts > 0 && offsets.numel() == num_experts, "moe_routing: offsets must have E elements");
  const int num_blocks = mf_ceil_div(num_slots, kChunk);
  TORCH_CHECK(perm.numel() == num_slots && token.numel() == num_slots && inv_perm.numel() == num_slots,
              "moe_routing: perm, token and inv_perm must have T * k elements");
  TORCH_CHECK(block_counts.numel() == long(num_blocks) * num_experts && block_counts.is_contiguous(),
              "moe_routing: block_counts must be a contiguous (cdiv(S, 256), E) int32 buffer");
  block_counts.zero_();
  auto starts = at::empty({num_experts}, offsets.options());
  const int experts = int(num_experts), top_k = int(expert_idx.size(1));
  if (num_slots > 0)
    MF_LAUNCH(moe_block_hist_kernel, dim3(num_blocks), dim3(kChunk), expert_idx.data_ptr<int64_t>(), num_slots,
              experts, block_counts.data_ptr<int>());
  MF_LAUNCH(moe_block_scan_kernel, dim3(1), dim3(kChunk), block_counts.data_ptr<int>(), num_blocks, experts,
            starts.data_ptr<int>(), offsets.data_ptr<int>());
  if (num_slots > 0)
    MF_LAUNCH(moe_scatter_kernel, dim3(num_blocks), dim3(kChunk), expert_idx.data_ptr<int64_t>(), num_slots,
              experts, top_k, block_counts.data_ptr<int>(), perm.data_ptr<int64_t>(), token.data_ptr<int64_t>(),
              inv_perm.data_ptr<int64_t>());
}

void moe_permute(const at::Tensor& x, const at::Tensor& row_idx, const std::optional<at::Tensor>& scale,
                 const std::optional<at::Tensor>& scale_idx, at::Tensor out) {
  check_rows(x, "x");
  check_rows(out, "out");
  check_index(row_idx, "row_idx");
  TORCH_CHECK(out.size(0) == row_idx.numel() && out.size(1) == x.size(1) && out.scalar_type() == x.scalar_type(),
              "moe_permute: out must be (len(row_idx), H) in x's dtype");
  TORCH_CHECK(scale.has_value() == scale_idx.has_value(), "moe_permute: give scale and scale_idx together");
  if (scale) {
    MF_CHECK_DEVICE(*scale, "scale");
    check_index(*scale_idx, "scale_idx");
    TORCH_CHECK(scale->is_contiguous() && scale->scalar_type() == x.scalar_type(), "moe_permute: scale dtype");
    TORCH_CHECK(scale_idx->numel() == row_idx.numel(), "moe_permute: scale_idx must match row_idx");
  }
  if (out.size(0) == 0 || x.size(1) == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "moe_permute", [&] {
    auto kern = moe_permute_kernel<scalar_t>;
    MF_LAUNCH(kern, dim3(unsigned(out.size(0))), dim3(kThreads), x.data_ptr<scalar_t>(), row_idx.data_ptr<int64_t>(),
              scale ? scale->data_ptr<scalar_t>() : nullptr, scale ? scale_idx->data_ptr<int64_t>() : nullptr,
              x.size(1), out.data_ptr<scalar_t>());
  });
}

void moe_unpermute(const at::Tensor& y, const at::Tensor& inv_perm, const std::optional<at::Tensor>& weight,
                   int64_t top_k, at::Tensor out) {
  check_rows(y, "y");
  check_rows(out, "out");
  check_index(inv_perm, "inv_perm");
  TORCH_CHECK(top_k > 0 && out.size(0) * top_k == inv_perm.numel() && inv_perm.numel() == y.size(0) &&
                  out.size(1) == y.size(1) && out.scalar_type() == y.scalar_type(),
              "moe_unpermute: y (T * k, H), inv_perm (T * k,), out (T, H) in y's dtype");
  if (weight) {
    MF_CHECK_DEVICE(*weight, "weight");
    TORCH_CHECK(weight->is_contiguous() && weight->numel() == inv_perm.numel() && weight->scalar_type() == y.scalar_type(),
                "moe_unpermute: weight must be a contiguous (T, k) tensor in y's dtype");
  }
  if (out.size(0) == 0 || y.size(1) == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "moe_unpermute", [&] {
    auto kern = moe_unpermute_kernel<scalar_t>;
    MF_LAUNCH(kern, dim3(unsigned(out.size(0))), dim3(kThreads), y.data_ptr<scalar_t>(), inv_perm.data_ptr<int64_t>(),
              weight ? weight->data_ptr<scalar_t>() : nullptr, int(top_k), y.size(1), out.data_ptr<scalar_t>());
  });
}

void moe_unpermute_weight_grad(const at::Tensor& dout, const at::Tensor& y, const at::Tensor& inv_perm, int64_t top_k,
                               at::Tensor dw) {
  check_rows(dout, "dout");
  check_rows(y, "y");
  check_rows(dw, "dw");
  check_index(inv_perm, "inv_perm");
  TORCH_CHECK(top_k > 0 && dout.size(0) * top_k == inv_perm.numel() && inv_perm.numel() == y.size(0) &&
                  dout.size(1) == y.size(1) && dw.size(0) == dout.size(0) && dw.size(1) == top_k &&
                  dout.scalar_type() == y.scalar_type() && dw.scalar_type() == y.scalar_type(),
              "moe_unpermute_weight_grad: dout (T, H), y (T * k, H), inv_perm (T * k,), dw (T, k), one dtype");
  if (dw.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "moe_unpermute_weight_grad", [&] {
    auto kern = moe_unpermute_weight_grad_kernel<scalar_t>;
    MF_LAUNCH(kern, dim3(unsigned(dout.size(0))), dim3(kThreads), dout.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
              inv_perm.data_ptr<int64_t>(), int(top_k), y.size(1), dw.data_ptr<scalar_t>());
  });
}

void check_swiglu(const at::Tensor& gu, const at::Tensor& act, const char* name) {
  check_rows(gu, "gu");
  check_rows(act, name);
  TORCH_CHECK(act.scalar_type() == gu.scalar_type(), "moe_swiglu: ", name, " must be in gu's dtype ",
              gu.scalar_type(), ", got ", act.scalar_type());
  TORCH_CHECK(gu.size(1) % 2 == 0 && act.size(0) == gu.size(0) && act.size(1) * 2 == gu.size(1),
              "moe_swiglu: gu must be (S, 2I) and ", name, " (S, I); got ", gu.sizes(), " and ", act.sizes());
  TORCH_CHECK(gu.size(0) < (1L << 31), "moe_swiglu: ", gu.size(0), " rows exceed the grid");
}

void moe_swiglu(const at::Tensor& gu, at::Tensor h) {
  check_swiglu(gu, h, "h");
  if (h.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gu.scalar_type(), "moe_swiglu", [&] {
    auto kern = moe_swiglu_kernel<scalar_t>;
    MF_LAUNCH(kern, dim3(unsigned(gu.size(0))), dim3(kThreads), gu.data_ptr<scalar_t>(), h.size(1),
              h.data_ptr<scalar_t>());
  });
}

void moe_swiglu_backward_(at::Tensor dh, const at::Tensor& gu, at::Tensor dgu) {
  check_swiglu(gu, dh, "dh");
  check_rows(dgu, "dgu");
  TORCH_CHECK(dgu.sizes() == gu.sizes() && dgu.scalar_type() == gu.scalar_type(),
              "moe_swiglu_backward_: dgu must have gu's shape ", gu.sizes(), " and dtype");
  if (dh.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gu.scalar_type(), "moe_swiglu_backward_", [&] {
    auto kern = moe_swiglu_backward_kernel<scalar_t>;
    MF_LAUNCH(kern, dim3(unsigned(gu.size(0))), dim3(kThreads), dh.data_ptr<scalar_t>(), gu.data_ptr<scalar_t>(),
              dh.size(1), dgu.data_ptr<scalar_t>());
  });
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(MF_NS, m) {
  m.def("moe_routing(Tensor expert_idx, int num_experts, Tensor(a!) perm, Tensor(b!) token, Tensor(c!) inv_perm, "
        "Tensor(d!) offsets, Tensor(e!) block_counts) -> ()", &moe_routing);
  m.def("moe_permute(Tensor x, Tensor row_idx, Tensor? scale, Tensor? scale_idx, Tensor(a!) out) -> ()", &moe_permute);
  m.def("moe_unpermute(Tensor y, Tensor inv_perm, Tensor? weight, int top_k, Tensor(a!) out) -> ()", &moe_unpermute);
  m.def("moe_unpermute_weight_grad(Tensor dout, Tensor y, Tensor inv_perm, int top_k, Tensor(a!) dw) -> ()",
        &moe_unpermute_weight_grad);
  m.def("moe_swiglu(Tensor gu, Tensor(a!) h) -> ()", &moe_swiglu);
  m.def("moe_swiglu_backward_(Tensor(a!) dh, Tensor gu, Tensor(b!) dgu) -> ()", &moe_swiglu_backward_);
}
