// moe_cpu.cpp: the element-wise steps of moe_mlp as native CPU kernels (moon_fast._C_cpu).
//
// The `cpu` backend of moe_mlp runs the dataflow of the csrc backend (moon_fast/ops/moe_cuda.py) with
// the GEMMs on grouped_mm (oneDNN / MKL) and every other step here, one pass over memory each, where the
// `torch` backend needs one ATen kernel per product or activation (plus an index_select before each
// reduction). S = T * k slots in expert-contiguous ("sorted") order; slot s = t * k + j.
//
//   moe_permute(x (R, H), row_idx (S,), scale (n,)?, scale_idx (S,)?, out (S, H)!)
//       out[i] = scale[scale_idx[i]] * x[row_idx[i]]          gather (with the routing weight in the backward)
//   moe_unpermute(y (S, H), inv_perm (S,), weight (T, k)?, k, out (T, H)!)
//       out[t] = sum_j weight[t, j] * y[inv_perm[t * k + j]]  weighted combine (weight absent = 1)
//   moe_unpermute_weight_grad(dout (T, H), y (S, H), inv_perm (S,), k, dw (T, k)!)
//       dw[t, j] = <dout[t], y[inv_perm[t * k + j]]>
//   moe_swiglu(gu (S, 2I), h (S, I)!)
//       h = silu(gate) * up, gate = gu[:, :I], up = gu[:, I:]
//   moe_swiglu_backward_(dh (S, I)!, gu (S, 2I), dgu (S, 2I)!)
//       dgu = [dh * up * s * (1 + gate * (1 - s)), dh * silu(gate)], s = sigmoid(gate); then overwrites dh
//       with h = silu(gate) * up (the forward's activation, which the down projection's weight gradient
//       needs) from the same reads, in the memory of dh, which is dead by then: no fresh (S, I) buffer.
//
// The signatures of the first three are those of csrc/moe.cu, so one Python dataflow drives both.
// Arithmetic is fp32 whatever the storage dtype (fp32, fp16, bf16), with one rounding per output, as in the
// CUDA kernels. Rows are independent: at::parallel_for splits them over torch's intra-op threads, and each
// row is written by one thread, so results do not depend on the thread count.
//
// Vectorisation: the row loops are plain C++ on float buffers, compiled by GCC for AVX-512, AVX2 and the
// baseline (target_clones) and picked at load time from the CPU's features. exp is a polynomial that
// vectorises (Cephes expf, about 2 ulp), since libm's expf does not. bf16 <-> fp32 are bit operations that
// vectorise; fp16 <-> fp32 use F16C intrinsics where the CPU has them.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MF_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define MF_ISA_CLONES "x86-64-v4,x86-64-v3,default"
#define MF_HAVE_FLOAT16 1  // GCC's _Float16, and F16C intrinsics where the CPU has them (see half_to_float)
#include <immintrin.h>
#else
#define MF_CLONES
#define MF_ISA_CLONES "default"
#endif

