"""Argument checks for the fake (meta) kernels and the references, mirroring csrc/op_checks.cpp so
that a bad call fails the same way under torch.compile, on meta tensors and on the reference path."""
from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


THRESHOLD_RULE = "a number >= 0 (softmax entropy in nats; 0 runs every row to the last layer, +inf lets every row leave at the first exit)"


def check_threshold(where: str, threshold, name: str = "threshold") -> float:
    """The one threshold rule of every entry point (ops, early_exit, the engine, the ONNX runner,
    predict, the HF pipeline, configs); csrc/op_checks.cpp's check_threshold is its C++ twin.
    ``name``: the argument or field as the caller knows it."""
    # a float skips numbers.Real's ABC check (a served request calls this)
    if type(threshold) is not float and (isinstance(threshold, bool) or not isinstance(threshold, numbers.Real)):
        raise TypeError(f"{where}: {name} must be {THRESHOLD_RULE}, got {threshold!r}")
    t = float(threshold)
    if not t >= 0:  # NaN fails too
        raise ValueError(f"{where}: {name} must be {THRESHOLD_RULE}, got {threshold!r}")
    return t


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float64, bfloat16 or float16, got {t.dtype}")


def check_param(op: str, name: str, t, ref: torch.Tensor, dim: int, layout: str, ref_name: str = "hidden") -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; all inputs must be on one device")
    if t.dtype != ref.dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}; all floating inputs must share one dtype")
    if t.dim() != dim:
        raise ValueError(f"{op}: {name} must be {dim}-D {layout}, got shape {list(t.shape)}")


def check_size(op: str, name: str, t: torch.Tensor, d: int, expected: int, what: str) -> None:
    if t.shape[d] != expected:
        raise ValueError(f"{op}: {name}.size({d}) must equal {what} ({expected}), got shape {list(t.shape)}")


EXIT_ACTIVATIONS = ("tanh", "relu", "gelu")


def check_exit_head(hidden, pooler_weight, pooler_bias, classifier_weight, classifier_bias, threshold, activation="tanh") -> int:
    op = "costeff::exit_head"
    check_float(op, "hidden", hidden)
    if hidden.dim() != 2:
        raise ValueError(f"{op}: hidden must be 2-D [batch, hidden_size], got shape {list(hidden.shape)}")
    h = hidden.shape[1]
    if (pooler_weight is None) != (pooler_bias is None):
        raise ValueError(f"{op}: pooler_weight and pooler_bias must be given together (or both None)")
    if pooler_weight is not None:
        check_param(op, "pooler_weight", pooler_weight, hidden, 2, "[hidden_size, hidden_size]")
        check_size(op, "pooler_weight", pooler_weight, 0, h, "hidden.size(1)")
        check_size(op, "pooler_weight", pooler_weight, 1, h, "hidden.size(1)")
        check_param(op, "pooler_bias", pooler_bias, hidden, 1, "[hidden_size]")
        check_size(op, "pooler_bias", pooler_bias, 0, h, "hidden.size(1)")
    check_param(op, "classifier_weight", classifier_weight, hidden, 2, "[num_classes, hidden_size]")
    check_size(op, "classifier_weight", classifier_weight, 1, h, "hidden.size(1)")
    c = classifier_weight.shape[0]
    if c < 1:
        raise ValueError(f"{op}: classifier_weight must have at least one class (row), got shape {list(classifier_weight.shape)}")
    check_param(op, "classifier_bias", classifier_bias, hidden, 1, "[num_classes]")
    check_size(op, "classifier_bias", classifier_bias, 0, c, "classifier_weight.size(0)")
    check_threshold(op, threshold)
    if activation not in EXIT_ACTIVATIONS:
        raise ValueError(f'{op}: activation must be "tanh", "relu" or "gelu", got "{activation}"')
    return c


