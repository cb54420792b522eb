"""Configuration of a slenderized multi-exit BERT (COST-EFF).

Per layer the config says how many attention heads remain (0 allowed), their size, and how many FFN
neurons remain (0 allowed); the word embedding may be factorized to rank ``embedding_rank``
(vocab x r times r x hidden); ``hidden_size`` is the (possibly pruned) residual width. Every size is
the physical size of a weight, so a checkpoint can be checked against the config before loading.
"""
from __future__ import annotations

from transformers import PreTrainedConfig

from costeff.ops._checks import check_threshold

MODEL_TYPE = "costeff_bert"
EXIT_POOLINGS = ("cls", "mean")  # what an intermediate exit reads: the CLS state or the real tokens' average


def _per_layer(name: str, value, num_layers: int) -> list[int]:
    if isinstance(value, bool):
        raise TypeError(f"CostEffConfig: {name} must be an int or a list of ints, got a bool")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"CostEffConfig: {name} must be >= 0, got {value}")
        return [value] * num_layers
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"CostEffConfig: {name} must be an int or a list of {num_layers} ints, got {type(value).__name__}")
    out = list(value)
    if len(out) != num_layers:
        raise ValueError(f"CostEffConfig: {name} has {len(out)} entries but num_hidden_layers is {num_layers}")
    for i, v in enumerate(out):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"CostEffConfig: {name}[{i}] must be an int, got {v!r}")
        if v < 0:
            raise ValueError(f"CostEffConfig: {name}[{i}] must be >= 0, got {v}")
    return out


