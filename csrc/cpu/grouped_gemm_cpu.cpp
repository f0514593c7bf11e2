// grouped_gemm_cpu.cpp: the grouped GEMMs of moe_mlp's cpu backend (moon_fast._C_cpu, torch.ops.moon_fast_cpu).
//
//   moe_grouped_mm(a (S, K), b (E, K, N), offsets (E,) int32, out (S, N)!)
//       out[rows_e] = a[rows_e] @ b[e]
//   moe_grouped_mm_wgrad(a (S, M), b (S, N), offsets (E,) int32, out (E, M, N)!)
//       out[e] = a[rows_e]^T @ b[rows_e]   (zero for an expert with no rows): a grouped layer's weight gradient
//
// rows_e = [offsets[e - 1], offsets[e]) with offsets[-1] = 0: grouped_mm's convention (cumulative row ends).
// b may be any strided view (e.g. gate_up_proj.transpose(1, 2)); a, out contiguous.
//
// Why not torch's grouped_mm, which calls one multithreaded oneDNN GEMM per expert:
//  * oneDNN splits each small per-expert GEMM over all threads, and at some shapes gains nothing from it
//    (on the development machine bf16 (1024 x 1024) @ (1024 x 1024) is no faster on 2 threads than on 1);
//  * the weight gradient reads A transposed (column-major), and oneDNN's bf16 GEMM runs that layout at about
//    0.7x the rate of a row-major A (9.22 against 6.51 ms for one expert's share).
// (`python benchmarks/cpu_probes.py gemm-layouts` measures both.)
// Here the work is cut into independent tasks, each one single-threaded GEMM call (inside a parallel region
// oneDNN and MKL run on the calling thread): a chunk of an expert's rows; for the weight gradient a chunk of
// an expert's output rows, whose block of A the task first copies transposed into a per-thread scratch
// buffer in fp16 / bf16 (fp32 goes to MKL, which reads a transposed A at nearly full speed). Threads
// take tasks largest first from a shared counter, so uneven experts balance. Each output element is computed
// by one task, so no reduction crosses tasks.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <utility>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#include <cstdint>
#include <vector>

namespace {

struct Task {
  int64_t expert, begin, end;  // rows [begin, end) of a (grouped_mm) or of the output (wgrad)
  int64_t work;                // multiply-adds, for the largest-first order
};

// Row bounds of each expert from grouped_mm-style offsets: bounds[e] .. bounds[e + 1].
std::vector<int64_t> expert_bounds(const at::Tensor& offsets, int64_t rows) {
  TORCH_CHECK(offsets.device().is_cpu() && offsets.dim() == 1 && offsets.scalar_type() == at::kInt,
              "moon_fast_cpu: offsets must be a 1-D int32 CPU tensor (cumulative row ends per expert)");
  const auto off = offsets.contiguous();
  const int32_t* o = off.data_ptr<int32_t>();
  std::vector<int64_t> bounds{0};
  for (int64_t e = 0; e < off.numel(); ++e) {
    TORCH_CHECK(o[e] >= bounds.back() && o[e] <= rows, "moon_fast_cpu: offsets must be non-decreasing and at most ",
                rows, ", got offsets[", e, "] = ", o[e]);
    bounds.push_back(o[e]);
  }
  TORCH_CHECK(bounds.back() == rows, "moon_fast_cpu: offsets[-1] = ", bounds.back(), " must equal the row count ", rows);
  return bounds;
}

// Splits [0, n) into round(n / target) near-equal chunks (at least one when n > 0). Rounding, not ceil: an
// expert a few rows over the target stays one GEMM call rather than two half-size ones (each call also
// re-reads and re-packs the expert's weights).
template <class F>
void split(int64_t n, int64_t target, F emit) {
  const int64_t parts = std::max<int64_t>(1, (n + target / 2) / target);
  for (int64_t p = 0; p < parts; ++p) emit(n * p / parts, n * (p + 1) / parts);
}

// Runs f(task) for every task on torch's intra-op threads, largest first, one task at a time per thread.
template <class F>
void run_tasks(std::vector<Task>& tasks, F f) {
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& x, const Task& y) { return x.work > y.work; });
  std::atomic<size_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(tasks.size()));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    // The worker threads do not inherit the caller's thread-local state (grad mode, inference mode). The
    // GEMMs write into out= tensors that may be inference tensors: go straight to the CPU kernels, below
    // autograd and the in-place checks, as the caller's dispatch already went through them.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (size_t i; (i = next.fetch_add(1)) < tasks.size();) f(tasks[i]);
  });
}

// Target multiply-adds per task: about four tasks per thread, so the last ones balance the threads, but no
// smaller than a (128 x K) @ (K x N) call, below which a GEMM call runs well under its peak rate.
int64_t task_work(int64_t total, int64_t min_work) {
  return std::max<int64_t>(min_work, total / (4 * std::max(1, at::get_num_threads())));
}

