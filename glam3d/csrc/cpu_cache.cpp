// glam3d's caching CPU allocator, bounded by the peak of the live tensors (glam3d/cpu_cache.py says why).
//
// Blocks of at least `min_bytes` are rounded up to 2 MiB, aligned to 2 MiB (transparent huge pages) and, when
// a tensor frees them, kept for the next request of about that size (best fit, at most 1/8 larger) instead of
// going back to the OS and being faulted in and zeroed again. The cache never lets its mapped bytes exceed the
// highest live total seen so far plus `slack_bytes`, and never holds more than `cap_bytes`: before a miss maps
// a new block, the blocks freed longest ago are unmapped until the new one fits under that bound. So peak
// memory is the peak of the live tensors plus at most the slack, while a network that allocates the same sizes
// at every forward (sliding-window inference) reuses its blocks. When a miss would have to unmap cached blocks
// to stay under the bound, the one of them closest in size is resized to the request instead (its tail unmapped,
// or the mapping grown with mremap), so only the bytes it grows by are faulted in and zeroed, not the whole
// block: the same blocks stay cached and the same bytes stay mapped as if it had been unmapped and a fresh block
// mapped. Blocks are mappings of their own (mmap / munmap). Smaller blocks go to the allocator that was in
// place before. Plain C interface for ctypes: no Python headers, only c10.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <pthread.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <list>
#include <map>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

constexpr int kStats = 12;  // glam3d_cache_stats' fields
constexpr size_t kHuge = size_t(2) << 20;  // 2 MiB: huge-page size, alignment and rounding granularity

