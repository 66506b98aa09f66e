// Host emulation of the CUDA execution model: enough of it to compile csrc/cuda's real sources
// with a C++ compiler and run their kernels on the CPU under AddressSanitizer and
// UndefinedBehaviorSanitizer (tests/test_cuda_emulated.py builds and runs them; build.py says
// how the sources are compiled). Force-included before every translation unit.
//
// Model:
//   - A launch runs its grid's CTAs one after another, in blockIdx order (x fastest), on the
//     calling host thread. A CTA's threads are fibres, one per CUDA thread, each
//     with its own stack, switched cooperatively: a thread runs until it reaches a barrier or a
//     warp collective that is not complete, or returns; then the next ready thread runs. (Host
//     threads, one per CUDA thread, cost ~60 ms a launch to create under AddressSanitizer and a
//     futex wake-up a barrier: the emulated tests took 8 minutes that way.)
//   - __shared__ is `static`: one instance per kernel (template) instantiation, which is a CTA's
//     shared memory because only one CTA runs at a time. __constant__ is `static` too.
//   - __syncthreads is a barrier over the CTA's threads that have not returned (a thread that
//     returned counts as arrived, as on the GPU since sm_70); warp collectives (shuffles, votes,
//     __syncwarp, wmma::*_sync) are barriers over the lanes named in their mask.
//   - Device memory is host memory: torch's CPU tensors, and cudaMallocManaged is malloc.
// What it checks that a sanitizer alone would not (each a message naming the kernel, the block,
// the thread and the source line, then abort()):
//   - threads of one CTA waiting at different __syncthreads call sites (divergent barrier);
//   - a warp collective whose mask leaves out the calling lane, or names a lane that returned
//     or does not exist;
//   - wmma loads and stores from pointers not 32-byte aligned or with a lead dimension that is
//     not a multiple of 16 bytes, or called with different arguments by the lanes of a warp;
//   - a deadlock: threads that have not returned and none can run, each waiter's op and line
//     listed (found at once: the schedule is the emulation's own). Lanes of one mask at
//     collectives of different lines are one: sm_70+ would let them meet, no kernel here does;
//   - an invalid launch configuration (block over 1024 threads, an empty or too large grid),
//     reported as cudaErrorInvalidConfiguration through cudaGetLastError, as CUDA does.
// UBSan's alignment check stands in for the GPU's misaligned-address fault: a 16-byte vector
// access (uint4, float4) through a pointer that is not 16-byte aligned is reported.
// What it cannot show: timing, occupancy and register or shared-memory limits; the GPU's memory
// ordering and data races (threads interleave only at barriers and collectives, so a missing
// barrier shows only when this fixed schedule exposes it); races between CTAs (they never
// overlap); tensor-core rounding (mma_sync here is an fp32 sum in k order); reads of
// uninitialised shared memory (statics start as zeros).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <sys/mman.h>
#include <ucontext.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define FTK_EMU_ASAN 1
#endif

#include "cuda_runtime_api.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __shared__ static
#define __constant__ static
#define __align__(n) __attribute__((aligned(n)))
#define __syncthreads() ::ftk_emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::ftk_emu::Syncwarp{__FILE__, __LINE__}(__VA_ARGS__)

// The built-in variables: the scheduler sets them for the fibre it runs.
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