#if defined(__SSE2__)
// dst[j * ldd + i] = src[i * lds + j] for an 8 x 8 block of 16-bit elements: three rounds of unpacks
// (pairs, then quads, then halves) turn 8 loaded rows into 8 columns.
inline void transpose_8x8_u16(const uint16_t* src, int64_t lds, uint16_t* dst, int64_t ldd) {
  __m128i r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i * lds));
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm_unpacklo_epi16(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm_unpackhi_epi16(r[2 * i], r[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h)      // rows 0-3, rows 4-7
    for (int q = 0; q < 2; ++q) {  // columns 0-3, columns 4-7
      r[4 * h + 2 * q] = _mm_unpacklo_epi32(t[4 * h + q], t[4 * h + q + 2]);
      r[4 * h + 2 * q + 1] = _mm_unpackhi_epi32(t[4 * h + q], t[4 * h + q + 2]);
    }
  for (int j = 0; j < 4; ++j) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (2 * j) * ldd), _mm_unpacklo_epi64(r[j], r[j + 4]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (2 * j + 1) * ldd), _mm_unpackhi_epi64(r[j], r[j + 4]));
  }
}
#endif

// dst (cols x rows, row stride ldd) = src (rows x cols, row stride lds)^T, 16-bit elements. Strips of 8 source
// rows (8 cache lines whatever lds is), 8 x 8 blocks in registers where SSE2 is there, scalar at the edges;
// ldd is chosen by the caller so the destination rows do not share cache sets (see padded_stride).
void transpose_u16(const uint16_t* src, int64_t lds, uint16_t* dst, int64_t ldd, int64_t rows, int64_t cols) {
  int64_t full_rows = 0, full_cols = 0;
#if defined(__SSE2__)
  full_rows = rows / 8 * 8;
  full_cols = cols / 8 * 8;
  for (int64_t r0 = 0; r0 < full_rows; r0 += 8)
    for (int64_t c0 = 0; c0 < full_cols; c0 += 8) transpose_8x8_u16(src + r0 * lds + c0, lds, dst + c0 * ldd + r0, ldd);
#endif
  for (int64_t r = 0; r < rows; ++r)  // the edges: columns past full_cols of every row, then the last rows
    for (int64_t c = r < full_rows ? full_cols : 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
}

// A row stride (in elements) for `cols` columns: whole cache lines, an odd number of them, so consecutive
// rows fall in different cache sets (a power-of-two stride maps every row to the same few sets).
int64_t padded_stride(int64_t cols, int64_t elem) {
  int64_t lines = (cols * elem + 63) / 64;
  if (lines % 2 == 0) ++lines;
  return lines * 64 / elem;
}

// Bound on one task's transposed block, and so on the per-thread scratch below (a task still gets at least 16
// output rows, so an expert with more than 256K rows can exceed it).
constexpr int64_t kScratchBytes = 8 << 20;

// Per-thread scratch for the transposed blocks, kept between calls (a fresh buffer would be page-faulted in
// on every call), 64-byte aligned as torch's allocator is (in an ad-hoc test, not kept, oneDNN's bf16 GEMM was
// markedly slower on a 16-byte-aligned A).
uint16_t* scratch_u16(int64_t n) {
  thread_local std::vector<uint16_t> buffer;
  constexpr int64_t kAlign = 64 / sizeof(uint16_t);
  if (static_cast<int64_t>(buffer.size()) < n + kAlign) buffer.resize(n + kAlign);
  const auto address = reinterpret_cast<std::uintptr_t>(buffer.data());
  return reinterpret_cast<uint16_t*>((address + 63) / 64 * 64);
}

// (cols x rows) = block^T in this thread's scratch (valid until the thread's next call), unit column stride,
// row stride padded_stride; block (rows x cols) 16-bit elements, unit column stride.
at::Tensor transposed_u16(const at::Tensor& block) {
  const int64_t rows = block.size(0), cols = block.size(1);
  const int64_t ld = padded_stride(rows, 2);
  uint16_t* dst = scratch_u16(cols * ld);
  transpose_u16(static_cast<const uint16_t*>(block.data_ptr()), block.stride(0), dst, ld, rows, cols);
  // oneDNN's bf16 kernels read A in pairs along K and let B's zero padding cancel the extra element, so an
  // odd row length reads one element of the padding: it must be a finite number (stale scratch can be NaN).
  for (int64_t c = 0; c < cols; ++c) std::fill(dst + c * ld + rows, dst + (c + 1) * ld, uint16_t{0});
  return at::from_blob(dst, {cols, rows}, {ld, 1}, block.options());
}

// Device, rank, layout and dtype of a grouped GEMM's operands; each op checks the shapes. a and out must be
// contiguous, b only where b_contiguous.
void check_operands(const char* op, const at::Tensor& a, const at::Tensor& b, int64_t b_dims, bool b_contiguous,
                    const at::Tensor& out, int64_t out_dims) {
  const std::pair<const at::Tensor*, const char*> operands[] = {{&a, "a"}, {&b, "b"}, {&out, "out"}};
  const int64_t dims[] = {2, b_dims, out_dims};
  for (int i = 0; i < 3; ++i) {
    const auto& [t, name] = operands[i];
    TORCH_CHECK(t->device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t->device());
    TORCH_CHECK(t->dim() == dims[i], op, ": ", name, " must be ", dims[i], "-D, got ", t->sizes());
    TORCH_CHECK(t->is_contiguous() || (t == &b && !b_contiguous), op, ": ", name, " must be contiguous");
  }
  TORCH_CHECK(a.scalar_type() == b.scalar_type() && out.scalar_type() == a.scalar_type(), op,
              ": a, b and out must share a dtype, got ", a.scalar_type(), ", ", b.scalar_type(), ", ", out.scalar_type());
}

void moe_grouped_mm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets, at::Tensor out) {
  const char* op = "moe_grouped_mm";
  check_operands(op, a, b, 3, /*b_contiguous=*/false, out, 2);
  TORCH_CHECK(b.size(1) == a.size(1) && out.size(0) == a.size(0) && out.size(1) == b.size(2) &&
                  offsets.numel() == b.size(0),
              op, ": a (S, K), b (E, K, N), offsets (E,), out (S, N); got a ", a.sizes(), ", b ", b.sizes(),
              ", offsets ", offsets.sizes(), ", out ", out.sizes());
  const auto bounds = expert_bounds(offsets, a.size(0));
  if (out.numel() == 0) return;
  const int64_t k = a.size(1), n = b.size(2);
  if (k == 0) {
    out.zero_();
    return;
  }
  const int64_t target_rows = std::max<int64_t>(1, task_work(a.size(0) * k * n, 128 * k * n) / (k * n));
  std::vector<Task> tasks;
  for (int64_t e = 0; e < b.size(0); ++e)
    split(bounds[e + 1] - bounds[e], target_rows, [&](int64_t lo, int64_t hi) {
      tasks.push_back({e, bounds[e] + lo, bounds[e] + hi, (hi - lo) * k * n});
    });
  const at::Tensor a_ = a.detach(), b_ = b.detach();
  run_tasks(tasks, [&](const Task& t) {
    at::Tensor o = out.narrow(0, t.begin, t.end - t.begin);
    at::mm_out(o, a_.narrow(0, t.begin, t.end - t.begin), b_.select(0, t.expert));
  });
}

