#pragma once
// Argument checks shared by the CPU and CUDA bindings of every op. Each failure names the op and the
// argument, and raises a Python ValueError / TypeError rather than crashing.
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <optional>

namespace costeff {

struct ExitHeadSizes {
  int64_t batch;
  int64_t hidden;
  int64_t classes;
  bool has_pooler;
  int activation;  // ExitActivation (costeff/exit_head.h)
};
ExitHeadSizes check_exit_head_inputs(
    const at::Tensor& hidden,
    const std::optional<at::Tensor>& pooler_weight,
    const std::optional<at::Tensor>& pooler_bias,
    const at::Tensor& classifier_weight,
    const at::Tensor& classifier_bias,
    double threshold,
    c10::string_view activation);

// "tanh" / "relu" / "gelu" -> ExitActivation; anything else is a ValueError naming `what`.
int parse_exit_activation(c10::string_view activation, const char* what);

// Returns the head size (0 when num_heads == 0).
// The one threshold rule of every entry point (python/costeff/ops/_checks.py check_threshold is its
// Python twin): a number >= 0 in nats; +inf lets every row leave at the first exit; NaN is refused.
void check_threshold(const char* where, double threshold);

int64_t check_slim_attention_inputs(
    const at::Tensor& hidden,
    const at::Tensor& key_padding_mask,
    const at::Tensor& qkv_weight,
    const at::Tensor& qkv_bias,
    const at::Tensor& out_weight,
    const at::Tensor& out_bias,
    int64_t num_heads);

// Returns the intermediate size (may be 0).
int64_t check_slim_ffn_inputs(
    const at::Tensor& hidden,
    const at::Tensor& in_weight,
    const at::Tensor& in_bias,
    const at::Tensor& out_weight,
    const at::Tensor& out_bias);

void check_add_layer_norm_inputs(
    const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, const at::Tensor& bias, double eps);

}  // namespace costeff