namespace ftk_emu {

// ---- fibre contexts ------------------------------------------------------------------------
// On x86-64 a switch pushes the callee-saved registers on the old stack, saves its stack
// pointer and loads the new one: a dozen instructions. swapcontext also saves the signal mask,
// a system call each switch, and a warp reduction switches 32 times a shuffle: the largest
// emulated ReFT case took 50 s with it and 2.4 s with this. Elsewhere, ucontext.
#if defined(__x86_64__)
struct Context {
  void* sp = nullptr;
};
extern "C" void ftk_emu_context_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .weak ftk_emu_context_switch
  .hidden ftk_emu_context_switch
  .type ftk_emu_context_switch, @function
ftk_emu_context_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size ftk_emu_context_switch, .-ftk_emu_context_switch
)");
inline void context_switch(Context* from, Context* to) { ftk_emu_context_switch(&from->sp, to->sp); }
// A fresh stack that the switch's pops and ret turn into a call of entry: six zero registers,
// entry as the return address, a null return address for entry (which never returns), and the
// stack 16-byte aligned at the call as the ABI wants.
inline void context_make(Context* c, char* stack, size_t bytes, void (*entry)()) {
  auto top = reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t{15};
  auto* sp = reinterpret_cast<uintptr_t*>(top);
  *--sp = 0;
  *--sp = reinterpret_cast<uintptr_t>(entry);
  for (int i = 0; i < 6; ++i) *--sp = 0;
  c->sp = sp;
}
#else
struct Context {
  ucontext_t uc;
};
inline void context_switch(Context* from, Context* to) { swapcontext(&from->uc, &to->uc); }
inline void context_make(Context* c, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&c->uc);
  c->uc.uc_stack.ss_sp = stack;
  c->uc.uc_stack.ss_size = bytes;
  c->uc.uc_link = nullptr;
  makecontext(&c->uc, entry, 0);
}
#endif

// ---- one CTA: its threads as fibres, its barriers ---------------------------------------------

// A fibre's stack: reserved, not committed, so generous against -O0 frames with redzones.
constexpr size_t kStackBytes = size_t{512} << 10;

struct Fiber {
  Context ctx;
  char* stack = nullptr;
  void* fake_stack = nullptr;  // AddressSanitizer's, across a switch
};

// A warp collective in progress: the lanes of its mask that have arrived, and their words.
struct Group {
  uint32_t mask = 0;
  uint32_t arrived = 0;
  const char* what = nullptr;
  const char* file = nullptr;
  int line = 0;
  std::vector<int> waiters;
  uint64_t word[32] = {};
  uint64_t word2[32] = {};
};

struct Warp {
  uint32_t exists = 0;  // lanes of the CTA in this warp (a last warp can be partial)
  uint32_t live = 0;
  // Collectives in progress: lanes of disjoint masks may be in different ones at once.
  std::vector<Group> pending;
  // Each lane's copy of the words of its last completed collective.
  uint64_t got[32][32] = {};
  uint64_t got2[32][32] = {};
};

struct Cta {
  int nthreads = 0;
  int live = 0;  // threads of the current block that have not returned
  // __syncthreads
  int arrived = 0;
  const char* file = nullptr;
  int line = 0;
  std::vector<int> waiters;
  std::vector<Warp> warps;
  std::vector<Fiber> fibers;
  std::deque<int> ready;
  int current = -1;
  Context scheduler;
  const void* scheduler_stack = nullptr;  // AddressSanitizer's view of the scheduler's stack
  size_t scheduler_stack_bytes = 0;
  void* scheduler_fake_stack = nullptr;
  const std::function<void()>* body = nullptr;
};

struct ThreadState {
  Cta* cta = nullptr;
  int tid = -1;
  const char* kernel = "";
};
inline thread_local ThreadState tls;

inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

[[noreturn]] inline void fail(const char* fmt, ...) {
  char msg[2048];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  std::fprintf(stderr, "ftk_emu: %s: block (%u,%u,%u) thread %d: %s\n", tls.kernel, blockIdx.x, blockIdx.y,
               blockIdx.z, tls.tid, msg);
  std::fflush(stderr);
  std::abort();
}

inline int lane_of(int tid) { return tid % 32; }
inline Warp& warp_of(Cta& c, int tid) { return c.warps[static_cast<size_t>(tid / 32)]; }

inline void set_thread(Cta& c, int t) {
  c.current = t;
  tls.tid = t;
  const dim3 b = blockDim;
  threadIdx = uint3{t % b.x, t / b.x % b.y, t / (b.x * b.y)};
}

