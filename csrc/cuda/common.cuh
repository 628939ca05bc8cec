// Device helpers shared by ember's CUDA kernels: element conversion, activation math, 16-byte packed
// access, a (dtype, act) dispatcher, and one elementwise "map" kernel that every memory-bound op in
// csrc/cuda/ instantiates with its own per-element functor.
//
// Numerics follow the CPU kernels (csrc/cpu/vec_activation.h) operation for operation: half and
// bfloat16 are widened to fp32, double stays fp64, and the math uses the accurate expf/erff/tanhf
// (exp/erf/tanh for fp64). Nothing here assumes --use_fast_math.
#pragma once
#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "activation.h"

// Returns the cudaError_t of `expr` from the enclosing function unless it is cudaSuccess.
#define EMBER_CUDA_TRY(expr)                         \
  do {                                               \
    const cudaError_t ember_err_ = (expr);           \
    if (ember_err_ != cudaSuccess) return ember_err_; \
  } while (0)

namespace ember::cuda {

// ---------------------------------------------------------------------------------------------------
// Element types: storage T, math in opmath_t<T> (fp64 for double, fp32 otherwise).

template <typename T>
using opmath_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

__device__ __forceinline__ float to_opmath(float x) { return x; }
__device__ __forceinline__ double to_opmath(double x) { return x; }
__device__ __forceinline__ float to_opmath(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_opmath(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_opmath(opmath_t<T> x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(x);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(x);
  } else {
    return x;
  }
}

// Element i of p widened to its math type, and a math-type value rounded back into p[i].
template <typename T>
__device__ __forceinline__ opmath_t<T> load(const T* p, int64_t i) {
  return to_opmath(p[i]);
}

template <typename T>
__device__ __forceinline__ void store(T* p, int64_t i, opmath_t<T> v) {
  p[i] = from_opmath<T>(v);
}

// Accurate math by precision (the float overloads are the f-suffixed functions).
__device__ __forceinline__ float op_exp(float x) { return expf(x); }
__device__ __forceinline__ double op_exp(double x) { return exp(x); }
__device__ __forceinline__ float op_erf(float x) { return erff(x); }
__device__ __forceinline__ double op_erf(double x) { return erf(x); }
__device__ __forceinline__ float op_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double op_tanh(double x) { return tanh(x); }

// ---------------------------------------------------------------------------------------------------
// Activations, in the same operation order as the CPU kernels.

template <Act A, typename C>
__device__ __forceinline__ C act_forward(C x) {
  if constexpr (A == Act::kRelu) {
    return x < C(0) ? C(0) : x;  // keeps NaN (and -0), as torch.relu does
  } else if constexpr (A == Act::kSilu) {
    return x / (C(1) + op_exp(-x));
  } else if constexpr (A == Act::kGelu) {
    return C(0.5) * x * (C(1) + op_erf(x * C(kSqrt1_2)));
  } else if constexpr (A == Act::kRelu2) {
    const C r = x < C(0) ? C(0) : x;  // NaN stays NaN, as torch.relu(x) ** 2
    return r * r;
  } else {
    const C inner = C(kSqrt2OverPi) * (x + C(kGeluTanhCoeff) * x * x * x);
    return C(0.5) * x * (C(1) + op_tanh(inner));
  }
}

// grad * act'(x). ReLU selects rather than multiplies, exactly like torch's threshold_backward: grad
// passes where x is not <= 0 (NaN included), and an infinite grad where x <= 0 still gives 0.
template <Act A, typename C>
__device__ __forceinline__ C act_backward(C grad, C x) {
  const C one(1);
  if constexpr (A == Act::kRelu) {
    return x <= C(0) ? C(0) : grad;
  } else if constexpr (A == Act::kSilu) {
    const C s = one / (one + op_exp(-x));
    return grad * s * (one + x * (one - s));
  } else if constexpr (A == Act::kGelu) {
    const C cdf = C(0.5) * (one + op_erf(x * C(kSqrt1_2)));
    const C pdf = C(kInvSqrt2Pi) * op_exp(C(-0.5) * x * x);
    return grad * (cdf + x * pdf);
  } else if constexpr (A == Act::kRelu2) {
    return x <= C(0) ? C(0) : C(2) * x * grad;  // selected like ReLU's: 0 where x <= 0
  } else {
    const C x2 = x * x;
    const C t = op_tanh(C(kSqrt2OverPi) * (x + C(kGeluTanhCoeff) * x2 * x));
    const C dinner = C(kSqrt2OverPi) * (one + C(3.0 * kGeluTanhCoeff) * x2);
    return grad * (C(0.5) * (one + t) + C(0.5) * x * (one - t * t) * dinner);
  }
}

// ---------------------------------------------------------------------------------------------------
// Packed access: N elements in one aligned load/store (N = kPack<T> gives 16 bytes, one
// LDG.128/STG.128, the widest global access a thread can issue).

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T>
constexpr int kPack = static_cast<int>(16 / sizeof(T));

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

inline bool is_aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// ---------------------------------------------------------------------------------------------------
// Runtime (dtype, act) -> compile-time (T, A). Calls f(TypeTag<T>{}, ActTag<A>{}).

template <typename T>
struct TypeTag {
  using type = T;
};
template <Act A>
using ActTag = std::integral_constant<Act, A>;

template <typename F>
cudaError_t dispatch(DType dtype, Act act, F&& f) {
  auto with_act = [&](auto type_tag) -> cudaError_t {
    switch (act) {
#define EMBER_CASE(member, text) \
  case Act::member: return f(type_tag, ActTag<Act::member>{});
      EMBER_FOR_EACH_ACT(EMBER_CASE)
#undef EMBER_CASE
      case Act::kNone: break;
    }
    return cudaErrorInvalidValue;
  };
  switch (dtype) {
    case DType::kFloat32: return with_act(TypeTag<float>{});
    case DType::kFloat16: return with_act(TypeTag<__half>{});
    case DType::kBFloat16: return with_act(TypeTag<__nv_bfloat16>{});
    case DType::kFloat64: return with_act(TypeTag<double>{});
  }
  return cudaErrorInvalidValue;
}

// ---------------------------------------------------------------------------------------------------
// Elementwise map over a (rows, cols) grid: NIN inputs whose rows start every in_row_stride[k]
// elements (last dim contiguous), NOUT contiguous outputs, and `op(const C (&in)[NIN], C (&out)[NOUT])`
// applied to each element in opmath C.
//
// Work is counted in packs of VEC elements. Two layouts:
//  * flat (ROWS = false): every operand is contiguous, pack p is at element p * VEC of each; the
//    n % VEC leftover elements are done one each by the first threads.
//  * rows (ROWS = true): needs cols % VEC == 0; pack p is (row, col) of a row_packs-wide grid. Each
//    thread divides once, at its start; a grid stride is pre-split on the host into
//    (step_rows, step_packs), so moving on costs an add and one compare instead of a 64-bit division.
// Outputs are contiguous in both layouts, so output pack p is always at element p * VEC.

constexpr int kThreads = 256;

template <typename T, int NIN, int NOUT>
struct MapArgs {
  const T* in[NIN];
  int64_t in_row_stride[NIN];  // elements; rows layout only
  T* out[NOUT];
  int64_t rows;        // flat: 1
  int64_t row_packs;   // packs per row (flat: n / VEC)
  int64_t tail;        // flat: n % VEC elements after the last pack
  int64_t step_rows;   // rows layout: (gridDim.x * blockDim.x) / row_packs
  int64_t step_packs;  // rows layout: (gridDim.x * blockDim.x) % row_packs
};

struct Cursor {
  int64_t p;    // pack index, row-major over (rows, row_packs)
  int64_t row;  // rows layout only
  int64_t col;  // pack column, rows layout only
};

template <bool ROWS, typename Args>
__device__ __forceinline__ Cursor next(Cursor c, const Args& a, int64_t nthreads) {
  c.p += nthreads;
  if constexpr (ROWS) {
    c.row += a.step_rows;
    c.col += a.step_packs;
    if (c.col >= a.row_packs) {
      c.col -= a.row_packs;
      ++c.row;
    }
  }
  return c;
}

template <bool ROWS, int VEC, typename Args>
__device__ __forceinline__ int64_t in_offset(const Cursor& c, const Args& a, int k) {
  if constexpr (ROWS) {
    return c.row * a.in_row_stride[k] + c.col * VEC;
  } else {
    return c.p * VEC;
  }
}

// Converts one set of loaded packs, applies op per element and stores the NOUT result packs.
template <typename T, int VEC, int NIN, int NOUT, typename Op>
__device__ __forceinline__ void apply_store(const Pack<T, VEC> (&x)[NIN], T* const (&out)[NOUT], int64_t offset,
                                            const Op& op) {
  using C = opmath_t<T>;
  Pack<T, VEC> y[NOUT];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    C in[NIN];
    C res[NOUT];
#pragma unroll
    for (int k = 0; k < NIN; ++k) in[k] = to_opmath(x[k].v[j]);
    op(in, res);
#pragma unroll
    for (int k = 0; k < NOUT; ++k) y[k].v[j] = from_opmath<T>(res[k]);
  }
#pragma unroll
  for (int k = 0; k < NOUT; ++k) store_pack<T, VEC>(out[k] + offset, y[k]);
}

template <typename T, int VEC, bool ROWS, int NIN, int NOUT, typename Op>
__global__ void __launch_bounds__(kThreads) map_kernel(const MapArgs<T, NIN, NOUT> a, const Op op) {
  // UNROLL packs per input are loaded before any is used: with 16-byte packs a thread keeps
  // UNROLL * NIN * 16 bytes in flight (>= 32 B), which covers DRAM latency on H100/H200 even at the
  // 3-4 resident blocks per SM that the heavier functors' register use allows. fp64 takes one pack at a
  // time: its erf / exp are long enough to hide the latency themselves, and unrolled they spilled
  // (8-48 B of local memory per thread in the gelu backward on sm_90, `python -m ember compile-check`).
  constexpr int UNROLL = sizeof(T) == 8 ? 1 : (VEC == 1 ? 4 : 2);
  const int64_t total = a.rows * a.row_packs;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;

  Cursor cur{tid, 0, 0};
  if constexpr (ROWS) {
    cur.row = tid / a.row_packs;
    cur.col = tid - cur.row * a.row_packs;
  }
  while (cur.p + (UNROLL - 1) * nthreads < total) {
    Cursor c[UNROLL];
    c[0] = cur;
#pragma unroll
    for (int u = 1; u < UNROLL; ++u) c[u] = next<ROWS>(c[u - 1], a, nthreads);
    Pack<T, VEC> x[UNROLL][NIN];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
#pragma unroll
      for (int k = 0; k < NIN; ++k) x[u][k] = load_pack<T, VEC>(a.in[k] + in_offset<ROWS, VEC>(c[u], a, k));
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) apply_store<T, VEC, NIN, NOUT>(x[u], a.out, c[u].p * VEC, op);
    cur = next<ROWS>(c[UNROLL - 1], a, nthreads);
  }
  for (; cur.p < total; cur = next<ROWS>(cur, a, nthreads)) {
    Pack<T, VEC> x[NIN];
#pragma unroll
    for (int k = 0; k < NIN; ++k) x[k] = load_pack<T, VEC>(a.in[k] + in_offset<ROWS, VEC>(cur, a, k));
    apply_store<T, VEC, NIN, NOUT>(x, a.out, cur.p * VEC, op);
  }
  if constexpr (!ROWS && VEC > 1) {
    if (tid < a.tail) {
      const int64_t i = total * VEC + tid;
      Pack<T, 1> x[NIN];
#pragma unroll
      for (int k = 0; k < NIN; ++k) x[k] = load_pack<T, 1>(a.in[k] + i);
      apply_store<T, 1, NIN, NOUT>(x, a.out, i, op);
    }
  }
}

