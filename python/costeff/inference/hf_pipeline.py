"""A Hugging Face text-classification pipeline that runs the early exit.

``transformers.pipeline("costeff-text-classification", model=DIR)`` (registered when costeff.models
is imported) or ``transformers.pipeline("text-classification", model=DIR, pipeline_class=CostEffTextClassificationPipeline)``
returns ``{"label", "score", "exit_layer"}`` per text, at the directory's calibrated threshold
(``inference_threshold``; 0, i.e. full depth, when not calibrated) unless ``threshold=`` is given, when
the pipeline is built or per call (``pipe(texts, threshold=0.3)``; a call's threshold wins). On a GPU
(``device="cuda"``) it runs costeff.inference.GpuRunner. The
model's own ``forward`` is untouched: in eval mode without labels it still returns every exit, which
distillation needs."""
from __future__ import annotations

from typing import Optional

from transformers import AutoModelForSequenceClassification, TextClassificationPipeline
from transformers.pipelines import PIPELINE_REGISTRY

from costeff.ops._checks import check_threshold
from costeff.models import CostEffForSequenceClassification

TASK = "costeff-text-classification"


class CostEffTextClassificationPipeline(TextClassificationPipeline):
    def __init__(self, *args, threshold: Optional[float] = None, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.model, CostEffForSequenceClassification):
            raise TypeError(f"{TASK} needs a costeff model, got {type(self.model).__name__}")
        if threshold is None:
            threshold = self.model.config.inference_threshold or 0.0
        self.threshold = check_threshold(TASK, threshold)

    def _sanitize_parameters(self, threshold=None, **kwargs):
        preprocess, forward, postprocess = super()._sanitize_parameters(**kwargs)
        if threshold is not None:
            forward = {**forward, "threshold": check_threshold(TASK, threshold)}
        return preprocess, forward, postprocess

    def _forward(self, model_inputs, threshold: Optional[float] = None):
        t = self.threshold if threshold is None else threshold
        args = (model_inputs["input_ids"], model_inputs.get("attention_mask"), model_inputs.get("token_type_ids"))
        if self.model.device.type == "cuda":  # pipeline(..., device="cuda"): decisions on the device, CUDA graphs
            if getattr(self, "_runner", None) is None:
                from costeff.inference.gpu_runner import GpuRunner

                self._runner = GpuRunner(self.model, device=str(self.model.device))
            out = self._runner(*args, threshold=t)
        else:
            out = self.model.early_exit(*args, threshold=t)
        return {"logits": out.logits, "exit_layer": out.exit_layer}

    def postprocess(self, model_outputs, function_to_apply=None, top_k=1, _legacy=True):
        result = super().postprocess(model_outputs, function_to_apply, top_k, _legacy)
        layer = int(model_outputs["exit_layer"][0])
        if isinstance(result, dict):
            return {**result, "exit_layer": layer}
        return [{**r, "exit_layer": layer} for r in result]


PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=CostEffTextClassificationPipeline, pt_model=AutoModelForSequenceClassification)