namespace {

// ------------------------------------------------------------------ fp32 row kernels (vectorised)

inline float exp_poly(float x) {
  // exp(x) = 2^n * e^r, n = round(x / ln 2), |r| <= ln 2 / 2; Cephes' degree-6 polynomial for e^r.
  x = std::min(std::max(x, -87.3f), 88.3f);
  const float shifter = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer in the low mantissa bits
  const float n = (x * 1.44269504089f + shifter) - shifter;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * std::bit_cast<float>(bits);
}

inline float sigmoid(float x) { return 1.f / (1.f + exp_poly(-x)); }

MF_CLONES void swiglu_row(const float* __restrict__ gate, const float* __restrict__ up, float* __restrict__ h,
                          long n) {
  for (long i = 0; i < n; ++i) h[i] = gate[i] * sigmoid(gate[i]) * up[i];
}

// h may alias dh (the op overwrites dh with h): element i is read before it is written, so no __restrict__ there.
MF_CLONES void swiglu_backward_row(const float* dh, const float* __restrict__ gate, const float* __restrict__ up,
                                   float* __restrict__ dgate, float* __restrict__ dup, float* h, long n) {
  for (long i = 0; i < n; ++i) {
    const float g = gate[i], s = sigmoid(g), silu = g * s, d = dh[i];
    dup[i] = d * silu;
    dgate[i] = d * up[i] * s * (1.f + g * (1.f - s));
    h[i] = silu * up[i];
  }
}

MF_CLONES void scale_row(float w, const float* __restrict__ x, float* __restrict__ out, long n) {
  for (long i = 0; i < n; ++i) out[i] = w * x[i];
}

MF_CLONES void axpy_row(float w, const float* __restrict__ x, float* __restrict__ acc, long n) {
  for (long i = 0; i < n; ++i) acc[i] += w * x[i];
}

MF_CLONES float dot_row(const float* __restrict__ a, const float* __restrict__ b, long n) {
  // 16 partial sums: lets the compiler vectorise without reassociating (no -ffast-math).
  float part[16] = {};
  long i = 0;
  for (; i + 16 <= n; i += 16)
    for (int l = 0; l < 16; ++l) part[l] += a[i + l] * b[i + l];
  float total = 0.f;
  for (; i < n; ++i) total += a[i] * b[i];
  for (int l = 0; l < 16; ++l) total += part[l];
  return total;
}

MF_CLONES void bf16_to_float(const uint16_t* __restrict__ src, float* __restrict__ dst, long n) {
  for (long i = 0; i < n; ++i) dst[i] = std::bit_cast<float>(static_cast<uint32_t>(src[i]) << 16);
}

MF_CLONES void float_to_bf16(const float* __restrict__ src, uint16_t* __restrict__ dst, long n) {
  for (long i = 0; i < n; ++i) {  // round to nearest even, NaN stays NaN (what c10::BFloat16 does)
    const uint32_t bits = std::bit_cast<uint32_t>(src[i]);
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    dst[i] = src[i] != src[i] ? uint16_t(0x7FC0) : static_cast<uint16_t>(rounded);
  }
}

#ifdef MF_HAVE_FLOAT16
// GCC 12 converts _Float16 one element at a time even for x86-64-v3 (scalar vcvtph2ps in the objdump);
// F16C (in x86-64-v3 and up) converts 8 per instruction.
__attribute__((target("avx,f16c"))) void half_to_float_f16c(const uint16_t* __restrict__ src, float* __restrict__ dst,
                                                          long n) {
  long i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
}

__attribute__((target("avx,f16c"))) void float_to_half_f16c(const float* __restrict__ src, uint16_t* __restrict__ dst,
                                                          long n) {
  long i = 0;  // round to nearest even, as c10::Half
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
}

bool have_f16c() {
  static const bool yes = (__builtin_cpu_init(), __builtin_cpu_supports("f16c"));
  return yes;
}

void half_to_float(const _Float16* __restrict__ src, float* __restrict__ dst, long n) {
  if (have_f16c()) return half_to_float_f16c(reinterpret_cast<const uint16_t*>(src), dst, n);
  for (long i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

void float_to_half(const float* __restrict__ src, _Float16* __restrict__ dst, long n) {
  if (have_f16c()) return float_to_half_f16c(src, reinterpret_cast<uint16_t*>(dst), n);
  for (long i = 0; i < n; ++i) dst[i] = static_cast<_Float16>(src[i]);  // round to nearest even, as c10::Half
}
#endif

// ------------------------------------------------------------------ storage dtype <-> fp32 rows

// Rows of a storage dtype as fp32: float rows are used in place, the others go through a per-thread buffer.
template <typename scalar_t>
struct Rows {
  static const float* load(const scalar_t* src, float* buf, long n) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      return src;
    } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      bf16_to_float(reinterpret_cast<const uint16_t*>(src), buf, n);
      return buf;
#ifdef MF_HAVE_FLOAT16
    } else if constexpr (std::is_same_v<scalar_t, at::Half>) {
      half_to_float(reinterpret_cast<const _Float16*>(src), buf, n);
      return buf;
#endif
    } else {
      for (long i = 0; i < n; ++i) buf[i] = static_cast<float>(src[i]);
      return buf;
    }
  }
  // Where to compute an output row: the row itself for float, else the buffer (then store()).
  static float* target(scalar_t* dst, float* buf) {
    if constexpr (std::is_same_v<scalar_t, float>) return dst;
    else return buf;
  }
  static void store(const float* src, scalar_t* dst, long n) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (src != dst) std::memcpy(dst, src, n * sizeof(float));
    } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      float_to_bf16(src, reinterpret_cast<uint16_t*>(dst), n);