// Blocks of kThreads resident on the current device at once: SMs x blocks per SM for `kernel`.
// Querying occupancy costs microseconds, so the per-SM figure is kept in `per_sm_cache` (one slot per
// device, 0 = not yet queried), which the caller owns, one per kernel instantiation.
constexpr int kMaxDevices = 64;

template <typename Kernel>
cudaError_t resident_blocks(Kernel kernel, std::atomic<int> (&per_sm_cache)[kMaxDevices], int* blocks) {
  int device = 0, sms = 0;
  EMBER_CUDA_TRY(cudaGetDevice(&device));
  EMBER_CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const bool cached = device >= 0 && device < kMaxDevices;
  int per_sm = cached ? per_sm_cache[device].load(std::memory_order_relaxed) : 0;
  if (per_sm == 0) {
    EMBER_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
    per_sm = std::max(per_sm, 1);
    if (cached) per_sm_cache[device].store(per_sm, std::memory_order_relaxed);
  }
  *blocks = sms * per_sm;
  return cudaSuccess;
}

template <typename T, int VEC, bool ROWS, int NIN, int NOUT, typename Op>
cudaError_t launch_map_layout(MapArgs<T, NIN, NOUT> a, int64_t rows, int64_t cols, const Op& op,
                              cudaStream_t stream) {
  if constexpr (ROWS) {
    a.rows = rows;
    a.row_packs = cols / VEC;
    a.tail = 0;
  } else {
    const int64_t n = rows * cols;
    a.rows = 1;
    a.row_packs = n / VEC;
    a.tail = n - a.row_packs * VEC;
  }
  const auto kernel = map_kernel<T, VEC, ROWS, NIN, NOUT, Op>;
  static std::atomic<int> per_sm_cache[kMaxDevices];  // this instantiation's occupancy, per device
  int max_blocks = 0;
  EMBER_CUDA_TRY(resident_blocks(kernel, per_sm_cache, &max_blocks));
  // One wave of resident blocks striding over the work (fewer when the work is small): every block
  // gets the same share, so no partial last wave, and no block-launch cost per 4 KB of data.
  const int64_t work = std::max(a.rows * a.row_packs, a.tail);
  const int grid = static_cast<int>(std::min<int64_t>((work + kThreads - 1) / kThreads, max_blocks));
  if constexpr (ROWS) {
    const int64_t nthreads = static_cast<int64_t>(grid) * kThreads;
    a.step_rows = nthreads / a.row_packs;
    a.step_packs = nthreads % a.row_packs;
  } else {
    a.step_rows = 0;
    a.step_packs = 0;
  }
  map_kernel<T, VEC, ROWS, NIN, NOUT, Op><<<grid, kThreads, 0, stream>>>(a, op);
  return cudaGetLastError();
}