inline void switch_to_fiber(Cta& c, int t) {
  set_thread(c, t);
  Fiber& f = c.fibers[static_cast<size_t>(t)];
#ifdef FTK_EMU_ASAN
  __sanitizer_start_switch_fiber(&c.scheduler_fake_stack, f.stack, kStackBytes);
#endif
  context_switch(&c.scheduler, &f.ctx);
#ifdef FTK_EMU_ASAN
  __sanitizer_finish_switch_fiber(c.scheduler_fake_stack, nullptr, nullptr);
#endif
}

inline void switch_to_scheduler(Cta& c, bool returning) {
  Fiber& f = c.fibers[static_cast<size_t>(c.current)];
#ifdef FTK_EMU_ASAN
  __sanitizer_start_switch_fiber(returning ? nullptr : &f.fake_stack, c.scheduler_stack, c.scheduler_stack_bytes);
#endif
  context_switch(&f.ctx, &c.scheduler);
#ifdef FTK_EMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, &c.scheduler_stack, &c.scheduler_stack_bytes);
#endif
  (void)returning;
}

// The current thread waits in `waiters` until a release moves it back to the ready queue.
inline void block_current(Cta& c, std::vector<int>& waiters) {
  waiters.push_back(c.current);
  switch_to_scheduler(c, false);
}

inline void release(Cta& c, std::vector<int>& waiters) {
  for (int t : waiters) c.ready.push_back(t);
  waiters.clear();
}

inline bool same_site(const char* f1, int l1, const char* f2, int l2) {
  return l1 == l2 && (f1 == f2 || std::strcmp(f1, f2) == 0);
}

// Completes __syncthreads when every thread that has not returned has arrived.
inline void try_release_cta(Cta& c) {
  if (c.arrived > 0 && c.arrived == c.live) {
    c.arrived = 0;
    c.file = nullptr;
    release(c, c.waiters);
  }
}

inline void syncthreads(const char* file, int line) {
  Cta& c = *tls.cta;
  if (c.arrived == 0) {
    c.file = file;
    c.line = line;
  } else if (!same_site(c.file, c.line, file, line)) {
    fail("divergent __syncthreads: this thread is at %s:%d, %d others wait at %s:%d", file, line, c.arrived, c.file,
         c.line);
  }
  ++c.arrived;
  if (c.arrived == c.live) try_release_cta(c);
  else block_current(c, c.waiters);
}

// Completes group i of w when every lane of its mask has arrived; a mask lane that returned or
// never existed can never arrive: the collective is broken.
inline bool try_release_group(Cta& c, Warp& w, size_t i) {
  Group& g = w.pending[i];
  if (g.mask & ~w.exists)
    fail("%s (%s:%d): mask 0x%08x names lanes that do not exist (warp lanes 0x%08x)", g.what, g.file, g.line, g.mask,
         w.exists);
  if (g.mask & ~w.live)
    fail("%s (%s:%d): mask 0x%08x names lanes that have returned (live 0x%08x)", g.what, g.file, g.line, g.mask,
         w.live);
  if (g.arrived != g.mask) return false;
  for (int l = 0; l < 32; ++l)
    if (g.mask >> l & 1u) {
      std::memcpy(w.got[l], g.word, sizeof g.word);
      std::memcpy(w.got2[l], g.word2, sizeof g.word2);
    }
  release(c, g.waiters);
  w.pending.erase(w.pending.begin() + static_cast<std::ptrdiff_t>(i));
  return true;
}