// `size` bytes (a multiple of kHuge) at a kHuge-aligned address, with protection `prot`; nullptr when the
// address space or memory is exhausted.
void* map_aligned(size_t size, int prot) {
  void* raw = mmap(nullptr, size + kHuge, prot, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  uintptr_t start = reinterpret_cast<uintptr_t>(raw);
  uintptr_t aligned = (start + kHuge - 1) / kHuge * kHuge;
  if (aligned > start) munmap(raw, aligned - start);
  size_t tail = start + size + kHuge - (aligned + size);
  if (tail) munmap(reinterpret_cast<void*>(aligned + size), tail);
  return reinterpret_cast<void*>(aligned);
}

void* map_block(size_t size) {
  void* p = map_aligned(size, PROT_READ | PROT_WRITE);
#ifdef MADV_HUGEPAGE
  if (p != nullptr) madvise(p, size, MADV_HUGEPAGE);
#endif
  return p;
}

void unmap_block(void* p, size_t size) { munmap(p, size); }

// The block `p` of `old_size` bytes as a block of `size` bytes (its first min(old, size) bytes kept in place of
// being faulted in again): the tail unmapped, or the mapping grown (in place, else moved to a fresh aligned
// address). nullptr when it cannot grow; `p` is then unchanged.
void* resize_block(void* p, size_t old_size, size_t size) {
  if (size <= old_size) {
    if (size < old_size) munmap(static_cast<char*>(p) + size, old_size - size);
    return p;
  }
  void* q = mremap(p, old_size, size, 0);  // grow in place when the addresses after it are free
  if (q != MAP_FAILED) return q;
  void* target = map_aligned(size, PROT_NONE);  // an aligned range to move it to (replaced by mremap)
  if (target == nullptr) return nullptr;
  q = mremap(p, old_size, size, MREMAP_MAYMOVE | MREMAP_FIXED, target);
  if (q == MAP_FAILED) {
    munmap(target, size);
    return nullptr;
  }
  return q;
}

class CachingCPUAllocator final : public c10::Allocator {
 public:
  CachingCPUAllocator(c10::Allocator* fallback, size_t cap, size_t slack, size_t min_bytes)
      : fallback_(fallback), fallback_raw_(fallback->raw_deleter()), cap_(cap), slack_(slack), min_(min_bytes) {}

  c10::DataPtr allocate(size_t n) override {
    if (n < min_) return fallback_->allocate(n);  // its DataPtr: context == data, freed by fallback_raw_
    size_t size = (n + kHuge - 1) / kHuge * kHuge;
    void* p = nullptr;
    std::pair<void*, size_t> reuse{nullptr, 0};  // an evicted block to resize into this one
    std::vector<std::pair<void*, size_t>> evicted;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.lower_bound(size);
      if (it != free_.end() && it->first <= size + size / 8) {
        auto entry = it->second;
        p = entry->first;
        size = entry->second;
        free_.erase(it);
        order_.erase(entry);
        cached_ -= size;
        ++hits_;
      } else {
        ++misses_;
        size_t bound = std::max(peak_live_, live_ + size) + slack_;
        while (!order_.empty() && live_ + cached_ + size > bound) evicted.push_back(evict_oldest());
        if (!evicted.empty()) {
          // the smallest evicted block that is large enough (no fault at all), else the largest one
          auto best = evicted.begin();
          for (auto e = evicted.begin(); e != evicted.end(); ++e) {
            bool fits = e->second >= size, best_fits = best->second >= size;
            if (fits != best_fits ? fits : (fits ? e->second < best->second : e->second > best->second)) best = e;
          }
          reuse = *best;
          evicted.erase(best);
          ++resizes_;
        }
        fresh_ += reuse.first == nullptr ? size : (size > reuse.second ? size - reuse.second : 0);
      }
      live_ += size;
      peak_live_ = std::max(peak_live_, live_);
      peak_ = std::max(peak_, live_ + cached_);
    }
    for (auto& e : evicted) unmap_block(e.first, e.second);
    if (reuse.first != nullptr) {
      p = resize_block(reuse.first, reuse.second, size);
      if (p == nullptr) {  // could not grow: a fresh block below, all of it new
        unmap_block(reuse.first, reuse.second);
        std::lock_guard<std::mutex> lock(mu_);
        fresh_ += reuse.second;
      }
    }
    if (p == nullptr) {
      p = map_block(size);
      if (p == nullptr) {
        release_all();  // give the cache back and try once more before reporting out of memory
        p = map_block(size);
        if (p == nullptr) {
          std::lock_guard<std::mutex> lock(mu_);
          live_ -= size;
          TORCH_CHECK(false, "glam3d CPU cache: out of memory allocating ", n, " bytes");
        }
      }
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      live_sizes_[p] = size;
    }
    return {p, p, &CachingCPUAllocator::deleter, c10::Device(c10::DeviceType::CPU)};
  }

  // The raw interface (context == data pointer) is used inside PyTorch (e.g. oneDNN scratch memory), so
  // every block this allocator hands out, small ones from the fallback included, is freed through it.
  c10::DeleterFnPtr raw_deleter() const override { return &CachingCPUAllocator::deleter; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }

  static void deleter(void* ptr);

  void give_back(void* p) {
    std::vector<std::pair<void*, size_t>> evicted;
    bool small = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto found = live_sizes_.find(p);
      if (found == live_sizes_.end()) {
        small = true;  // the fallback's block: freed below, outside the lock
      } else {
        size_t size = found->second;
        live_sizes_.erase(found);
        live_ -= size;
        order_.emplace_back(p, size);
        free_.emplace(size, std::prev(order_.end()));
        cached_ += size;
        while (cached_ > cap_) evicted.push_back(evict_oldest());
      }
    }
    if (small) fallback_raw_(p);
    for (auto& e : evicted) unmap_block(e.first, e.second);
  }

  void release_all() {
    std::list<std::pair<void*, size_t>> all;
    {
      std::lock_guard<std::mutex> lock(mu_);
      all.swap(order_);
      free_.clear();
      evictions_ += all.size();
      cached_ = 0;
    }
    for (auto& e : all) unmap_block(e.first, e.second);
  }

  void stats(int64_t* out) {
    std::lock_guard<std::mutex> lock(mu_);
    const size_t v[kStats] = {live_, cached_, peak_, peak_live_, hits_,     misses_,
                              evictions_, cap_, slack_, min_, resizes_, fresh_};
    for (int i = 0; i < kStats; ++i) out[i] = int64_t(v[i]);
  }

  // fork() while another thread holds the lock would leave the child's copy locked forever: hold it across.
  void lock() { mu_.lock(); }
  void unlock() { mu_.unlock(); }

  void reset_peak() {
    std::lock_guard<std::mutex> lock(mu_);
    peak_ = live_ + cached_;
    peak_live_ = live_;
  }

 private:
  // Caller holds mu_. Unlinks the block freed longest ago; the caller unmaps it outside the lock.
  std::pair<void*, size_t> evict_oldest() {
    auto entry = order_.begin();
    auto range = free_.equal_range(entry->second);
    for (auto it = range.first; it != range.second; ++it) {
      if (it->second == entry) { free_.erase(it); break; }
    }
    std::pair<void*, size_t> block = *entry;
    cached_ -= block.second;
    order_.erase(entry);
    ++evictions_;
    return block;
  }

  c10::Allocator* fallback_;
  c10::DeleterFnPtr fallback_raw_;
  size_t cap_, slack_, min_;
  std::mutex mu_;
  std::list<std::pair<void*, size_t>> order_;  // cached blocks, oldest free first
  std::multimap<size_t, std::list<std::pair<void*, size_t>>::iterator> free_;  // size -> its entry of order_
  std::unordered_map<void*, size_t> live_sizes_;  // large blocks in use -> their size
  size_t live_ = 0, cached_ = 0, peak_ = 0, peak_live_ = 0, hits_ = 0, misses_ = 0, evictions_ = 0;
  size_t resizes_ = 0;  // misses served by resizing an evicted block
  size_t fresh_ = 0;    // bytes new to a miss's block: faulted in and zeroed at first touch
};

