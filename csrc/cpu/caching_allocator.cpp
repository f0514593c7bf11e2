// A caching allocator for CPU tensors: large blocks torch frees are kept in the process, keyed by their rounded
// size, and handed to the next request of that size, as CUDA's caching allocator does on the GPU.
//
// Why: glibc maps each large block afresh and unmaps it on free, so a training step page-faults all of its
// large temporaries in again (the torch MoE backend's fp32 step: ~9,000 faults, 90-980 ms of kernel time;
// python benchmarks/cpu_probes.py malloc-cache). Turning glibc's mmap off instead makes the heap grow without
// bound: posix_memalign asks for alignment slack, so a freed block never satisfies a request of its own size
// (the same probe, part 2). Here a freed block goes back only to a request of exactly its rounded size.
//
// * Blocks under kMinCached go straight to c10::alloc_cpu / free_cpu (glibc's bins serve them well).
// * Larger requests are rounded up to 1/8 of their power of two (waste <= 12.5%), so sizes that drift a
//   little between steps still meet in one bucket.
// * Cached (free) bytes are capped by `limit`: a block freed past it goes back to the system.
// * c10::alloc_cpu keeps torch's own behaviour: 64-byte alignment, huge pages under THP_MEM_ALLOC_ENABLE.
// * The allocator is never destroyed (tensors may be freed during static destruction at exit), and a fork
//   is bracketed by its mutex (pthread_atfork) so that a child never inherits it locked.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <pthread.h>
#include <torch/library.h>

#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {

constexpr size_t kMinCached = size_t{1} << 20;  // 1 MiB

size_t rounded_size(size_t n) {
  if (n < kMinCached) return n;
  size_t pow2 = kMinCached;
  while (pow2 * 2 <= n) pow2 *= 2;  // the largest power of two <= n
  const size_t step = pow2 / 8;
  return (n + step - 1) / step * step;
}

void free_any(void* ptr);

class CachingCpuAllocator final : public c10::Allocator {
 public:
  explicit CachingCpuAllocator(size_t limit) : limit_(limit) {}

  c10::DataPtr allocate(size_t n) override {
    if (n < kMinCached) {
      void* p = c10::alloc_cpu(n);
      return {p, p, &free_small, c10::Device(c10::DeviceType::CPU)};
    }
    const size_t size = rounded_size(n);
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.find(size);
      if (it != free_.end() && !it->second.empty()) {
        p = it->second.back();
        it->second.pop_back();
        cached_bytes_ -= size;
        ++hits_;
      } else {
        ++misses_;
      }
    }
    if (p == nullptr) {
      try {
        p = c10::alloc_cpu(size);
      } catch (const c10::Error&) {  // out of memory: give the cache back to the system and try once more
        empty_cache();
        p = c10::alloc_cpu(size);
      }
    }
    std::lock_guard<std::mutex> lock(mu_);
    live_[p] = size;
    return {p, p, &free_any, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &free_any; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // Returns a block: to the cache if it is one of ours and fits under the limit, else to the system.
  void release(void* p) {
    std::unique_lock<std::mutex> lock(mu_);
    auto it = live_.find(p);
    if (it == live_.end()) {  // a small block (raw_deleter path), or one allocated before enable()
      lock.unlock();
      c10::free_cpu(p);
      return;
    }
    const size_t size = it->second;
    live_.erase(it);
    if (cached_bytes_ + size <= limit_) {
      free_[size].push_back(p);
      cached_bytes_ += size;
      return;
    }
    lock.unlock();
    c10::free_cpu(p);
  }

  void empty_cache() {
    std::vector<void*> blocks;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto& [size, ptrs] : free_) blocks.insert(blocks.end(), ptrs.begin(), ptrs.end());
      free_.clear();
      cached_bytes_ = 0;
    }
    for (void* p : blocks) c10::free_cpu(p);
  }

  void set_limit(size_t limit) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      limit_ = limit;
    }
    empty_cache();  // simplest way to honour a lower limit at once
  }

  // [cached bytes, live large bytes, hits, misses, limit]
  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mu_);
    int64_t live_bytes = 0;
    for (const auto& [p, size] : live_) live_bytes += static_cast<int64_t>(size);
    return {static_cast<int64_t>(cached_bytes_), live_bytes, hits_, misses_, static_cast<int64_t>(limit_)};
  }

  std::mutex& mutex() { return mu_; }

 private:
  static void free_small(void* p) { c10::free_cpu(p); }

  std::mutex mu_;
  size_t limit_;
  size_t cached_bytes_ = 0;
  int64_t hits_ = 0, misses_ = 0;
  std::unordered_map<size_t, std::vector<void*>> free_;  // rounded size -> cached blocks
  std::unordered_map<void*, size_t> live_;               // large blocks handed out -> rounded size
};

CachingCpuAllocator* g_allocator = nullptr;  // set once, never destroyed

void free_any(void* p) { g_allocator->release(p); }

void enable(int64_t limit_bytes) {
  TORCH_CHECK(limit_bytes >= 0, "cpu_cache_enable: limit_bytes must be >= 0, got ", limit_bytes);
  static std::once_flag once;
  std::call_once(once, [] {
    g_allocator = new CachingCpuAllocator(0);
    pthread_atfork([] { g_allocator->mutex().lock(); }, [] { g_allocator->mutex().unlock(); },
                   [] { g_allocator->mutex().unlock(); });
  });
  g_allocator->set_limit(static_cast<size_t>(limit_bytes));
  c10::SetCPUAllocator(g_allocator, /*priority=*/1);
}

std::vector<int64_t> stats() {
  if (g_allocator == nullptr) return {0, 0, 0, 0, -1};
  return g_allocator->stats();
}

void empty_cache() {
  if (g_allocator != nullptr) g_allocator->empty_cache();
}

int64_t rounded(int64_t n) { return static_cast<int64_t>(rounded_size(static_cast<size_t>(n))); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(moon_fast_cpu, m) {
  m.def("cpu_cache_enable(int limit_bytes) -> ()", &enable);
  m.def("cpu_cache_stats() -> int[]", &stats);
  m.def("cpu_cache_empty() -> ()", &empty_cache);
  m.def("cpu_cache_rounded_size(int n) -> int", &rounded);
}
