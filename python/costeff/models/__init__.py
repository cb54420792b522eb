"""Multi-exit slenderized BERT (COST-EFF): config, models, conversion from BERT, width pruning,
early-exit inference and FLOPs / parameter accounting. Importing this package registers the config
and models with transformers' Auto classes (model_type ``costeff_bert``)."""
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from costeff.models.configuration_costeff import MODEL_TYPE, CostEffConfig
from costeff.models.convert import converted_config, factorize_embedding, family_of, from_bert, from_pretrained_encoder, prune_vocabulary, slenderize
from costeff.models.flops import (
    count_parameters,
    exit_macs,
    flops_per_sample,
    layer_macs,
    macs_per_sample,
    parameter_count,
)
from costeff.models.modeling_costeff import (
    CostEffForSequenceClassification,
    CostEffModel,
    CostEffPreTrainedModel,
    CostEffSequenceClassifierOutput,
    EarlyExitOutput,
    check_checkpoint,
    gradient_rescale,
    prepare_inputs,
)
from costeff.models.segments import EmbeddingSegment, ExitSegment, exit_segments

AutoConfig.register(MODEL_TYPE, CostEffConfig, exist_ok=True)
AutoModel.register(CostEffConfig, CostEffModel, exist_ok=True)
AutoModelForSequenceClassification.register(CostEffConfig, CostEffForSequenceClassification, exist_ok=True)

__all__ = [
    "CostEffConfig",
    "CostEffForSequenceClassification",
    "CostEffModel",
    "CostEffPreTrainedModel",
    "CostEffSequenceClassifierOutput",
    "EarlyExitOutput",
    "EmbeddingSegment",
    "ExitSegment",
    "check_checkpoint",
    "converted_config",
    "count_parameters",
    "exit_macs",
    "exit_segments",
    "factorize_embedding",
    "family_of",
    "flops_per_sample",
    "from_bert",
    "from_pretrained_encoder",
    "gradient_rescale",
    "layer_macs",
    "macs_per_sample",
    "parameter_count",
    "prepare_inputs",
    "prune_vocabulary",
    "slenderize",
]

# The pipeline task "costeff-text-classification" is registered with the model classes it runs.
from costeff.inference import hf_pipeline as _hf_pipeline  # noqa: E402,F401