// A warp collective: adds this lane's words to the collective of its mask, and returns once
// every lane of the mask has arrived; word_of(l) then reads lane l's word.
inline void warp_collective(uint32_t mask, const char* what, const char* file, int line, uint64_t word,
                            uint64_t word2 = 0) {
  Cta& c = *tls.cta;
  const int lane = lane_of(tls.tid);
  Warp& w = warp_of(c, tls.tid);
  if (!(mask >> lane & 1u)) fail("%s (%s:%d): the calling lane %d is not in mask 0x%08x", what, file, line, lane, mask);
  // The collective of this mask, op and line, or a new one: lanes may wait in several at once
  // (a full-mask __syncwarp while a half warp shuffles); lanes that never meet are a deadlock.
  size_t i = 0;
  while (i < w.pending.size() && !(w.pending[i].mask == mask && std::strcmp(w.pending[i].what, what) == 0 &&
                                   same_site(w.pending[i].file, w.pending[i].line, file, line)))
    ++i;
  if (i == w.pending.size()) {
    w.pending.emplace_back();
    Group& g = w.pending.back();
    g.mask = mask;
    g.what = what;
    g.file = file;
    g.line = line;
  }
  Group& g = w.pending[i];
  g.word[lane] = word;
  g.word2[lane] = word2;
  g.arrived |= 1u << lane;
  if (!try_release_group(c, w, i)) block_current(c, w.pending[i].waiters);
}

inline uint64_t word_of(int lane) { return warp_of(*tls.cta, tls.tid).got[lane_of(tls.tid)][lane]; }
inline uint64_t word2_of(int lane) { return warp_of(*tls.cta, tls.tid).got2[lane_of(tls.tid)][lane]; }

// __syncwarp(mask = all lanes), with its call site.
struct Syncwarp {
  const char* file;
  int line;
  void operator()(uint32_t mask = 0xFFFFFFFFu) const { warp_collective(mask, "__syncwarp", file, line, 0); }
};

