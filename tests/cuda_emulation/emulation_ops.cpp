// Controls of the emulated kernel launches (tests/cuda_emulation), beside the kernels' ops
// in the m2f_kernels_emu namespace, and small kernels that show the emulation catching
// what it is there to catch (tests/test_cuda_emulated.py runs them).
namespace {

constexpr int kSelfTestThreads = 64;

// Each thread writes its slot, then reads its neighbour's: with `barrier` false the read
// races with the neighbour's write (the result depends on the thread order).
__global__ void neighbour_kernel(int* out, bool barrier) {
  extern __shared__ int slots[];
  const int t = threadIdx.x;
  slots[t] = t + 1;
  if (barrier) __syncthreads();
  out[t] = slots[(t + 1) % blockDim.x];
}

// Odd threads leave before the barrier the even ones wait at.
__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x % 2) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

// Half of a warp shuffles with a full-warp mask.
__global__ void half_warp_shuffle_kernel(int* out) {
  int x = threadIdx.x;
  if (threadIdx.x % 32 < 16) x = __shfl_xor_sync(0xffffffffu, x, 1);
  out[threadIdx.x] = x;
}

// Block 0 writes a static shared array, block 1 only reads it: it must read the poison.
__global__ void static_shared_kernel(int* out) {
  __shared__ int slots[kSelfTestThreads];
  const int t = threadIdx.x;
  if (blockIdx.x == 0) slots[t] = t + 1;
  __syncthreads();
  out[blockIdx.x * kSelfTestThreads + t] = slots[t];
}

// out[t] = (t ^ 5) + 100 * (warp of t holds thread 37).
__global__ void shuffle_kernel(int* out) {
  const int t = threadIdx.x;
  out[t] = __shfl_xor_sync(0xffffffffu, t, 5) + 100 * __any_sync(0xffffffffu, t == 37);
}

at::Tensor self_test(const std::string& kernel) {
  at::Tensor out = at::full({2 * kSelfTestThreads}, -7, at::kInt);  // one-block kernels write the first half
  int* p = out.data_ptr<int>();
  const size_t shared = kSelfTestThreads * sizeof(int);
  if (kernel == "racy_neighbour") {
    neighbour_kernel<<<1, kSelfTestThreads, shared>>>(p, false);
  } else if (kernel == "neighbour") {
    neighbour_kernel<<<1, kSelfTestThreads, shared>>>(p, true);
  } else if (kernel == "divergent_barrier") {
    divergent_barrier_kernel<<<1, kSelfTestThreads>>>(p);
  } else if (kernel == "half_warp_shuffle") {
    half_warp_shuffle_kernel<<<1, kSelfTestThreads>>>(p);
  } else if (kernel == "static_shared") {
    static_shared_kernel<<<2, kSelfTestThreads>>>(p);
  } else if (kernel == "shuffle") {
    shuffle_kernel<<<1, kSelfTestThreads>>>(p);
  } else {
    TORCH_CHECK(false, "emulation_self_test: unknown kernel ", kernel);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(m2f_kernels_emu, m) {
  // order: 0 ascending, 1 descending, 2 shuffled with `seed` (threads of a block, blocks of a grid).
  m.def("emulation_set_order(int order, int seed) -> ()", [](int64_t order, int64_t seed) {
    TORCH_CHECK(order >= 0 && order <= 2, "emulation_set_order: order must be 0, 1 or 2, got ", order);
    m2f_emu::rt().order = static_cast<m2f_emu::Order>(order);
    m2f_emu::rt().rng.seed(static_cast<uint64_t>(seed));
  });
  m.def("emulation_launches() -> int", []() -> int64_t { return m2f_emu::rt().launches; });
  m.def("emulation_self_test(str kernel) -> Tensor", &self_test);
}
