#include "costeff/op_checks.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <string>

#include "costeff/exit_head.h"

namespace costeff {
namespace {

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

void check_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(
      is_float_dtype(t.scalar_type()), op, ": ", name, " must be float32, float64, bfloat16 or float16, got ",
      t.scalar_type());
}

void check_same_dtype(
    const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref, const char* ref_name = "hidden") {
  TORCH_CHECK_TYPE(
      t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ", ref_name,
      " has dtype ", ref.scalar_type(), "; all floating inputs must share one dtype");
}

void check_same_device(
    const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref, const char* ref_name = "hidden") {
  TORCH_CHECK_VALUE(
      t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
      ref.device(), "; all inputs must be on one device");
}

void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": ", name, " must be ", dim, "-D ", layout, ", got shape ", t.sizes());
}

void check_size(const char* op, const char* name, const at::Tensor& t, int64_t d, int64_t expected, const char* what) {
  TORCH_CHECK_VALUE(
      t.size(d) == expected, op, ": ", name, ".size(", d, ") must equal ", what, " (", expected, "), got shape ",
      t.sizes());
}

// A float input of the op: dtype, device and rank in one call.
void check_param(
    const char* op, const char* name, const at::Tensor& t, const at::Tensor& hidden, int64_t dim, const char* layout,
    const char* ref_name = "hidden") {
  check_same_device(op, name, t, hidden, ref_name);
  check_same_dtype(op, name, t, hidden, ref_name);
  check_dim(op, name, t, dim, layout);
}

}  // namespace

int parse_exit_activation(c10::string_view activation, const char* what) {
  if (activation == "tanh") return kExitTanh;
  if (activation == "relu") return kExitRelu;
  if (activation == "gelu") return kExitGelu;
  TORCH_CHECK_VALUE(false, what, " must be \"tanh\", \"relu\" or \"gelu\", got \"", std::string(activation), "\"");
  return kExitTanh;
}

void check_threshold(const char* where, double threshold) {
  TORCH_CHECK_VALUE(threshold >= 0, where,  // NaN fails too
                    ": threshold must be a number >= 0 (softmax entropy in nats; 0 runs every row to the last layer, +inf lets every row "
                    "leave at the first exit), got ", threshold);
}

ExitHeadSizes check_exit_head_inputs(
    const at::Tensor& hidden,
    const std::optional<at::Tensor>& pooler_weight,
    const std::optional<at::Tensor>& pooler_bias,
    const at::Tensor& classifier_weight,
    const at::Tensor& classifier_bias,
    double threshold,
    c10::string_view activation) {
  constexpr const char* op = "costeff::exit_head";
  check_float(op, "hidden", hidden);
  check_dim(op, "hidden", hidden, 2, "[batch, hidden_size]");
  const int64_t hidden_size = hidden.size(1);
  TORCH_CHECK_VALUE(
      pooler_weight.has_value() == pooler_bias.has_value(), op,
      ": pooler_weight and pooler_bias must be given together (or both None)");
  if (pooler_weight.has_value()) {
    check_param(op, "pooler_weight", *pooler_weight, hidden, 2, "[hidden_size, hidden_size]");
    check_size(op, "pooler_weight", *pooler_weight, 0, hidden_size, "hidden.size(1)");
    check_size(op, "pooler_weight", *pooler_weight, 1, hidden_size, "hidden.size(1)");
    check_param(op, "pooler_bias", *pooler_bias, hidden, 1, "[hidden_size]");
    check_size(op, "pooler_bias", *pooler_bias, 0, hidden_size, "hidden.size(1)");
  }
  check_param(op, "classifier_weight", classifier_weight, hidden, 2, "[num_classes, hidden_size]");
  check_size(op, "classifier_weight", classifier_weight, 1, hidden_size, "hidden.size(1)");
  const int64_t classes = classifier_weight.size(0);
  TORCH_CHECK_VALUE(classes >= 1, op, ": classifier_weight must have at least one class (row), got shape ",
                    classifier_weight.sizes());
  check_param(op, "classifier_bias", classifier_bias, hidden, 1, "[num_classes]");
  check_size(op, "classifier_bias", classifier_bias, 0, classes, "classifier_weight.size(0)");
  check_threshold(op, threshold);
  const int act = parse_exit_activation(activation, "costeff::exit_head: activation");
  return ExitHeadSizes{hidden.size(0), hidden_size, classes, pooler_weight.has_value(), act};
}