template <typename T>
uint64_t to_word(T v) {
  static_assert(sizeof(T) <= 8, "a shuffled value is at most 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <typename T>
T from_word(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

// Shuffles: the source lane as CUDA defines it for each variant, within segments of `width`
// lanes; a source outside the mask (or, for up/down, outside the segment) returns the caller's
// own value.
enum class Shfl { Idx, Up, Down, Xor };
template <typename T>
T shfl(Shfl kind, const char* what, const char* file, int line, uint32_t mask, T v, int arg, int width = 32) {
  if (width <= 0 || width > 32 || (width & (width - 1)))
    fail("%s (%s:%d): width %d is not a power of two in [1, 32]", what, file, line, width);
  const int lane = lane_of(tls.tid);
  const int base = lane & ~(width - 1), in_seg = lane - base;
  int src = lane;
  switch (kind) {
    case Shfl::Idx: src = base + (arg & (width - 1)); break;
    case Shfl::Up: src = in_seg - arg >= 0 ? lane - arg : lane; break;
    case Shfl::Down: src = in_seg + arg < width ? lane + arg : lane; break;
    case Shfl::Xor: src = base + ((in_seg ^ arg) & (width - 1)); break;
  }
  warp_collective(mask, what, file, line, to_word(v));
  if (!(mask >> src & 1u)) return v;
  return from_word<T>(word_of(src));
}

inline uint32_t ballot(const char* what, const char* file, int line, uint32_t mask, bool pred) {
  warp_collective(mask, what, file, line, pred ? 1u : 0u);
  uint32_t bits = 0;
  for (int l = 0; l < 32; ++l)
    if ((mask >> l & 1u) && word_of(l)) bits |= 1u << l;
  return bits;
}

// ---- launching ------------------------------------------------------------------------------

// FTK_EMU_TRACE names a file that gets each kernel's name (its template arguments dropped) the
// first time it is launched: the tests check that every kernel of csrc/cuda ran.
inline void record_launch(const char* kernel) {
  static const char* path = std::getenv("FTK_EMU_TRACE");
  if (path == nullptr) return;
  static std::vector<std::string> seen;
  std::string name(kernel);
  name = name.substr(0, name.find('<'));
  if (std::find(seen.begin(), seen.end(), name) != seen.end()) return;
  seen.push_back(name);
  if (FILE* f = std::fopen(path, "a")) {
    std::fprintf(f, "%s\n", name.c_str());
    std::fclose(f);
  }
}

// Fibre stacks, kept across launches; the lowest page of each is a guard, so an overflow faults
// instead of writing into the next stack.
inline char* fiber_stack(size_t i) {
  static std::vector<char*> stacks;
  while (stacks.size() <= i) {
    void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) fail("mmap of a %zu-byte fibre stack failed", kStackBytes);
    mprotect(p, 4096, PROT_NONE);
    stacks.push_back(static_cast<char*>(p));
  }
  return stacks[i];
}

inline void thread_returned(Cta& c) {
  --c.live;
  Warp& w = warp_of(c, c.current);
  w.live &= ~(1u << lane_of(c.current));
  try_release_cta(c);
  for (size_t i = w.pending.size(); i-- > 0;) try_release_group(c, w, i);
}

[[noreturn]] inline void fiber_main() {
  Cta& c = *tls.cta;
#ifdef FTK_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &c.scheduler_stack, &c.scheduler_stack_bytes);
#endif
  (*c.body)();
  thread_returned(c);
  switch_to_scheduler(c, true);  // never resumed: the next block makes a fresh context
  std::abort();
}

inline void deadlock(Cta& c) {
  std::string where;
  char buf[256];
  if (!c.waiters.empty()) {
    std::snprintf(buf, sizeof buf, "; %zu threads at __syncthreads %s:%d", c.waiters.size(), c.file, c.line);
    where += buf;
  }
  for (size_t i = 0; i < c.warps.size(); ++i)
    for (const Group& g : c.warps[i].pending) {
      std::snprintf(buf, sizeof buf, "; warp %zu: lanes 0x%08x in %s %s:%d (mask 0x%08x)", i, g.arrived, g.what, g.file,
                    g.line, g.mask);
      where += buf;
    }
  tls.tid = -1;
  fail("deadlock: %d threads have not returned and none can run%s", c.live, where.c_str());
}

inline void run_block(Cta& c) {
  c.live = c.nthreads;
  c.arrived = 0;
  c.file = nullptr;
  for (Warp& w : c.warps) {
    w.live = w.exists;
    w.pending.clear();
  }
  for (int t = 0; t < c.nthreads; ++t) {
    Fiber& f = c.fibers[static_cast<size_t>(t)];
    context_make(&f.ctx, f.stack, kStackBytes, fiber_main);
    c.ready.push_back(t);
  }
  while (!c.ready.empty()) {
    const int t = c.ready.front();
    c.ready.pop_front();
    switch_to_fiber(c, t);
  }
  if (c.live > 0) deadlock(c);
}

template <typename Body>
void run_grid(const char* kernel, dim3 grid, dim3 block, size_t smem, Body body) {
  const uint64_t nthreads = uint64_t{block.x} * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > 0x7FFFFFFFu || grid.y > 65535 || grid.z > 65535) {
    set_last_error(cudaErrorInvalidConfiguration);
    return;
  }
  if (smem != 0) {  // no kernel here declares extern __shared__ memory
    set_last_error(cudaErrorInvalidValue);
    return;
  }
  std::lock_guard<std::mutex> one_launch_at_a_time(launch_mutex());
  record_launch(kernel);
  Cta c;
  c.nthreads = static_cast<int>(nthreads);
  c.warps.resize((nthreads + 31) / 32);
  c.fibers.resize(nthreads);
  for (uint64_t t = 0; t < nthreads; ++t) {
    c.warps[t / 32].exists |= 1u << (t % 32);
    c.fibers[t].stack = fiber_stack(t);
  }
  const std::function<void()> fn = body;
  c.body = &fn;
  const ThreadState saved = tls;
  tls = ThreadState{&c, -1, kernel};
  blockDim = block;
  gridDim = grid;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = uint3{x, y, z};
        run_block(c);
      }
  tls = saved;
}