def check_slim_attention(hidden, key_padding_mask, qkv_weight, qkv_bias, out_weight, out_bias, num_heads) -> int:
    op = "costeff::slim_attention"
    check_float(op, "hidden", hidden)
    if hidden.dim() != 3:
        raise ValueError(f"{op}: hidden must be 3-D [batch, seq_len, hidden_size], got shape {list(hidden.shape)}")
    b, s, h = hidden.shape
    if not isinstance(key_padding_mask, torch.Tensor):
        raise TypeError(f"{op}: key_padding_mask must be a Tensor, got {type(key_padding_mask).__name__}")
    if key_padding_mask.device != hidden.device:
        raise ValueError(f"{op}: key_padding_mask is on {key_padding_mask.device} but hidden is on {hidden.device}; all inputs must be on one device")
    if key_padding_mask.dtype.is_floating_point or key_padding_mask.dtype.is_complex:
        raise TypeError(f"{op}: key_padding_mask must be bool or integer (nonzero = real token), got {key_padding_mask.dtype}")
    if key_padding_mask.dim() != 2:
        raise ValueError(f"{op}: key_padding_mask must be 2-D [batch, seq_len], got shape {list(key_padding_mask.shape)}")
    check_size(op, "key_padding_mask", key_padding_mask, 0, b, "hidden.size(0)")
    check_size(op, "key_padding_mask", key_padding_mask, 1, s, "hidden.size(1)")
    if num_heads < 0:
        raise ValueError(f"{op}: num_heads must be >= 0, got {num_heads}")
    check_param(op, "qkv_weight", qkv_weight, hidden, 2, "[3 * num_heads * head_size, hidden_size]")
    check_size(op, "qkv_weight", qkv_weight, 1, h, "hidden.size(2)")
    rows = qkv_weight.shape[0]
    if num_heads == 0:
        if rows != 0:
            raise ValueError(f"{op}: num_heads is 0 but qkv_weight has {rows} rows (expected 0)")
        head_size = 0
    else:
        if rows <= 0 or rows % (3 * num_heads) != 0:
            raise ValueError(f"{op}: qkv_weight.size(0) ({rows}) must be a positive multiple of 3 * num_heads ({3 * num_heads})")
        head_size = rows // (3 * num_heads)
    check_param(op, "qkv_bias", qkv_bias, hidden, 1, "[3 * num_heads * head_size]")
    check_size(op, "qkv_bias", qkv_bias, 0, rows, "qkv_weight.size(0)")
    check_param(op, "out_weight", out_weight, hidden, 2, "[hidden_size, num_heads * head_size]")
    check_size(op, "out_weight", out_weight, 0, h, "hidden.size(2)")
    check_size(op, "out_weight", out_weight, 1, num_heads * head_size, "num_heads * head_size")
    check_param(op, "out_bias", out_bias, hidden, 1, "[hidden_size]")
    check_size(op, "out_bias", out_bias, 0, h, "hidden.size(2)")
    return head_size


def check_slim_ffn(hidden, in_weight, in_bias, out_weight, out_bias) -> int:
    op = "costeff::slim_ffn"
    check_float(op, "hidden", hidden)
    if hidden.dim() < 1:
        raise ValueError(f"{op}: hidden must have at least 1 dimension [..., hidden_size]")
    h = hidden.shape[-1]
    check_param(op, "in_weight", in_weight, hidden, 2, "[intermediate_size, hidden_size]")
    check_size(op, "in_weight", in_weight, 1, h, "hidden.size(-1)")
    inter = in_weight.shape[0]
    check_param(op, "in_bias", in_bias, hidden, 1, "[intermediate_size]")
    check_size(op, "in_bias", in_bias, 0, inter, "in_weight.size(0)")
    check_param(op, "out_weight", out_weight, hidden, 2, "[hidden_size, intermediate_size]")
    check_size(op, "out_weight", out_weight, 0, h, "hidden.size(-1)")
    check_size(op, "out_weight", out_weight, 1, inter, "in_weight.size(0)")
    check_param(op, "out_bias", out_bias, hidden, 1, "[hidden_size]")
    check_size(op, "out_bias", out_bias, 0, h, "hidden.size(-1)")
    return inter


def check_add_layer_norm(x, residual, weight, bias, eps) -> None:
    op = "costeff::add_layer_norm"
    check_float(op, "x", x)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least 1 dimension [..., hidden_size]")
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"{op}: residual must be a Tensor, got {type(residual).__name__}")
    if residual.device != x.device:
        raise ValueError(f"{op}: residual is on {residual.device} but x is on {x.device}; all inputs must be on one device")
    if residual.dtype != x.dtype:
        raise TypeError(f"{op}: residual has dtype {residual.dtype} but x has dtype {x.dtype}; all floating inputs must share one dtype")
    if residual.shape != x.shape:
        raise ValueError(f"{op}: residual must have the shape of x {list(x.shape)}, got {list(residual.shape)}")
    h = x.shape[-1]
    if h < 1:
        raise ValueError(f"{op}: x.size(-1) (hidden_size) must be >= 1")
    check_param(op, "weight", weight, x, 1, "[hidden_size]", "x")
    check_size(op, "weight", weight, 0, h, "x.size(-1)")
    check_param(op, "bias", bias, x, 1, "[hidden_size]", "x")
    check_size(op, "bias", bias, 0, h, "x.size(-1)")
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"{op}: eps must be a positive finite number, got {eps}")
