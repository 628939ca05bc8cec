// Torch-side helpers shared by the CPU registrations and the CUDA glue: argument checks and the
// mapping from the schema's `str act` to ember::Act.
#pragma once
#include <string>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "activation.h"

namespace ember {

Act parse_act(const std::string& name);
DType to_dtype(c10::ScalarType t, const char* op, const char* arg);

// The gated kernels take 2-D (rows, cols) operands whose rows may be strided (e.g. the two halves of
// one [.., 2N] tensor) but whose last dimension is contiguous.
void check_rows(const at::Tensor& t, const char* op, const char* arg);

}  // namespace ember