void moe_grouped_mm_wgrad(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets, at::Tensor out) {
  const char* op = "moe_grouped_mm_wgrad";
  check_operands(op, a, b, 2, /*b_contiguous=*/true, out, 3);
  TORCH_CHECK(b.size(0) == a.size(0) && out.size(0) == offsets.numel() && out.size(1) == a.size(1) &&
                  out.size(2) == b.size(1),
              op, ": a (S, M), b (S, N), offsets (E,), out (E, M, N); got a ", a.sizes(), ", b ", b.sizes(),
              ", offsets ", offsets.sizes(), ", out ", out.sizes());
  const auto bounds = expert_bounds(offsets, a.size(0));
  if (out.numel() == 0) return;
  const int64_t m = a.size(1), n = b.size(1);
  const int64_t target = task_work(a.size(0) * m * n, 128 * n * 128);
  std::vector<Task> tasks;
  for (int64_t e = 0; e < out.size(0); ++e) {
    const int64_t rows = bounds[e + 1] - bounds[e];
    if (rows == 0) {
      out.select(0, e).zero_();  // no tokens: the gradient is zero, not left unwritten
      continue;
    }
    // Output rows per task: about the target work, at least 16, and a transposed block within the scratch bound.
    const int64_t target_m =
        std::max<int64_t>(16, std::min(target / (rows * n), kScratchBytes / (2 * padded_stride(rows, 2))));
    split(m, target_m, [&](int64_t lo, int64_t hi) { tasks.push_back({e, lo, hi, rows * (hi - lo) * n}); });
  }
  // fp16 / bf16 go to oneDNN's brgemm, which is markedly slower with a transposed A: copy it. fp32 goes to
  // MKL's sgemm, which takes a transposed A at nearly full speed: the copy would only cost
  // (`python benchmarks/cpu_probes.py gemm-layouts [--dtype fp32]`).
  const bool copy_transposed = a.element_size() == 2;
  const at::Tensor a_ = a.detach(), b_ = b.detach();
  run_tasks(tasks, [&](const Task& t) {
    const int64_t lo = bounds[t.expert], rows = bounds[t.expert + 1] - lo;
    at::Tensor o = out.select(0, t.expert).narrow(0, t.begin, t.end - t.begin);
    const at::Tensor block = a_.narrow(0, lo, rows).narrow(1, t.begin, t.end - t.begin);
    at::mm_out(o, copy_transposed ? transposed_u16(block) : block.t(), b_.narrow(0, lo, rows));
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moon_fast_cpu, m) {
  m.def("moe_grouped_mm(Tensor a, Tensor b, Tensor offsets, Tensor(a!) out) -> ()", &moe_grouped_mm);
  m.def("moe_grouped_mm_wgrad(Tensor a, Tensor b, Tensor offsets, Tensor(a!) out) -> ()", &moe_grouped_mm_wgrad);
}
