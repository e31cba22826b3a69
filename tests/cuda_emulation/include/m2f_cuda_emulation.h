// Runs the project's CUDA kernels on the CPU: force-included (g++ -include) before every
// translation unit of csrc/ when tests/cuda_emulation builds the emulated extension.
//
// A launch runs its blocks one after another; the threads of a block are fibers
// (ucontext) on the calling thread. A fiber runs until it reaches __syncthreads(), a warp
// collective (__shfl_*_sync, __any_sync, __syncwarp) or the end of the kernel; the
// scheduler then runs the next fiber. When every live thread of the block waits at
// __syncthreads() the barrier opens; when all 32 lanes of a warp wait at the same warp
// collective its results are computed from the values the lanes passed. So each stretch
// between two synchronisation points runs as a whole, one thread after another, in the
// order `set_schedule` chose (ascending, descending or a seeded shuffle of the thread and
// block indices): a kernel whose result depends on that order reads what another thread
// writes in the same stretch (a race on a GPU), and the tests run every kernel under
// several orders.
//
// Errors that hang or corrupt a GPU run raise here: __syncthreads() reached by some threads
// of a block while others left the kernel (divergent barrier), a warp collective some lanes
// of the warp never reach, lanes of one warp waiting at different collectives, a mask other
// than the full warp, more dynamic shared memory than the launch may use, an over-large
// block or grid. Shared memory, dynamic and static, is filled with 0xff bytes (NaN floats,
// -1 ints) before each block.
//
// Not emulated: the device's arithmetic (nvcc --use_fast_math's approximate exp/log and
// flushed denormals; FMA contraction) and memory ordering between blocks (a kernel here sees
// every earlier block's writes). Out-of-bounds accesses are plain CPU reads and writes:
// the address-sanitizer build (scripts/cuda_emulation_memcheck.sh) reports them.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <ucontext.h>
#include <sys/mman.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

// ---- CUDA's vocabulary, on the host ----------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// __shared__ declarations are rewritten by the build (tests/cuda_emulation/__init__.py):
// `extern __shared__ T name[];` into a pointer to the launch's dynamic shared memory,
// `__shared__ T name[n];` into a reference to the array static_shared() keeps for it.
// The host code checks that its tensors are CUDA tensors; here they are CPU tensors.
#define is_cuda is_cpu

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = struct m2f_emu_stream*;

using std::fmax;
using std::fmin;
using std::isfinite;
using std::isinf;
using std::isnan;

namespace m2f_emu {

constexpr int kWarp = 32;
constexpr unsigned kFullWarp = 0xffffffffu;
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kDefaultDynamicShared = 48 * 1024;
constexpr int kMaxBlockThreads = 1024;

enum class Wait { kNone, kBarrier, kShflXor, kShflIdx, kAny, kSyncWarp, kDone };

inline const char* wait_name(Wait w) {
  switch (w) {
    case Wait::kNone: return "running";
    case Wait::kBarrier: return "__syncthreads";
    case Wait::kShflXor: return "__shfl_xor_sync";
    case Wait::kShflIdx: return "__shfl_sync";
    case Wait::kAny: return "__any_sync";
    case Wait::kSyncWarp: return "__syncwarp";
    case Wait::kDone: return "exited";
  }
  return "?";
}

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;  // kStackBytes above a guard page
  dim3 idx;
  Wait wait = Wait::kNone;
  unsigned mask = 0;
  uint64_t value = 0;  // the bits a lane hands to a warp collective
  int arg = 0;         // lane mask (xor) or source lane (idx)
  uint64_t result = 0;
};

// Thread order inside a block's stretch and block order inside a launch.
enum class Order { kAscending = 0, kDescending = 1, kShuffled = 2 };

struct Runtime {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  dim3 grid, block, block_idx;
  std::vector<unsigned char> dynamic_shared;  // the launch's dynamic shared memory
  // The static __shared__ arrays, per declaration (its tag's address); poisoned per block.
  std::unordered_map<const void*, std::vector<unsigned char>> static_shared;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  Order order = Order::kAscending;
  std::mt19937_64 rng{0};
  int64_t launches = 0;
  std::unordered_map<const void*, int> max_dynamic_shared;  // cudaFuncSetAttribute
};

inline Runtime& rt() {
  static Runtime r;
  return r;
}

inline Fiber& self() {
  TORCH_CHECK(rt().current != nullptr, "cuda emulation: a device function ran outside a kernel launch");
  return *rt().current;
}