#ifdef MF_HAVE_FLOAT16
    } else if constexpr (std::is_same_v<scalar_t, at::Half>) {
      float_to_half(src, reinterpret_cast<_Float16*>(dst), n);
#endif
    } else {
      for (long i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
    }
  }
};

// Rows per task: enough elements that a thread's share is worth waking it for.
int64_t grain(long row_len) { return std::max<int64_t>(1, 32768 / std::max<long>(1, row_len)); }

// ------------------------------------------------------------------ argument checks

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "moon_fast_cpu: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "moon_fast_cpu: ", name, " must be contiguous");
}

void check_rows(const at::Tensor& t, const char* name) {
  check_cpu(t, name);
  TORCH_CHECK(t.dim() == 2, "moon_fast_cpu: ", name, " must be 2-D, got ", t.dim(), " dims");
}

void check_index(const at::Tensor& t, long bound, const char* name) {
  check_cpu(t, name);
  TORCH_CHECK(t.scalar_type() == at::kLong, "moon_fast_cpu: ", name, " must be int64, got ", t.scalar_type());
  if (t.numel() == 0) return;
  const auto [lo, hi] = at::aminmax(t);
  TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < bound, "moon_fast_cpu: ", name,
              " has values outside [0, ", bound, ")");
}

void check_same_dtype(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "moon_fast_cpu: ", name, " is ", t.scalar_type(), ", expected ",
              like.scalar_type());
}

#define MF_DISPATCH(dtype, name, ...) AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

// ------------------------------------------------------------------ ops

void moe_permute(const at::Tensor& x, const at::Tensor& row_idx, const std::optional<at::Tensor>& scale,
                 const std::optional<at::Tensor>& scale_idx, at::Tensor out) {
  check_rows(x, "x");
  check_rows(out, "out");
  check_index(row_idx, x.size(0), "row_idx");
  check_same_dtype(out, x, "out");
  TORCH_CHECK(out.size(0) == row_idx.numel() && out.size(1) == x.size(1), "moe_permute: out must be (len(row_idx), H)");
  TORCH_CHECK(scale.has_value() == scale_idx.has_value(), "moe_permute: give scale and scale_idx together");
  if (scale) {
    check_cpu(*scale, "scale");
    check_same_dtype(*scale, x, "scale");
    check_index(*scale_idx, scale->numel(), "scale_idx");
    TORCH_CHECK(scale_idx->numel() == row_idx.numel(), "moe_permute: scale_idx must match row_idx");
  }
  const long n = x.size(1);
  if (out.size(0) == 0 || n == 0) return;
  MF_DISPATCH(x.scalar_type(), "moe_permute", [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const int64_t* rows = row_idx.data_ptr<int64_t>();
    const scalar_t* w = scale ? scale->data_ptr<scalar_t>() : nullptr;
    const int64_t* w_idx = scale ? scale_idx->data_ptr<int64_t>() : nullptr;
    at::parallel_for(0, out.size(0), grain(n), [&](int64_t begin, int64_t end) {
      std::vector<float> in_buf(n), out_buf(n);
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* row = src + rows[i] * n;
        if (w == nullptr) {
          std::memcpy(dst + i * n, row, n * sizeof(scalar_t));
          continue;
        }
        float* o = Rows<scalar_t>::target(dst + i * n, out_buf.data());
        scale_row(static_cast<float>(w[w_idx[i]]), Rows<scalar_t>::load(row, in_buf.data(), n), o, n);
        Rows<scalar_t>::store(o, dst + i * n, n);
      }
    });
  });
}

