// Argument checks shared by every host entry point. Messages name the op and the argument and
// say what was expected and what was given, so a user can fix the call without reading C++.
#pragma once

#include <torch/all.h>

#include <initializer_list>
#include <sstream>
#include <string>

namespace mla_ext {

inline std::string sizes_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

inline std::string dtypes_str(std::initializer_list<at::ScalarType> dtypes) {
  std::ostringstream os;
  bool first = true;
  for (auto d : dtypes) {
    os << (first ? "" : ", ") << c10::toString(d);
    first = false;
  }
  return os.str();
}

inline bool dtype_in(const at::Tensor& t, std::initializer_list<at::ScalarType> dtypes) {
  for (auto d : dtypes) {
    if (t.scalar_type() == d) return true;
  }
  return false;
}

}  // namespace mla_ext

// OP is a string literal naming the op, x a tensor argument; #x puts its name in the message.
#define MLA_CHECK_DIM(OP, x, n)                                                          \
  TORCH_CHECK((x).dim() == (n), OP ": " #x " must have " #n " dims, got shape ",        \
              mla_ext::sizes_str(x))

#define MLA_CHECK_SHAPE(OP, x, ...)                                                      \
  TORCH_CHECK((x).sizes() == torch::IntArrayRef({__VA_ARGS__}),                          \
              OP ": " #x " must have shape (" #__VA_ARGS__ ") = ",                       \
              torch::IntArrayRef({__VA_ARGS__}), ", got ", mla_ext::sizes_str(x))

#define MLA_CHECK_DTYPE(OP, x, ...)                                                      \
  TORCH_CHECK(mla_ext::dtype_in((x), {__VA_ARGS__}), OP ": " #x " must have dtype in [",  \
              mla_ext::dtypes_str({__VA_ARGS__}), "], got ", (x).scalar_type())

#define MLA_CHECK_SAME_DEVICE(OP, x, ref)                                                \
  TORCH_CHECK((x).device() == (ref).device(), OP ": " #x " must be on ", (ref).device(), \
              " like " #ref ", got ", (x).device())

#define MLA_CHECK_CONTIGUOUS(OP, x) \
  TORCH_CHECK((x).is_contiguous(), OP ": " #x " must be contiguous")

#define MLA_CHECK_LAST_DIM_CONTIGUOUS(OP, x) \
  TORCH_CHECK((x).stride(-1) == 1, OP ": " #x " must be contiguous in its last dim")
