"""One table of input rules for both readers of a batch: `prepare_inputs` (every PyTorch path: early_exit,
forward, the ONNX runner) and the C++ engine's checks (csrc/engine/run.cpp). Each case must be refused
by both with the same error type and message, or accepted by both."""
from __future__ import annotations

import pytest
import torch

import costeff
from costeff.inference import InferenceEngine
from costeff.models.modeling_costeff import prepare_inputs
from _models import MAXPOS, VOCAB, make_model

L = torch.long
ONES = torch.ones(2, 3, dtype=L)
# (name, input_ids, attention_mask, token_type_ids, error type or None, message fragment)
CASES = [
    ("ok int64", ONES, None, None, None, None),
    ("ok int32 ids, bool mask, int types", ONES.int(), torch.tensor([[1, 1, 0], [1, 0, 0]]).bool(), torch.zeros(2, 3, dtype=torch.int32), None, None),
    ("ok int16 ids, float 0/1 mask", ONES.short(), torch.tensor([[1.0, 1, 0], [1, 0, 0]]), None, None, None),
    ("ok padding at position 0", ONES, torch.tensor([[0, 1, 1], [1, 1, 0]]), None, None, None),
    ("float ids", ONES.float(), None, None, TypeError, "input_ids must be an integer tensor"),
    ("bool ids", ONES.bool(), None, None, TypeError, "input_ids must be an integer tensor"),
    ("1-D ids", torch.ones(3, dtype=L), None, None, ValueError, r"input_ids must be 2-D \[batch, seq_len\]"),
    ("3-D ids", torch.ones(1, 2, 3, dtype=L), None, None, ValueError, r"input_ids must be 2-D \[batch, seq_len\]"),
    ("id = vocab_size", torch.full((1, 3), VOCAB), None, None, ValueError, rf"input_ids must be in \[0, vocab_size={VOCAB}\)"),
    ("negative id", torch.full((1, 3), -1), None, None, ValueError, rf"input_ids must be in \[0, vocab_size={VOCAB}\)"),
    ("seq_len 0", torch.ones(2, 0, dtype=L), None, None, ValueError, "input_ids has seq_len 0"),
    ("longer than the position table", torch.ones(1, MAXPOS + 1, dtype=L), None, None, ValueError,
     f"input_ids has seq_len {MAXPOS + 1} but the position table holds max_position_embeddings={MAXPOS}"),
    ("mask shape", ONES, torch.ones(2, 4), None, ValueError, r"attention_mask must have the shape of input_ids \[2, 3\]"),
    ("mask holds 2", ONES, torch.tensor([[1, 2, 0], [1, 1, 1]]), None, ValueError, "attention_mask must hold 0/1"),
    ("additive float mask", ONES, torch.tensor([[0.0, -1e4, 0], [0, 0, 0]]), None, ValueError, "attention_mask must hold 0/1"),
    ("complex mask", ONES, torch.ones(2, 3, dtype=torch.complex64), None, TypeError, "attention_mask must be bool, integer or float"),
    ("all-padding row", ONES, torch.tensor([[1, 1, 0], [0, 0, 0]]), None, ValueError, r"attention_mask rows \[1\] have no real token"),
    ("types shape", ONES, None, torch.zeros(2, 4, dtype=L), ValueError, r"token_type_ids must have the shape of input_ids \[2, 3\]"),
    ("type = type_vocab_size", ONES, None, torch.full((2, 3), 2), ValueError, r"token_type_ids must be in \[0, type_vocab_size=2\)"),
    ("negative type", ONES, None, torch.full((2, 3), -1), ValueError, r"token_type_ids must be in \[0, type_vocab_size=2\)"),
    ("float types", ONES, None, torch.zeros(2, 3), TypeError, "token_type_ids must be an integer tensor"),
]


@pytest.fixture(scope="module")
def model():
    return make_model()


def readers(model):
    out = {"prepare_inputs": lambda ids, m, t: prepare_inputs(model.config, ids, m, t),
           "early_exit": lambda ids, m, t: model.early_exit(ids, m, t, threshold=0.5, use_kernels=False)}
    if costeff.info()["cpu_kernels"]:
        engine = InferenceEngine.from_model(model)
        out["engine"] = lambda ids, m, t: engine(ids, m, t, threshold=0.5)
    return out


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_one_table_for_every_reader(model, case):
    name, ids, mask, types, exc, match = case
    assert model.config.type_vocab_size == 2 and model.config.vocab_size == VOCAB
    for reader, run in readers(model).items():
        if exc is None:
            run(ids, mask, types)
            continue
        with pytest.raises(exc, match=match):
            run(ids, mask, types)
            pytest.fail(f"{reader} accepted {name}")


def test_engine_only_rule_cpu_tensors(model):
    """The one rule that differs on purpose: the PyTorch path runs on any device, the engine on the CPU."""
    if not costeff.info()["cpu_kernels"]:
        pytest.skip("costeff._C not built")
    engine = InferenceEngine.from_model(model)
    with pytest.raises(ValueError, match="input_ids must be a CPU tensor"):
        engine(torch.ones(2, 3, dtype=L, device="meta"))
