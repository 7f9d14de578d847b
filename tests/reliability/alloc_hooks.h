// Allocation hooks of the reliability tests: this executable's own global operator new / delete
// (every form) and aligned_alloc. Being defined in the executable they interpose over libstdc++'s
// and glibc's for every object of the process, libmoe.so included, with no test-only code in the
// library. While armed they count host allocations made by the arming thread and can make the
// n-th (or the n-th and every later one) fail: operator new throws std::bad_alloc (nothrow forms
// return NULL), aligned_alloc returns NULL with ENOMEM.
//
// malloc itself is never interposed: libgomp aborts when malloc fails, and OpenBLAS allocates
// through its own mechanisms. aligned_alloc is counted only when libmoe's code calls it (libgomp
// calls it too, for its thread teams, and aborts on failure). The memory comes from malloc and
// posix_memalign, so AddressSanitizer and LeakSanitizer, when present, still see every block.
//
// Include this header in exactly one source file of an executable.
#pragma once
#include <dlfcn.h>
#include <link.h>

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <cstdio>
#include <new>
#include <string>
#include <vector>

namespace alloc_hooks {

constexpr int kMaxSites = 4096;
constexpr int64_t kMaxLog = int64_t{1} << 16;

struct State {
  std::atomic<bool> armed{false};
  std::atomic<int64_t> count{0};     // allocations counted while armed (the arming thread's)
  std::atomic<int64_t> buffers{0};   // of which aligned_alloc (backend buffers)
  std::atomic<int64_t> fail_at{0};   // 1-based index of the allocation that fails; 0: none
  std::atomic<bool> fail_after{false};  // every allocation after fail_at fails too
  std::atomic<int64_t> failed{0};    // allocations made to fail
  void *first_failed_site = nullptr; // call site of the first of them
  std::atomic<bool> failed_elsewhere{false};  // one of them was called from outside libmoe (its GEMM library)
  std::atomic<int64_t> foreign{0};   // operator new from another thread while armed (an OpenMP worker)
  // Call sites (return addresses) of counted allocations, and which of them were made to fail.
  std::atomic<int> nsites{0};
  void *site[kMaxSites];
  std::atomic<int64_t> site_count[kMaxSites];
  std::atomic<bool> site_failed[kMaxSites];
  // The call site of each counted allocation of the current run, in order (the first kMaxLog).
  void *log[kMaxLog];
};

inline State &state() {
  static State s;
  return s;
}

inline thread_local bool t_tester = false;  // the arming thread
inline thread_local int t_in_lib = 0;        // inside a libmoe call (InLib): only those are counted

// Marks a libmoe call: allocations of the test's own code around it are neither counted nor failed.
// Use as a temporary around the call's full expression: (alloc_hooks::InLib(), moe_forward(...)).
struct InLib {
  InLib() { ++t_in_lib; }
  ~InLib() { --t_in_lib; }
  InLib(const InLib &) = delete;
  InLib &operator=(const InLib &) = delete;
};

// Text ranges of the objects whose aligned_alloc calls are counted: the executable and libmoe*.
struct Range {
  uintptr_t lo, hi;
};
inline Range g_ranges[16];
inline int g_nranges = 0;

inline int collect(struct dl_phdr_info *info, size_t, void *) {
  const char *name = info->dlpi_name;
  const bool exe = name == nullptr || name[0] == '\0';
  const bool moe = name && std::strstr(name, "libmoe") != nullptr;
  if (!exe && !moe) return 0;
  for (int i = 0; i < info->dlpi_phnum && g_nranges < 16; ++i) {
    const ElfW(Phdr) &ph = info->dlpi_phdr[i];
    if (ph.p_type == PT_LOAD && (ph.p_flags & PF_X))
      g_ranges[g_nranges++] = {info->dlpi_addr + ph.p_vaddr, info->dlpi_addr + ph.p_vaddr + ph.p_memsz};
  }
  return 0;
}

inline bool from_libmoe(void *ret) {
  const auto a = reinterpret_cast<uintptr_t>(ret);
  for (int i = 0; i < g_nranges; ++i)
    if (a >= g_ranges[i].lo && a < g_ranges[i].hi) return true;
  return false;
}

inline void record_site(State &s, void *ret, bool failing) {
  const int n = s.nsites.load(std::memory_order_relaxed);
  for (int i = 0; i < n; ++i)
    if (s.site[i] == ret) {
      s.site_count[i].fetch_add(1, std::memory_order_relaxed);
      if (failing) s.site_failed[i] = true;
      return;
    }
  if (n < kMaxSites) {
    s.site[n] = ret;
    s.site_count[n] = 1;
    s.site_failed[n] = failing;
    s.nsites.store(n + 1, std::memory_order_relaxed);
  }
}

// Counts one allocation; true when it must fail.
inline bool should_fail(void *ret, bool buffer) {
  State &s = state();
  if (!s.armed.load(std::memory_order_relaxed)) return false;
  if (!t_tester) {
    if (!buffer) s.foreign.fetch_add(1);
    return false;
  }
  if (t_in_lib == 0) return false;
  const int64_t n = s.count.fetch_add(1) + 1;
  if (n <= kMaxLog) s.log[n - 1] = ret;
  if (buffer) s.buffers.fetch_add(1);
  const int64_t at = s.fail_at.load(std::memory_order_relaxed);
  const bool fail = at > 0 && (n == at || (n > at && s.fail_after.load(std::memory_order_relaxed)));
  record_site(s, ret, fail);
  if (fail && s.failed.fetch_add(1) == 0) s.first_failed_site = ret;
  if (fail && !from_libmoe(ret)) s.failed_elsewhere = true;
  return fail;
}

// Arms the hooks on the calling thread: allocation fail_at (1-based; 0 = none) fails, and with
// fail_after every later one too.
inline void arm(int64_t fail_at, bool fail_after = false) {
  State &s = state();
  if (g_nranges == 0) dl_iterate_phdr(collect, nullptr);
  t_tester = true;
  s.count = 0;
  s.buffers = 0;
  s.failed = 0;
  s.first_failed_site = nullptr;
  s.failed_elsewhere = false;
  s.foreign = 0;
  s.fail_at = fail_at;
  s.fail_after = fail_after;
  s.armed = true;
}

inline void disarm() { state().armed = false; }

// "object+0xoffset" of a code address.
inline std::string where(void *addr) {
  Dl_info info{};
  if (!addr || !dladdr(addr, &info) || !info.dli_fname) return "?";
  char buf[512];
  std::snprintf(buf, sizeof buf, "%s+0x%lx", info.dli_fname,
                (unsigned long)(reinterpret_cast<uintptr_t>(addr) - reinterpret_cast<uintptr_t>(info.dli_fbase)));
  return buf;
}

// Prints the call sites seen so far (object and offset), most frequent first.
inline void print_sites(FILE *out) {
  State &s = state();
  const int n = s.nsites;
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](int a, int b) { return s.site_count[a] > s.site_count[b]; });
  for (int i : order) {
    Dl_info info{};
    const char *obj = "?", *sym = "?";
    uintptr_t off = 0;
    if (dladdr(s.site[i], &info)) {
      obj = info.dli_fname ? info.dli_fname : "?";
      sym = info.dli_sname ? info.dli_sname : "?";
      off = reinterpret_cast<uintptr_t>(s.site[i]) - reinterpret_cast<uintptr_t>(info.dli_fbase);
    }
    std::fprintf(out, "  %8lld  %s+0x%lx (%s)%s\n", (long long)s.site_count[i].load(), obj, (unsigned long)off, sym,
                 s.site_failed[i] ? " failed" : "");
  }
}

