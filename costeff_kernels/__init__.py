"""Triton kernels for the costeff ops, one module per op (exit_head, slim_attention, slim_ffn,
add_layer_norm), each with a launcher ``<op>_triton`` taking the op schema's arguments.

Submodules are imported on demand (costeff.ops._registry does so for the CUDA key): Triton reads
TRITON_INTERPRET when a kernel is decorated, so importing them here would freeze that choice early.
"""