def _positive_int(name: str, value, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"CostEffConfig: {name} must be an int, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"CostEffConfig: {name} must be {'>= 0' if allow_zero else '>= 1'}, got {value}")


class CostEffConfig(PreTrainedConfig):
    r"""Config of :class:`CostEffModel` / :class:`CostEffForSequenceClassification`.

    Fields (sizes are physical weight sizes):
        vocab_size, hidden_size (residual width), num_hidden_layers, max_position_embeddings,
        type_vocab_size, layer_norm_eps, pad_token_id, initializer_range: as in BERT.
        num_attention_heads: int or per-layer list; 0 = attention removed from that layer.
        attention_head_size: int or per-layer list (BERT: hidden_size / heads, 64 for BERT-base).
        intermediate_size: int or per-layer list of FFN neurons; 0 = FFN removed.
        embedding_rank: None for a plain vocab x hidden word embedding, else r (vocab x r, r x hidden).
        exit_start: 1-based layer of the first exit; exits follow every layer from there to the last.
        exit_pooler_dense: intermediate exits use dense + pooler_activation (DeeBERT) instead of tanh only (COST-EFF).
        exit_pooling: what intermediate exits read: "cls" (the CLS state, COST-EFF's default) or "mean"
            (the average of the real tokens' states, COST-EFF's token-average option; suits backbones
            trained with mean pooling such as all-MiniLM-L6-v2). The last exit always reads CLS.
            The last exit is always a pooler dense + ``pooler_activation`` + classifier (BERT's pooler).
        pooler_activation: the activation after an exit's pooler dense: "tanh" (BERT's pooler, RoBERTa's
            head), "relu" (DistilBERT's head) or "gelu" (ELECTRA's head). Exits without a dense apply tanh.
        gradient_equilibrium: default for the training forward (see :mod:`costeff.models`).
        embedding_size: None: the embedding tables and their LayerNorm are hidden_size wide (BERT); an int e:
            they are e wide and a Linear(e, hidden_size) with bias (``embedding_projection``) follows the
            LayerNorm (ELECTRA's embeddings_project).
        pruned_vocab_size: None: one word-embedding row per token id (vocab_size rows); an int n: the
            vocabulary was pruned (``prune_vocabulary``) to n rows and the buffer ``token_id_map``
            [vocab_size] maps every token id to its row (ids left out map to the [UNK] row). vocab_size
            stays the tokenizer's, so input ids keep their range.
        position_offset: None for BERT's positions (column index 0, 1, ...); an int p for RoBERTa-style
            positions from the attention mask: the k-th real token (1-based) gets p - 1 + k, padding gets
            p - 1 (RoBERTa / XLM-R: p = padding_idx + 1 = 2), so at most max_position_embeddings - p tokens.
        inference_threshold: the entropy threshold (nats) `costeff predict` and the engine use by default
            (set by calibration); None: not calibrated, run to full depth.
        hidden_dropout_prob, attention_probs_dropout_prob, classifier_dropout: training dropout.
    """

    model_type = MODEL_TYPE

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int | list[int] = 12
    attention_head_size: int | list[int] | None = None
    intermediate_size: int | list[int] = 3072
    embedding_rank: int | None = None
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    classifier_dropout: float | None = None
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    exit_start: int = 1
    exit_pooler_dense: bool = False
    exit_pooling: str = "cls"
    pooler_activation: str = "tanh"
    position_offset: int | None = None
    embedding_size: int | None = None
    pruned_vocab_size: int | None = None
    gradient_equilibrium: bool = False
    inference_threshold: float | None = None

    def __post_init__(self, **kwargs):
        _positive_int("num_hidden_layers", self.num_hidden_layers)
        _positive_int("hidden_size", self.hidden_size)
        _positive_int("vocab_size", self.vocab_size)
        _positive_int("max_position_embeddings", self.max_position_embeddings)
        _positive_int("type_vocab_size", self.type_vocab_size)
        n = self.num_hidden_layers
        heads = _per_layer("num_attention_heads", self.num_attention_heads, n)
        if self.attention_head_size is None:
            # BERT's convention, from the first layer's head count (an unpruned model has one count)
            h0 = next((h for h in heads if h > 0), 0)
            if h0 and self.hidden_size % h0:
                raise ValueError(
                    f"CostEffConfig: attention_head_size not given and hidden_size {self.hidden_size} is not "
                    f"divisible by num_attention_heads {h0}; pass attention_head_size"
                )
            self.attention_head_size = self.hidden_size // h0 if h0 else 64
        head_sizes = _per_layer("attention_head_size", self.attention_head_size, n)
        for i, (h, d) in enumerate(zip(heads, head_sizes)):
            if h > 0 and d == 0:
                raise ValueError(f"CostEffConfig: layer {i} keeps {h} heads but attention_head_size[{i}] is 0")
        self.num_attention_heads = heads
        self.attention_head_size = head_sizes
        self.intermediate_size = _per_layer("intermediate_size", self.intermediate_size, n)
        if self.embedding_size is not None:
            _positive_int("embedding_size", self.embedding_size)
        if self.pruned_vocab_size is not None:
            _positive_int("pruned_vocab_size", self.pruned_vocab_size)
            if self.pruned_vocab_size > self.vocab_size:
                raise ValueError(f"CostEffConfig: pruned_vocab_size {self.pruned_vocab_size} exceeds vocab_size {self.vocab_size}")
        if self.embedding_rank is not None:
            _positive_int("embedding_rank", self.embedding_rank)
            width = self.embedding_width
            # (rows may be fewer than the rank once a factorized vocabulary is pruned)
            if self.embedding_rank > width:
                raise ValueError(
                    f"CostEffConfig: embedding_rank {self.embedding_rank} exceeds "
                    f"{'embedding_size' if self.embedding_size is not None else 'hidden_size'} = {width}"
                )
        _positive_int("exit_start", self.exit_start)
        if self.exit_start > n:
            raise ValueError(f"CostEffConfig: exit_start {self.exit_start} is past the last layer ({n})")
        if self.exit_pooling not in EXIT_POOLINGS:
            raise ValueError(f"CostEffConfig: exit_pooling must be 'cls' or 'mean', got {self.exit_pooling!r}")
        if self.pooler_activation not in ("tanh", "relu", "gelu"):
            raise ValueError(f"CostEffConfig: pooler_activation must be 'tanh', 'relu' or 'gelu', got {self.pooler_activation!r}")
        if self.position_offset is not None:
            _positive_int("position_offset", self.position_offset)
            if self.position_offset >= self.max_position_embeddings:
                raise ValueError(f"CostEffConfig: position_offset {self.position_offset} leaves no position in a table of "
                                 f"max_position_embeddings={self.max_position_embeddings}")
        if self.hidden_act != "gelu":
            raise ValueError(f"CostEffConfig: hidden_act must be 'gelu' (exact erf GELU, as the slim_ffn kernel), got {self.hidden_act!r}")
        if self.inference_threshold is not None:
            check_threshold("CostEffConfig", self.inference_threshold, "inference_threshold")
        if not (self.layer_norm_eps > 0):
            raise ValueError(f"CostEffConfig: layer_norm_eps must be > 0, got {self.layer_norm_eps}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
            p = getattr(self, name)
            if p is not None and not (0 <= p < 1):
                raise ValueError(f"CostEffConfig: {name} must be in [0, 1), got {p}")
        super().__post_init__(**kwargs)
        if self.num_labels is None or self.num_labels < 1:
            raise ValueError(f"CostEffConfig: num_labels must be >= 1, got {self.num_labels}")

    @property
    def embedding_width(self) -> int:
        """Width of the embedding tables and their LayerNorm (before ``embedding_projection``)."""
        return self.embedding_size if self.embedding_size is not None else self.hidden_size

    @property
    def word_rows(self) -> int:
        """Rows of the word-embedding table: pruned_vocab_size, or vocab_size when not pruned."""
        return self.pruned_vocab_size if self.pruned_vocab_size is not None else self.vocab_size

    @property
    def num_exits(self) -> int:
        return self.num_hidden_layers - self.exit_start + 1

    def exit_layers(self) -> list[int]:
        """1-based layer indices that carry an exit."""
        return list(range(self.exit_start, self.num_hidden_layers + 1))