CachingCPUAllocator* g_alloc = nullptr;

void CachingCPUAllocator::deleter(void* ptr) { g_alloc->give_back(ptr); }

}  // namespace

extern "C" {

// Installs the cache as PyTorch's CPU allocator, once per process. Returns 1 when installed now, 0 when it
// already was (the first settings stay), -1 when the allocator in place has no raw deleter (nothing installed).
int glam3d_cache_install(int64_t cap_bytes, int64_t slack_bytes, int64_t min_bytes) {
  if (g_alloc != nullptr) return 0;
  c10::Allocator* current = c10::GetCPUAllocator();
  if (current->raw_deleter() == nullptr) return -1;  // small blocks could not be freed through the raw interface
  g_alloc = new CachingCPUAllocator(current, size_t(cap_bytes), size_t(slack_bytes), size_t(min_bytes));
  pthread_atfork([] { g_alloc->lock(); }, [] { g_alloc->unlock(); }, [] { g_alloc->unlock(); });
  c10::SetCPUAllocator(g_alloc, /*priority=*/1);
  return 1;
}

int glam3d_cache_installed() { return (g_alloc != nullptr && c10::GetCPUAllocator() == g_alloc) ? 1 : 0; }

// out[12]: live bytes, cached bytes, peak (live + cached), peak live, hits, misses, evictions, cap, slack, min,
// resizes (misses served by resizing an evicted block), fresh bytes (new to a miss's block)
void glam3d_cache_stats(int64_t* out) {
  if (g_alloc == nullptr) { std::memset(out, 0, kStats * sizeof(int64_t)); return; }
  g_alloc->stats(out);
}

void glam3d_cache_empty() { if (g_alloc != nullptr) g_alloc->release_all(); }

void glam3d_cache_reset_peak() { if (g_alloc != nullptr) g_alloc->reset_peak(); }
}