// Hands control back to the scheduler until the wait is resolved.
inline void suspend(Wait w) {
  Fiber& f = self();
  f.wait = w;
  swapcontext(&f.ctx, &rt().scheduler);
}

inline void fiber_entry() {
  Runtime& r = rt();
  r.body(r.body_arg);
  r.current->wait = Wait::kDone;
  // uc_link returns to the scheduler
}

inline void allocate_stacks(size_t n) {
  auto& fibers = rt().fibers;
  const size_t page = 4096;
  while (fibers.size() < n) {
    void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(p != MAP_FAILED, "cuda emulation: cannot map a fiber stack");
    mprotect(p, page, PROT_NONE);  // a stack overflow faults instead of corrupting memory
    Fiber f;
    f.stack = static_cast<char*>(p) + page;
    fibers.push_back(f);
  }
}

inline std::vector<size_t> ordered(size_t n) {
  std::vector<size_t> ix(n);
  std::iota(ix.begin(), ix.end(), 0);
  Runtime& r = rt();
  if (r.order == Order::kDescending) std::reverse(ix.begin(), ix.end());
  if (r.order == Order::kShuffled) std::shuffle(ix.begin(), ix.end(), r.rng);
  return ix;
}

inline std::string describe(const Fiber& f) {
  return "thread (" + std::to_string(f.idx.x) + ", " + std::to_string(f.idx.y) + ", " + std::to_string(f.idx.z) +
         ") " + wait_name(f.wait);
}

inline std::string where() {
  const dim3& b = rt().block_idx;
  return "block (" + std::to_string(b.x) + ", " + std::to_string(b.y) + ", " + std::to_string(b.z) + ")";
}

// Resolves the warp collectives whose 32 lanes all wait at them; true if any was.
inline bool resolve_warps(size_t n) {
  auto& fibers = rt().fibers;
  bool progressed = false;
  for (size_t w0 = 0; w0 < n; w0 += kWarp) {
    const size_t lanes = std::min<size_t>(kWarp, n - w0);
    Fiber& first = fibers[w0];
    const Wait kind = first.wait;
    if (kind != Wait::kShflXor && kind != Wait::kShflIdx && kind != Wait::kAny && kind != Wait::kSyncWarp) continue;
    bool all = true;
    for (size_t l = 0; l < lanes; ++l) all = all && fibers[w0 + l].wait == kind;
    if (!all) continue;
    TORCH_CHECK(lanes == kWarp, "cuda emulation: ", wait_name(kind), " with a full mask in a warp of ", lanes,
                " threads (", where(), ")");
    for (size_t l = 0; l < lanes; ++l) {
      Fiber& f = fibers[w0 + l];
      TORCH_CHECK(f.mask == kFullWarp, "cuda emulation: ", wait_name(kind), " with mask ", f.mask,
                  ": only full-warp masks are emulated (", where(), ")");
      switch (kind) {
        case Wait::kShflXor: f.result = fibers[w0 + ((l ^ static_cast<size_t>(f.arg)) & (kWarp - 1))].value; break;
        case Wait::kShflIdx: f.result = fibers[w0 + (static_cast<size_t>(f.arg) & (kWarp - 1))].value; break;
        case Wait::kAny: {
          uint64_t any = 0;
          for (size_t m = 0; m < lanes; ++m) any |= fibers[w0 + m].value != 0;
          f.result = any;
          break;
        }
        default: break;
      }
    }
    for (size_t l = 0; l < lanes; ++l) fibers[w0 + l].wait = Wait::kNone;
    progressed = true;
  }
  return progressed;
}

// Opens __syncthreads() when every thread of the block waits there; raises on a barrier
// that some threads can no longer reach.
inline void resolve_block(size_t n) {
  auto& fibers = rt().fibers;
  size_t at_barrier = 0, done = 0;
  for (size_t t = 0; t < n; ++t) {
    at_barrier += fibers[t].wait == Wait::kBarrier;
    done += fibers[t].wait == Wait::kDone;
  }
  if (at_barrier == n) {
    for (size_t t = 0; t < n; ++t) fibers[t].wait = Wait::kNone;
    return;
  }
  std::string states;
  for (size_t t = 0; t < n && states.size() < 600; ++t) {
    if (fibers[t].wait != Wait::kDone) states += "; " + describe(fibers[t]);
  }
  TORCH_CHECK(false, "cuda emulation: ", where(), " cannot go on (divergent barrier or incomplete warp collective): ",
              at_barrier, " threads wait at __syncthreads, ", done, " have exited, ", n - at_barrier - done,
              " wait at warp collectives", states);
}