inline void *new_impl(size_t n, void *ret) {
  if (should_fail(ret, false)) return nullptr;
  return std::malloc(n ? n : 1);
}

inline void *new_aligned_impl(size_t n, size_t align, void *ret) {
  if (should_fail(ret, false)) return nullptr;
  void *p = nullptr;
  if (posix_memalign(&p, align < sizeof(void *) ? sizeof(void *) : align, n ? n : 1) != 0) return nullptr;
  return p;
}

// Blocks of both new forms come from malloc / posix_memalign: free() releases them.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
inline void delete_impl(void *p) noexcept { std::free(p); }
#pragma GCC diagnostic pop

}  // namespace alloc_hooks

// ---- the interposed functions --------------------------------------------------------------------
#define ALLOC_HOOKS_RET __builtin_extract_return_addr(__builtin_return_address(0))

void *operator new(size_t n) {
  void *p = alloc_hooks::new_impl(n, ALLOC_HOOKS_RET);
  if (!p) throw std::bad_alloc();
  return p;
}
void *operator new[](size_t n) {
  void *p = alloc_hooks::new_impl(n, ALLOC_HOOKS_RET);
  if (!p) throw std::bad_alloc();
  return p;
}
void *operator new(size_t n, const std::nothrow_t &) noexcept { return alloc_hooks::new_impl(n, ALLOC_HOOKS_RET); }
void *operator new[](size_t n, const std::nothrow_t &) noexcept { return alloc_hooks::new_impl(n, ALLOC_HOOKS_RET); }
void *operator new(size_t n, std::align_val_t a) {
  void *p = alloc_hooks::new_aligned_impl(n, static_cast<size_t>(a), ALLOC_HOOKS_RET);
  if (!p) throw std::bad_alloc();
  return p;
}
void *operator new[](size_t n, std::align_val_t a) {
  void *p = alloc_hooks::new_aligned_impl(n, static_cast<size_t>(a), ALLOC_HOOKS_RET);
  if (!p) throw std::bad_alloc();
  return p;
}
void *operator new(size_t n, std::align_val_t a, const std::nothrow_t &) noexcept {
  return alloc_hooks::new_aligned_impl(n, static_cast<size_t>(a), ALLOC_HOOKS_RET);
}
void *operator new[](size_t n, std::align_val_t a, const std::nothrow_t &) noexcept {
  return alloc_hooks::new_aligned_impl(n, static_cast<size_t>(a), ALLOC_HOOKS_RET);
}
void operator delete(void *p) noexcept { alloc_hooks::delete_impl(p); }
void operator delete[](void *p) noexcept { alloc_hooks::delete_impl(p); }
void operator delete(void *p, size_t) noexcept { alloc_hooks::delete_impl(p); }
void operator delete[](void *p, size_t) noexcept { alloc_hooks::delete_impl(p); }
void operator delete(void *p, const std::nothrow_t &) noexcept { alloc_hooks::delete_impl(p); }
void operator delete[](void *p, const std::nothrow_t &) noexcept { alloc_hooks::delete_impl(p); }
void operator delete(void *p, std::align_val_t) noexcept { alloc_hooks::delete_impl(p); }
void operator delete[](void *p, std::align_val_t) noexcept { alloc_hooks::delete_impl(p); }
void operator delete(void *p, size_t, std::align_val_t) noexcept { alloc_hooks::delete_impl(p); }
void operator delete[](void *p, size_t, std::align_val_t) noexcept { alloc_hooks::delete_impl(p); }
void operator delete(void *p, std::align_val_t, const std::nothrow_t &) noexcept { alloc_hooks::delete_impl(p); }
void operator delete[](void *p, std::align_val_t, const std::nothrow_t &) noexcept { alloc_hooks::delete_impl(p); }

// The CPU backend's buffers. Blocks come from posix_memalign, so free() (not interposed) frees them.
extern "C" void *aligned_alloc(size_t align, size_t n) noexcept {
  void *ret = ALLOC_HOOKS_RET;
  if (alloc_hooks::from_libmoe(ret) && alloc_hooks::should_fail(ret, true)) {
    errno = ENOMEM;
    return nullptr;
  }
  void *p = nullptr;
  const int rc = posix_memalign(&p, align < sizeof(void *) ? sizeof(void *) : align, n);
  if (rc != 0) {
    errno = rc;
    return nullptr;
  }
  return p;
}