// Runs op over n contiguous elements of every operand (the flat layout only).
template <typename T, int NIN, int NOUT, typename Op>
cudaError_t launch_map_flat(const std::array<const void*, NIN>& in, const std::array<void*, NOUT>& out, int64_t n,
                            const Op& op, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  MapArgs<T, NIN, NOUT> a{};
  bool aligned = true;
  for (int k = 0; k < NIN; ++k) {
    a.in[k] = static_cast<const T*>(in[k]);
    aligned = aligned && is_aligned16(in[k]);
  }
  for (int k = 0; k < NOUT; ++k) {
    a.out[k] = static_cast<T*>(out[k]);
    aligned = aligned && is_aligned16(out[k]);
  }
  return aligned ? launch_map_layout<T, kPack<T>, false>(a, 1, n, op, stream)
                 : launch_map_layout<T, 1, false>(a, 1, n, op, stream);
}

// Runs op over (rows, cols); picks the flat layout when every input's rows are back to back (or
// there is one row), and 16-byte packs when every pointer, and in the rows layout every row start,
// is 16-byte aligned. Anything else takes the scalar (VEC = 1) path, which is correct for any
// alignment but moves 2-8 bytes per access.
template <typename T, int NIN, int NOUT, typename Op>
cudaError_t launch_map(const std::array<const void*, NIN>& in, const std::array<int64_t, NIN>& in_row_stride,
                       const std::array<void*, NOUT>& out, int64_t rows, int64_t cols, const Op& op,
                       cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  constexpr int V = kPack<T>;
  MapArgs<T, NIN, NOUT> a{};
  bool flat = rows == 1, aligned = true, strides_aligned = cols % V == 0;
  if (!flat) {
    flat = true;
    for (int k = 0; k < NIN; ++k) flat = flat && in_row_stride[k] == cols;
  }
  for (int k = 0; k < NIN; ++k) {
    a.in[k] = static_cast<const T*>(in[k]);
    a.in_row_stride[k] = in_row_stride[k];
    aligned = aligned && is_aligned16(in[k]);
    strides_aligned = strides_aligned && in_row_stride[k] % V == 0;
  }
  for (int k = 0; k < NOUT; ++k) {
    a.out[k] = static_cast<T*>(out[k]);
    aligned = aligned && is_aligned16(out[k]);
  }
  if (flat) {
    return aligned ? launch_map_layout<T, V, false>(a, rows, cols, op, stream)
                   : launch_map_layout<T, 1, false>(a, rows, cols, op, stream);
  }
  return aligned && strides_aligned ? launch_map_layout<T, V, true>(a, rows, cols, op, stream)
                                    : launch_map_layout<T, 1, true>(a, rows, cols, op, stream);
}

}  // namespace ember::cuda