inline void run_block(size_t n) {
  Runtime& r = rt();
  std::fill(r.dynamic_shared.begin(), r.dynamic_shared.end(), 0xff);
  for (auto& arena : r.static_shared) std::fill(arena.second.begin(), arena.second.end(), 0xff);
  for (size_t t = 0; t < n; ++t) {
    Fiber& f = r.fibers[t];
    f.idx = dim3(static_cast<unsigned>(t % r.block.x), static_cast<unsigned>(t / r.block.x % r.block.y),
                 static_cast<unsigned>(t / (r.block.x * r.block.y)));
    f.wait = Wait::kNone;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &r.scheduler;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  while (true) {
    bool ran = false;
    for (size_t t : ordered(n)) {
      Fiber& f = r.fibers[t];
      if (f.wait != Wait::kNone) continue;
      r.current = &f;
      swapcontext(&r.scheduler, &f.ctx);
      r.current = nullptr;
      ran = true;
    }
    if (ran) continue;
    bool all_done = true;
    for (size_t t = 0; t < n; ++t) all_done = all_done && r.fibers[t].wait == Wait::kDone;
    if (all_done) return;
    if (resolve_warps(n)) continue;
    resolve_block(n);
  }
}

struct LaunchConfig {
  dim3 grid, block;
  size_t shared;
  LaunchConfig(dim3 g, dim3 b, size_t s = 0, cudaStream_t = nullptr) : grid(g), block(b), shared(s) {}
};

// A kernel with its arguments, converted to the parameter types as a launch does.
template <typename... Params>
struct BoundKernel {
  void (*kernel)(Params...);
  std::tuple<Params...> params;
};

template <typename... Params>
void run_bound(void* arg) {
  auto* b = static_cast<BoundKernel<Params...>*>(arg);
  std::apply(b->kernel, b->params);  // each thread gets its own copies of the arguments
}

// kernel<<<cfg>>>(args...): runs every block of the grid before returning.
template <typename... Params, typename... Args>
void launch(const LaunchConfig& cfg, void (*kernel)(Params...), Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "kernel launched with the wrong number of arguments");
  static thread_local bool in_launch = false;
  TORCH_CHECK(!in_launch, "cuda emulation: a kernel launched from inside a kernel");
  // One launch at a time in the process: the kernels' static __shared__ arrays are global.
  static std::mutex one_launch;
  const std::lock_guard<std::mutex> lock(one_launch);
  Runtime& r = rt();
  const size_t threads = static_cast<size_t>(cfg.block.x) * cfg.block.y * cfg.block.z;
  TORCH_CHECK(threads >= 1 && threads <= kMaxBlockThreads && cfg.block.z <= 64,
              "cuda emulation: invalid block (", cfg.block.x, ", ", cfg.block.y, ", ", cfg.block.z, ")");
  TORCH_CHECK(cfg.grid.x >= 1 && cfg.grid.x <= INT_MAX && cfg.grid.y >= 1 && cfg.grid.y <= 65535 && cfg.grid.z >= 1 &&
                  cfg.grid.z <= 65535,
              "cuda emulation: invalid grid (", cfg.grid.x, ", ", cfg.grid.y, ", ", cfg.grid.z, ")");
  const auto attr = r.max_dynamic_shared.find(reinterpret_cast<const void*>(kernel));
  const size_t allowed =
      attr == r.max_dynamic_shared.end() ? kDefaultDynamicShared : static_cast<size_t>(attr->second);
  TORCH_CHECK(cfg.shared <= allowed, "cuda emulation: ", cfg.shared,
              " bytes of dynamic shared memory, the kernel may use ", allowed,
              " (cudaFuncSetAttribute raises the limit)");
  BoundKernel<Params...> bound{kernel, std::tuple<Params...>(std::forward<Args>(args)...)};
  r.body = &run_bound<Params...>;
  r.body_arg = &bound;
  r.grid = cfg.grid;
  r.block = cfg.block;
  // exactly the launch's bytes (an address sanitizer build sees a read past them); operator
  // new's alignment is 16 bytes, as __align__(16) declarations of it expect
  r.dynamic_shared.assign(cfg.shared, 0xff);
  r.dynamic_shared.shrink_to_fit();
  TORCH_CHECK(reinterpret_cast<uintptr_t>(r.dynamic_shared.data()) % 16 == 0,
              "cuda emulation: unaligned shared memory");
  allocate_stacks(threads);
  in_launch = true;
  ++r.launches;
  const size_t blocks = static_cast<size_t>(cfg.grid.x) * cfg.grid.y * cfg.grid.z;
  try {
    for (size_t b : ordered(blocks)) {
      r.block_idx = dim3(static_cast<unsigned>(b % cfg.grid.x), static_cast<unsigned>(b / cfg.grid.x % cfg.grid.y),
                         static_cast<unsigned>(b / (static_cast<size_t>(cfg.grid.x) * cfg.grid.y)));
      run_block(threads);
    }
  } catch (...) {
    in_launch = false;
    throw;
  }
  in_launch = false;
}

