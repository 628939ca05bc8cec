// CUDA kernels for ember_C::unary_act / unary_act_backward: y = act(x) and dx = grad * act'(x) for
// act in {relu, silu, gelu (erf), gelu_tanh}, on float16 / bfloat16 / float32 / float64.
//
// Bytes moved per element (E = element size, 2 for bf16): forward reads x and writes y, 2E;
// backward reads grad and x and writes dx, 3E. Fused because the backward in eager PyTorch composes
// act'(x) from several elementwise ops, each a full pass over memory (silu' alone is ~5 passes); here
// every tensor is touched once and the math, far below the memory time, is free.
//
// Reference: csrc/cpu/vec_activation.h (same formulas and operation order; the activation math is
// shared in common.cuh). The kernel is common.cuh's map_kernel: 16-byte packs when aligned, a
// one-wave grid-stride loop, fp32 math for half / bfloat16.
#include "cuda/common.cuh"
#include "cuda/launchers.h"

namespace ember::cuda {
namespace {

// in = {x}, out = {act(x)}.
template <Act A>
struct UnaryForward {
  template <typename C>
  __device__ __forceinline__ void operator()(const C (&in)[1], C (&out)[1]) const {
    out[0] = act_forward<A>(in[0]);
  }
};

// in = {grad, x}, out = {grad * act'(x)}.
template <Act A>
struct UnaryBackward {
  template <typename C>
  __device__ __forceinline__ void operator()(const C (&in)[2], C (&out)[1]) const {
    out[0] = act_backward<A>(in[0], in[1]);
  }
};

}  // namespace

cudaError_t unary_act(const void* x, void* y, int64_t n, DType dtype, Act act, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  return dispatch(dtype, act, [&](auto type_tag, auto act_tag) {
    using T = typename decltype(type_tag)::type;
    return launch_map_flat<T, 1, 1>({x}, {y}, n, UnaryForward<decltype(act_tag)::value>{}, stream);
  });
}

cudaError_t unary_act_backward(const void* grad, const void* x, void* dx, int64_t n, DType dtype, Act act,
                               cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  return dispatch(dtype, act, [&](auto type_tag, auto act_tag) {
    using T = typename decltype(type_tag)::type;
    return launch_map_flat<T, 2, 1>({grad, x}, {dx}, n, UnaryBackward<decltype(act_tag)::value>{}, stream);
  });
}

}  // namespace ember::cuda
