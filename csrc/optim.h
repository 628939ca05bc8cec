// The optimizer family's update rules, written once for every C++ backend.
//
// Plain C++ (no torch, no CUDA headers): the CPU kernels instantiate opt_update with
// at::vec::Vectorized<float>, the CUDA kernels with float. A "math policy" M supplies the few
// functions that are not operators (sqrt, max, sign, splat), so the formulas below are the only copy
// of the math in C++; kernels/optim.py and pyext/ember/optim/_reference.py mirror them line by line.
//
// All arithmetic is fp32 (fp16/bf16 tensors are widened on load and rounded once on store), and the
// order of operations follows torch.optim's single-tensor implementations so fp32 results agree with
// torch to rounding.
#pragma once
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define EMBER_HD __host__ __device__ __forceinline__
#else
#define EMBER_HD inline
#endif

namespace ember {

enum class Opt : int32_t {
  kSGD = 0,      // s1 = momentum_buffer
  kAdam = 1,     // s1 = exp_avg, s2 = exp_avg_sq, s3 = max_exp_avg_sq (amsgrad); AdamW = decoupled decay
  kAdagrad = 2,  // s1 = sum
  kRMSprop = 3,  // s1 = square_avg, s2 = grad_avg (centered), s3 = momentum_buffer (momentum > 0)
  kLion = 4,     // s1 = exp_avg
};

// Option bits of OptHyper::flags.
enum OptFlag : int32_t {
  kMaximize = 1,
  kDecoupled = 2,  // Adam: AdamW-style decay p *= 1 - lr wd (Lion always decouples)
  kAmsgrad = 4,
  kNesterov = 8,
  kCentered = 16,
  kMomentum = 32,   // SGD / RMSprop keep a momentum buffer
  kFirstStep = 64,  // SGD: the momentum buffer is created from this step's gradient (torch: buf = grad)
};

// Per-launch scalars. Meaning of h1 / h2 per optimizer:
//   SGD: momentum, dampening   Adam, Lion: beta1, beta2   Adagrad: lr_decay, -   RMSprop: alpha, momentum
// om1 = 1 - h1, om2 = 1 - h2 and decay = 1 - lr wd are rounded from double once, as torch passes
// these Python floats to its kernels (1.0f - 0.9f is one ulp away from float(1 - 0.9)).
// T is float for every kernel's fp32 math; the CPU kernel's float64 path instantiates T = double.
template <class T>
struct OptHyperT {
  T lr, h1, h2, eps, wd;
  T om1, om2, decay;
  int32_t flags;
};
using OptHyper = OptHyperT<float>;

template <class T = float>
inline OptHyperT<T> make_hyper(double lr, double h1, double h2, double eps, double wd, int32_t flags) {
  return {static_cast<T>(lr),       static_cast<T>(h1),       static_cast<T>(h2),
          static_cast<T>(eps),      static_cast<T>(wd),       static_cast<T>(1.0 - h1),
          static_cast<T>(1.0 - h2), static_cast<T>(1.0 - lr * wd), flags};
}

// Per-tensor scalars that depend on the tensor's step count (torch keeps one step per parameter).
// Adam: a = lr / (1 - beta1^t), b = sqrt(1 - beta2^t). Adagrad: a = lr / (1 + (t - 1) lr_decay).
// Others: a = lr. Computed in double, as torch computes them on the host in Python floats.
template <class T>
struct OptCoefT {
  T a, b;
};
using OptCoef = OptCoefT<float>;

template <class T = float>
EMBER_HD OptCoefT<T> opt_coef(Opt kind, double lr, double h1, double h2, double step) {
  if (kind == Opt::kAdam)
    return {static_cast<T>(lr / (1.0 - pow(h1, step))), static_cast<T>(sqrt(1.0 - pow(h2, step)))};
  if (kind == Opt::kAdagrad) return {static_cast<T>(lr / (1.0 + (step - 1.0) * h1)), T(1)};
  return {static_cast<T>(lr), T(1)};
}

// One update, elementwise on V (a float or a vector of floats; doubles in the CPU float64 path). p is
// the fp32 parameter (or master weight), g the gradient already multiplied by 1/grad_scale; s1..s3
// the optimizer state.
template <Opt K, class M, class V, class T>
EMBER_HD void opt_update(const OptHyperT<T>& h, const OptCoefT<T>& c, V& p, const V& grad, V& s1, V& s2, V& s3) {
  const int32_t f = h.flags;
  V g = grad;
  if (f & kMaximize) g = M::splat(0.0f) - g;
  if constexpr (K == Opt::kSGD) {
    if (h.wd != 0.0f) g = g + M::splat(h.wd) * p;
    if (f & kMomentum) {
      s1 = (f & kFirstStep) ? g : s1 * M::splat(h.h1) + M::splat(h.om2) * g;
      g = (f & kNesterov) ? g + M::splat(h.h1) * s1 : s1;
    }
    p = p - M::splat(h.lr) * g;
  } else if constexpr (K == Opt::kAdam) {
    if (h.wd != 0.0f) {
      if (f & kDecoupled) p = p * M::splat(h.decay);
      else g = g + M::splat(h.wd) * p;
    }
    s1 = s1 + M::splat(h.om1) * (g - s1);  // torch: exp_avg.lerp_(grad, 1 - beta1)
    s2 = s2 * M::splat(h.h2) + M::splat(h.om2) * (g * g);
    V v = s2;
    if (f & kAmsgrad) {
      s3 = M::max(s3, s2);
      v = s3;
    }
    const V denom = M::sqrt(v) / M::splat(c.b) + M::splat(h.eps);
    p = p - M::splat(c.a) * (s1 / denom);
  } else if constexpr (K == Opt::kAdagrad) {
    if (h.wd != 0.0f) g = g + M::splat(h.wd) * p;
    s1 = s1 + g * g;
    p = p - M::splat(c.a) * (g / (M::sqrt(s1) + M::splat(h.eps)));
  } else if constexpr (K == Opt::kRMSprop) {
    if (h.wd != 0.0f) g = g + M::splat(h.wd) * p;
    s1 = s1 * M::splat(h.h1) + M::splat(h.om1) * (g * g);
    V avg;
    if (f & kCentered) {
      s2 = s2 + M::splat(h.om1) * (g - s2);  // torch: grad_avg.lerp_(grad, 1 - alpha)
      avg = M::sqrt(s1 - s2 * s2) + M::splat(h.eps);
    } else {
      avg = M::sqrt(s1) + M::splat(h.eps);
    }
    if (f & kMomentum) {
      s3 = s3 * M::splat(h.h2) + g / avg;
      p = p - M::splat(h.lr) * s3;
    } else {
      p = p - M::splat(h.lr) * (g / avg);
    }
  } else {  // Lion (Chen et al. 2023): sign of the beta1-interpolation, then the beta2 EMA
    p = p * M::splat(h.decay);
    const V u = s1 * M::splat(h.h1) + M::splat(h.om1) * g;
    p = p - M::splat(h.lr) * M::sign(u);
    s1 = s1 * M::splat(h.h2) + M::splat(h.om2) * g;
  }
}

// Calls f.template operator()<K>() for a runtime kind (host code).
template <class F>
inline void dispatch_opt(Opt kind, F&& f) {
  switch (kind) {
    case Opt::kSGD: f.template operator()<Opt::kSGD>(); break;
    case Opt::kAdam: f.template operator()<Opt::kAdam>(); break;
    case Opt::kAdagrad: f.template operator()<Opt::kAdagrad>(); break;
    case Opt::kRMSprop: f.template operator()<Opt::kRMSprop>(); break;
    case Opt::kLion: f.template operator()<Opt::kLion>(); break;
  }
}

}  // namespace ember