void moe_unpermute(const at::Tensor& y, const at::Tensor& inv_perm, const std::optional<at::Tensor>& weight,
                   int64_t top_k, at::Tensor out) {
  check_rows(y, "y");
  check_rows(out, "out");
  check_same_dtype(out, y, "out");
  check_index(inv_perm, y.size(0), "inv_perm");
  TORCH_CHECK(top_k > 0 && out.size(0) * top_k == inv_perm.numel() && inv_perm.numel() == y.size(0) &&
                  out.size(1) == y.size(1),
              "moe_unpermute: y (T * k, H), inv_perm (T * k,), out (T, H)");
  if (weight) {
    check_cpu(*weight, "weight");
    check_same_dtype(*weight, y, "weight");
    TORCH_CHECK(weight->numel() == inv_perm.numel(), "moe_unpermute: weight must be (T, k)");
  }
  const long n = y.size(1);
  if (out.size(0) == 0 || n == 0) return;
  MF_DISPATCH(y.scalar_type(), "moe_unpermute", [&] {
    const scalar_t* src = y.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const int64_t* inv = inv_perm.data_ptr<int64_t>();
    const scalar_t* w = weight ? weight->data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, out.size(0), grain(n * top_k), [&](int64_t begin, int64_t end) {
      std::vector<float> in_buf(n), acc(n);
      for (int64_t t = begin; t < end; ++t) {
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t j = 0; j < top_k; ++j) {  // fixed order over j: deterministic
          const int64_t slot = t * top_k + j;
          const float wj = w != nullptr ? static_cast<float>(w[slot]) : 1.f;
          axpy_row(wj, Rows<scalar_t>::load(src + inv[slot] * n, in_buf.data(), n), acc.data(), n);
        }
        Rows<scalar_t>::store(acc.data(), dst + t * n, n);
      }
    });
  });
}

void moe_unpermute_weight_grad(const at::Tensor& dout, const at::Tensor& y, const at::Tensor& inv_perm, int64_t top_k,
                               at::Tensor dw) {
  check_rows(dout, "dout");
  check_rows(y, "y");
  check_rows(dw, "dw");
  check_same_dtype(y, dout, "y");
  check_same_dtype(dw, dout, "dw");
  check_index(inv_perm, y.size(0), "inv_perm");
  TORCH_CHECK(top_k > 0 && dout.size(0) * top_k == inv_perm.numel() && inv_perm.numel() == y.size(0) &&
                  dout.size(1) == y.size(1) && dw.size(0) == dout.size(0) && dw.size(1) == top_k,
              "moe_unpermute_weight_grad: dout (T, H), y (T * k, H), inv_perm (T * k,), dw (T, k)");
  const long n = y.size(1);
  if (dw.numel() == 0) return;
  MF_DISPATCH(y.scalar_type(), "moe_unpermute_weight_grad", [&] {
    const scalar_t* d = dout.data_ptr<scalar_t>();
    const scalar_t* src = y.data_ptr<scalar_t>();
    const int64_t* inv = inv_perm.data_ptr<int64_t>();
    scalar_t* out = dw.data_ptr<scalar_t>();
    at::parallel_for(0, dout.size(0), grain(n * top_k), [&](int64_t begin, int64_t end) {
      std::vector<float> d_buf(n), y_buf(n);
      for (int64_t t = begin; t < end; ++t) {
        const float* drow = Rows<scalar_t>::load(d + t * n, d_buf.data(), n);
        for (int64_t j = 0; j < top_k; ++j) {
          const int64_t slot = t * top_k + j;
          out[slot] = static_cast<scalar_t>(dot_row(drow, Rows<scalar_t>::load(src + inv[slot] * n, y_buf.data(), n), n));
        }
      }
    });
  });
}

void check_swiglu(const at::Tensor& gu, const at::Tensor& act, const char* name) {
  check_rows(gu, "gu");
  check_rows(act, name);
  check_same_dtype(act, gu, name);
  TORCH_CHECK(gu.size(1) % 2 == 0 && act.size(0) == gu.size(0) && act.size(1) * 2 == gu.size(1),
              "moe_swiglu: gu must be (S, 2I) and ", name, " (S, I); got ", gu.sizes(), " and ", act.sizes());
}