int64_t check_slim_attention_inputs(
    const at::Tensor& hidden,
    const at::Tensor& key_padding_mask,
    const at::Tensor& qkv_weight,
    const at::Tensor& qkv_bias,
    const at::Tensor& out_weight,
    const at::Tensor& out_bias,
    int64_t num_heads) {
  constexpr const char* op = "costeff::slim_attention";
  check_float(op, "hidden", hidden);
  check_dim(op, "hidden", hidden, 3, "[batch, seq_len, hidden_size]");
  const int64_t batch = hidden.size(0), seq = hidden.size(1), hidden_size = hidden.size(2);
  check_same_device(op, "key_padding_mask", key_padding_mask, hidden);
  TORCH_CHECK_TYPE(
      key_padding_mask.scalar_type() == at::kBool || !at::isFloatingType(key_padding_mask.scalar_type()), op,
      ": key_padding_mask must be bool or integer (nonzero = real token), got ", key_padding_mask.scalar_type());
  check_dim(op, "key_padding_mask", key_padding_mask, 2, "[batch, seq_len]");
  check_size(op, "key_padding_mask", key_padding_mask, 0, batch, "hidden.size(0)");
  check_size(op, "key_padding_mask", key_padding_mask, 1, seq, "hidden.size(1)");
  TORCH_CHECK_VALUE(num_heads >= 0, op, ": num_heads must be >= 0, got ", num_heads);
  check_param(op, "qkv_weight", qkv_weight, hidden, 2, "[3 * num_heads * head_size, hidden_size]");
  check_size(op, "qkv_weight", qkv_weight, 1, hidden_size, "hidden.size(2)");
  const int64_t qkv_rows = qkv_weight.size(0);
  int64_t head_size = 0;
  if (num_heads == 0) {
    TORCH_CHECK_VALUE(qkv_rows == 0, op, ": num_heads is 0 but qkv_weight has ", qkv_rows, " rows (expected 0)");
  } else {
    TORCH_CHECK_VALUE(
        qkv_rows > 0 && qkv_rows % (3 * num_heads) == 0, op, ": qkv_weight.size(0) (", qkv_rows,
        ") must be a positive multiple of 3 * num_heads (", 3 * num_heads, ")");
    head_size = qkv_rows / (3 * num_heads);
  }
  check_param(op, "qkv_bias", qkv_bias, hidden, 1, "[3 * num_heads * head_size]");
  check_size(op, "qkv_bias", qkv_bias, 0, qkv_rows, "qkv_weight.size(0)");
  check_param(op, "out_weight", out_weight, hidden, 2, "[hidden_size, num_heads * head_size]");
  check_size(op, "out_weight", out_weight, 0, hidden_size, "hidden.size(2)");
  check_size(op, "out_weight", out_weight, 1, num_heads * head_size, "num_heads * head_size");
  check_param(op, "out_bias", out_bias, hidden, 1, "[hidden_size]");
  check_size(op, "out_bias", out_bias, 0, hidden_size, "hidden.size(2)");
  return head_size;
}

int64_t check_slim_ffn_inputs(
    const at::Tensor& hidden,
    const at::Tensor& in_weight,
    const at::Tensor& in_bias,
    const at::Tensor& out_weight,
    const at::Tensor& out_bias) {
  constexpr const char* op = "costeff::slim_ffn";
  check_float(op, "hidden", hidden);
  TORCH_CHECK_VALUE(hidden.dim() >= 1, op, ": hidden must have at least 1 dimension [..., hidden_size]");
  const int64_t hidden_size = hidden.size(-1);
  check_param(op, "in_weight", in_weight, hidden, 2, "[intermediate_size, hidden_size]");
  check_size(op, "in_weight", in_weight, 1, hidden_size, "hidden.size(-1)");
  const int64_t inter = in_weight.size(0);
  check_param(op, "in_bias", in_bias, hidden, 1, "[intermediate_size]");
  check_size(op, "in_bias", in_bias, 0, inter, "in_weight.size(0)");
  check_param(op, "out_weight", out_weight, hidden, 2, "[hidden_size, intermediate_size]");
  check_size(op, "out_weight", out_weight, 0, hidden_size, "hidden.size(-1)");
  check_size(op, "out_weight", out_weight, 1, inter, "in_weight.size(0)");
  check_param(op, "out_bias", out_bias, hidden, 1, "[hidden_size]");
  check_size(op, "out_bias", out_bias, 0, hidden_size, "hidden.size(-1)");
  return inter;
}

void check_add_layer_norm_inputs(
    const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  constexpr const char* op = "costeff::add_layer_norm";
  check_float(op, "x", x);
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least 1 dimension [..., hidden_size]");
  check_same_device(op, "residual", residual, x, "x");
  check_same_dtype(op, "residual", residual, x, "x");
  TORCH_CHECK_VALUE(
      residual.sizes() == x.sizes(), op, ": residual must have the shape of x ", x.sizes(), ", got ",
      residual.sizes());
  const int64_t hidden_size = x.size(-1);
  TORCH_CHECK_VALUE(hidden_size >= 1, op, ": x.size(-1) (hidden_size) must be >= 1");
  check_param(op, "weight", weight, x, 1, "[hidden_size]", "x");
  check_size(op, "weight", weight, 0, hidden_size, "x.size(-1)");
  check_param(op, "bias", bias, x, 1, "[hidden_size]", "x");
  check_size(op, "bias", bias, 0, hidden_size, "x.size(-1)");
  TORCH_CHECK_VALUE(eps > 0 && std::isfinite(eps), op, ": eps must be a positive finite number, got ", eps);
}

}  // namespace costeff