// The kernel's name from the compiler's own spelling of K ("... [with auto K = ns::name<T, 4>]").
inline std::string kernel_name_from(const std::string& pretty) {
  const size_t at = pretty.find("K = ");
  std::string n = at == std::string::npos ? pretty : pretty.substr(at + 4);
  n = n.substr(0, n.find_first_of(";]"));
  const size_t colon = n.rfind("::", n.find('<'));
  return colon == std::string::npos ? n : n.substr(colon + 2);
}
template <auto K>
const char* kernel_name() {
  static const std::string name = kernel_name_from(__PRETTY_FUNCTION__);
  return name.c_str();
}

// `kernel<<<grid, block, smem, stream>>>(args...)` is rewritten by build.py to
// `::ftk_emu::launch<kernel>(grid, block, smem, stream)(args...)`.
template <auto K>
auto launch(dim3 grid, dim3 block, size_t smem = 0, cudaStream_t stream = nullptr) {
  (void)stream;  // one emulated stream: every launch completes before it returns
  return [=](auto... args) { run_grid(kernel_name<K>(), grid, block, smem, [&] { K(args...); }); };
}

}  // namespace ftk_emu

// ---- device functions -----------------------------------------------------------------------

// The collectives are macros so that each call carries its source line into the checks.
#define __shfl_sync(mask, v, ...) \
  ::ftk_emu::shfl(::ftk_emu::Shfl::Idx, "__shfl_sync", __FILE__, __LINE__, mask, v, __VA_ARGS__)
#define __shfl_up_sync(mask, v, ...) \
  ::ftk_emu::shfl(::ftk_emu::Shfl::Up, "__shfl_up_sync", __FILE__, __LINE__, mask, v, __VA_ARGS__)
#define __shfl_down_sync(mask, v, ...) \
  ::ftk_emu::shfl(::ftk_emu::Shfl::Down, "__shfl_down_sync", __FILE__, __LINE__, mask, v, __VA_ARGS__)
#define __shfl_xor_sync(mask, v, ...) \
  ::ftk_emu::shfl(::ftk_emu::Shfl::Xor, "__shfl_xor_sync", __FILE__, __LINE__, mask, v, __VA_ARGS__)
#define __ballot_sync(mask, pred) ::ftk_emu::ballot("__ballot_sync", __FILE__, __LINE__, mask, (pred) != 0)
#define __any_sync(mask, pred) (::ftk_emu::ballot("__any_sync", __FILE__, __LINE__, mask, (pred) != 0) != 0u)
#define __all_sync(mask, pred) \
  (::ftk_emu::ballot("__all_sync", __FILE__, __LINE__, mask, (pred) != 0) == static_cast<uint32_t>(mask))

template <typename T>
T __ldg(const T* p) {
  return *p;
}

// The _rn intrinsics exist on the GPU to forbid contraction into an FMA; build.py compiles with
// -ffp-contract=off, so the plain operators round each operation the same way.
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __uint_as_float(uint32_t u) { return ftk_emu::from_word<float>(u); }
inline uint32_t __float_as_uint(float f) { return static_cast<uint32_t>(ftk_emu::to_word(f)); }
inline float __int_as_float(int32_t u) { return ftk_emu::from_word<float>(static_cast<uint32_t>(u)); }
inline int32_t __float_as_int(float f) { return static_cast<int32_t>(ftk_emu::to_word(f)); }

// CUDA's overloaded device min/max.
#define FTK_EMU_MINMAX(T)                              \
  inline T max(T a, T b) { return a > b ? a : b; }     \
  inline T min(T a, T b) { return a < b ? a : b; }
FTK_EMU_MINMAX(int)
FTK_EMU_MINMAX(unsigned)
FTK_EMU_MINMAX(long)
FTK_EMU_MINMAX(unsigned long)
FTK_EMU_MINMAX(long long)
FTK_EMU_MINMAX(unsigned long long)
#undef FTK_EMU_MINMAX
inline float max(float a, float b) { return std::fmax(a, b); }
inline float min(float a, float b) { return std::fmin(a, b); }