void moe_swiglu(const at::Tensor& gu, at::Tensor h) {
  check_swiglu(gu, h, "h");
  const long n = h.size(1);
  if (h.numel() == 0) return;
  MF_DISPATCH(gu.scalar_type(), "moe_swiglu", [&] {
    const scalar_t* src = gu.data_ptr<scalar_t>();
    scalar_t* dst = h.data_ptr<scalar_t>();
    at::parallel_for(0, gu.size(0), grain(3 * n), [&](int64_t begin, int64_t end) {
      std::vector<float> g_buf(n), u_buf(n), h_buf(n);
      for (int64_t s = begin; s < end; ++s) {
        const scalar_t* row = src + s * 2 * n;
        float* o = Rows<scalar_t>::target(dst + s * n, h_buf.data());
        swiglu_row(Rows<scalar_t>::load(row, g_buf.data(), n), Rows<scalar_t>::load(row + n, u_buf.data(), n), o, n);
        Rows<scalar_t>::store(o, dst + s * n, n);
      }
    });
  });
}

void moe_swiglu_backward_(at::Tensor dh, const at::Tensor& gu, at::Tensor dgu) {
  check_swiglu(gu, dh, "dh");
  check_rows(dgu, "dgu");
  check_same_dtype(dgu, gu, "dgu");
  TORCH_CHECK(dgu.sizes() == gu.sizes(), "moe_swiglu_backward_: dgu must have gu's shape ", gu.sizes());
  const long n = dh.size(1);
  if (dh.numel() == 0) return;
  MF_DISPATCH(gu.scalar_type(), "moe_swiglu_backward_", [&] {
    const scalar_t* g_src = gu.data_ptr<scalar_t>();
    scalar_t* dh_h = dh.data_ptr<scalar_t>();
    scalar_t* dgu_dst = dgu.data_ptr<scalar_t>();
    at::parallel_for(0, gu.size(0), grain(6 * n), [&](int64_t begin, int64_t end) {
      std::vector<float> g_buf(n), u_buf(n), dh_buf(n), dg_buf(n), du_buf(n), h_buf(n);
      for (int64_t s = begin; s < end; ++s) {
        const scalar_t* row = g_src + s * 2 * n;
        scalar_t* out = dgu_dst + s * 2 * n;
        scalar_t* dh_row = dh_h + s * n;
        float* dg = Rows<scalar_t>::target(out, dg_buf.data());
        float* du = Rows<scalar_t>::target(out + n, du_buf.data());
        float* hh = Rows<scalar_t>::target(dh_row, h_buf.data());  // fp32: h overwrites dh in place
        swiglu_backward_row(Rows<scalar_t>::load(dh_row, dh_buf.data(), n), Rows<scalar_t>::load(row, g_buf.data(), n),
                            Rows<scalar_t>::load(row + n, u_buf.data(), n), dg, du, hh, n);
        Rows<scalar_t>::store(dg, out, n);
        Rows<scalar_t>::store(du, out + n, n);
        Rows<scalar_t>::store(hh, dh_row, n);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY(moon_fast_cpu, m) {
  m.def("moe_permute(Tensor x, Tensor row_idx, Tensor? scale, Tensor? scale_idx, Tensor(a!) out) -> ()", &moe_permute);
  m.def("moe_unpermute(Tensor y, Tensor inv_perm, Tensor? weight, int top_k, Tensor(a!) out) -> ()", &moe_unpermute);
  m.def("moe_unpermute_weight_grad(Tensor dout, Tensor y, Tensor inv_perm, int top_k, Tensor(a!) dw) -> ()",
        &moe_unpermute_weight_grad);
  m.def("moe_swiglu(Tensor gu, Tensor(a!) h) -> ()", &moe_swiglu);
  m.def("moe_swiglu_backward_(Tensor(a!) dh, Tensor gu, Tensor(b!) dgu) -> ()", &moe_swiglu_backward_);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("ops_namespace") = "moon_fast_cpu";
  m.attr("isa_clones") = MF_ISA_CLONES;  // the instruction sets the row loops were compiled for
}
