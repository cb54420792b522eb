import os

import pytest
import torch

# Triton kernels are proven on CPU through the interpreter; the flag is read when kernel modules are
# imported, so it is set before any test module loads them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, torch.get_num_threads()))


def _engine_view(cfg) -> dict:
    """What the C++ engine must read from `cfg` (csrc/engine/config.cpp), from CostEffConfig's own fields."""
    return {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
        "max_position_embeddings": cfg.max_position_embeddings, "type_vocab_size": cfg.type_vocab_size, "num_labels": cfg.num_labels,
        "embedding_rank": cfg.embedding_rank or 0, "pruned_vocab_size": cfg.pruned_vocab_size or 0, "exit_start": cfg.exit_start,
        "exit_pooler_dense": bool(cfg.exit_pooler_dense), "exit_pooling": cfg.exit_pooling, "pooler_activation": cfg.pooler_activation,
        "embedding_size": cfg.embedding_size or 0, "position_offset": cfg.position_offset or 0, "layer_norm_eps": float(cfg.layer_norm_eps),
        "num_attention_heads": list(cfg.num_attention_heads), "attention_head_size": list(cfg.attention_head_size),
        "intermediate_size": list(cfg.intermediate_size),
    }


def check_engine_reads_config(cfg, text: str) -> None:
    """The C++ config reader, field by field, against CostEffConfig on the JSON it wrote."""
    import json

    engine = json.loads(torch.ops.costeff._engine_config(text))
    expected = _engine_view(cfg)
    diff = {k: (engine.get(k), v) for k, v in expected.items() if engine.get(k) != v}
    assert not diff, f"the C++ engine reads this config differently from CostEffConfig (field: (engine, python)): {diff}"


@pytest.fixture(autouse=True, scope="session")
def _engine_config_matches_python():
    """Every CostEffConfig the tests serialize (save_pretrained, the engine, exports) is also read by the
    C++ config reader and compared field by field, so the two readers and their defaults stay one schema."""
    import costeff
    from costeff.models import CostEffConfig

    if not costeff.info()["cpu_kernels"]:
        yield
        return
    original = CostEffConfig.to_json_string
    seen = {"n": 0}

    def checked(self, *args, **kwargs):
        text = original(self, *args, **kwargs)
        check_engine_reads_config(self, text)
        seen["n"] += 1
        return text

    CostEffConfig.to_json_string = checked
    try:
        yield seen
    finally:
        CostEffConfig.to_json_string = original
