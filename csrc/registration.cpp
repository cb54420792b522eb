// The single schema block of the costeff op library. Kernels register per device in
// csrc/cpu/<op>.cpp (CPU), csrc/cuda/<op>.cu (CUDA) and, for Triton, python/costeff/ops/<op>.py.
#include <torch/library.h>

#include "engine/engine.h"

TORCH_LIBRARY(costeff, m) {
  // CLS state -> [dense] -> activation (tanh | relu | gelu) -> classifier -> (logits, softmax entropy
  // (fp32), entropy < threshold)
  m.def(
      "exit_head(Tensor hidden, Tensor? pooler_weight, Tensor? pooler_bias, Tensor classifier_weight, "
      "Tensor classifier_bias, float threshold, str activation=\"tanh\") -> (Tensor logits, Tensor entropy, "
      "Tensor exit_mask)");
  // Fused QKV projection + masked scaled-dot-product attention + output projection for a pruned
  // layer: num_heads may be 0 and the head size (qkv_weight rows / (3 * num_heads)) is arbitrary.
  m.def(
      "slim_attention(Tensor hidden, Tensor key_padding_mask, Tensor qkv_weight, Tensor qkv_bias, "
      "Tensor out_weight, Tensor out_bias, int num_heads) -> Tensor");
  // Linear + bias + exact (erf) GELU + linear for any intermediate size, including 0.
  m.def(
      "slim_ffn(Tensor hidden, Tensor in_weight, Tensor in_bias, Tensor out_weight, Tensor out_bias) "
      "-> Tensor");
  // LayerNorm(x + residual) over the last dimension.
  m.def("add_layer_norm(Tensor x, Tensor residual, Tensor weight, Tensor bias, float eps) -> Tensor");
  // The whole early-exit inference as one call (csrc/engine/): torch.classes.costeff.InferenceEngine.
  costeff::engine::register_engine(m);
}
