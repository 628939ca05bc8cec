// CUDA kernels for ember_C::gated_act / gated_act_backward, the gated linear units of transformer
// MLPs (SwiGLU with silu, GeGLU with gelu / gelu_tanh, ReGLU with relu):
//   forward   out   = act(gate) * up
//   backward  dgate = act'(gate) * grad * up,  dup = grad * act(gate)   (act(gate) recomputed)
// over (rows, cols). gate / up may be strided views (typically the two halves of one [.., 2N]
// projection output: row stride 2N) with a contiguous last dim; grad, out, dgate, dup are contiguous.
//
// Bytes moved per element (E = element size, 2 for bf16): forward reads gate, up and writes out, 3E
// (unfused act then mul: 5E plus a temporary); backward reads grad, gate, up and writes dgate, dup,
// 5E (unfused: ~11E and two temporaries). The backward recomputes act(gate) instead of saving it in
// the forward: a few more flops are free in a memory-bound kernel, an extra tensor is not.
//
// Reference: csrc/cpu/kernels_impl.h (gated_act / gated_act_backward; same operation order). The
// kernel is common.cuh's map_kernel: the flat layout when both row strides equal cols, otherwise
// the rows layout (row, column-pack cursor, no per-element division); 16-byte packs when pointers,
// strides and cols allow it.
#include "cuda/common.cuh"
#include "cuda/launchers.h"

namespace ember::cuda {
namespace {

// in = {gate, up}, out = {act(gate) * up}.
template <Act A>
struct GatedForward {
  template <typename C>
  __device__ __forceinline__ void operator()(const C (&in)[2], C (&out)[1]) const {
    out[0] = act_forward<A>(in[0]) * in[1];
  }
};

// in = {grad, gate, up}, out = {dgate, dup}.
template <Act A>
struct GatedBackward {
  template <typename C>
  __device__ __forceinline__ void operator()(const C (&in)[3], C (&out)[2]) const {
    const C grad = in[0], gate = in[1], up = in[2];
    out[0] = act_backward<A>(grad * up, gate);
    out[1] = grad * act_forward<A>(gate);
  }
};

}  // namespace

cudaError_t gated_act(const void* gate, const void* up, void* out, int64_t rows, int64_t cols,
                      int64_t gate_row_stride, int64_t up_row_stride, DType dtype, Act act, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  return dispatch(dtype, act, [&](auto type_tag, auto act_tag) {
    using T = typename decltype(type_tag)::type;
    return launch_map<T, 2, 1>({gate, up}, {gate_row_stride, up_row_stride}, {out}, rows, cols,
                               GatedForward<decltype(act_tag)::value>{}, stream);
  });
}

cudaError_t gated_act_backward(const void* grad, const void* gate, const void* up, void* dgate, void* dup,
                               int64_t rows, int64_t cols, int64_t gate_row_stride, int64_t up_row_stride,
                               DType dtype, Act act, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  return dispatch(dtype, act, [&](auto type_tag, auto act_tag) {
    using T = typename decltype(type_tag)::type;
    return launch_map<T, 3, 2>({grad, gate, up}, {cols, gate_row_stride, up_row_stride}, {dgate, dup}, rows, cols,
                               GatedBackward<decltype(act_tag)::value>{}, stream);
  });
}

}  // namespace ember::cuda
