"""Public op wrappers. Each op has one module here (wrapper, plain-PyTorch reference, fake kernel,
autograd) and the same name in csrc/cpu, csrc/cuda, costeff_kernels, tests and benchmarks."""
from costeff.ops.add_layer_norm import add_layer_norm, add_layer_norm_reference
from costeff.ops.exit_head import ExitHeadOutput, exit_head, exit_head_reference
from costeff.ops.slim_attention import slim_attention, slim_attention_reference
from costeff.ops.slim_ffn import slim_ffn, slim_ffn_reference

OP_NAMES = ("exit_head", "slim_attention", "slim_ffn", "add_layer_norm")

__all__ = [
    "OP_NAMES",
    "ExitHeadOutput",
    "add_layer_norm",
    "add_layer_norm_reference",
    "exit_head",
    "exit_head_reference",
    "slim_attention",
    "slim_attention_reference",
    "slim_ffn",
    "slim_ffn_reference",
]