inline unsigned char* dynamic_shared() { return rt().dynamic_shared.data(); }

// The block's copy of one static __shared__ array (every thread of a block gets the same).
inline void* static_shared(const void* tag, size_t bytes) {
  auto& arena = rt().static_shared[tag];
  if (arena.size() != bytes) arena.assign(bytes, 0xff);  // operator new: 16-byte aligned
  return arena.data();
}

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>, "shuffled type too large");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}

template <typename T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

inline uint64_t warp_collective(Wait kind, unsigned mask, uint64_t value, int arg) {
  Fiber& f = self();
  f.mask = mask;
  f.value = value;
  f.arg = arg;
  suspend(kind);
  return self().result;
}

}  // namespace m2f_emu

#define threadIdx (::m2f_emu::self().idx)
#define blockIdx (::m2f_emu::rt().block_idx)
#define blockDim (::m2f_emu::rt().block)
#define gridDim (::m2f_emu::rt().grid)

inline void __syncthreads() { ::m2f_emu::suspend(::m2f_emu::Wait::kBarrier); }

inline void __syncwarp(unsigned mask = ::m2f_emu::kFullWarp) {
  ::m2f_emu::warp_collective(::m2f_emu::Wait::kSyncWarp, mask, 0, 0);
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = ::m2f_emu::kWarp) {
  TORCH_CHECK(width == ::m2f_emu::kWarp, "cuda emulation: __shfl_xor_sync width ", width, " is not emulated");
  return ::m2f_emu::from_bits<T>(
      ::m2f_emu::warp_collective(::m2f_emu::Wait::kShflXor, mask, ::m2f_emu::to_bits(v), lane_mask));
}

template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = ::m2f_emu::kWarp) {
  TORCH_CHECK(width == ::m2f_emu::kWarp, "cuda emulation: __shfl_sync width ", width, " is not emulated");
  return ::m2f_emu::from_bits<T>(
      ::m2f_emu::warp_collective(::m2f_emu::Wait::kShflIdx, mask, ::m2f_emu::to_bits(v), src_lane));
}

inline int __any_sync(unsigned mask, int predicate) {
  return static_cast<int>(::m2f_emu::warp_collective(::m2f_emu::Wait::kAny, mask, predicate != 0, 0));
}

// Read-modify-write is atomic here: fibers switch only at synchronisation points.
template <typename T>
T atomicAdd(T* address, T v) {
  const T old = *address;
  *address = old + v;
  return old;
}

inline unsigned __float_as_uint(float x) { return ::m2f_emu::from_bits<unsigned>(::m2f_emu::to_bits(x)); }
inline float __uint_as_float(unsigned x) { return ::m2f_emu::from_bits<float>(::m2f_emu::to_bits(x)); }

// cvt.rzi.s64.f32: round toward zero, saturating; NaN converts to 0 (PTX ISA, cvt).
inline long long __float2ll_rz(float x) {
  if (std::isnan(x)) return 0;
  if (x >= 9223372036854775807.0f) return LLONG_MAX;
  if (x <= -9223372036854775808.0f) return LLONG_MIN;
  return static_cast<long long>(x);
}

// ---- the runtime API the host code calls -------------------------------------------------
enum cudaError_t { cudaSuccess = 0 };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

// An H100's value (227 KB opt-in shared memory per block).
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  *value = attr == cudaDevAttrMaxSharedMemoryPerBlockOptin ? 232448 : 0;
  return cudaSuccess;
}

template <typename... Params>
cudaError_t cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute attr, int value) {
  TORCH_CHECK(attr == cudaFuncAttributeMaxDynamicSharedMemorySize, "cuda emulation: function attribute ", attr);
  TORCH_CHECK(value <= 232448, "cuda emulation: ", value, " bytes of dynamic shared memory exceed the device's opt-in");
  ::m2f_emu::rt().max_dynamic_shared[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}
