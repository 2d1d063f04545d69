"""MLflow pyfunc model (defined from code): class labels (and a condition map) in, sampled codes out.

Input: ``{"labels": int64 N}``, plus ``{"condition": int64 N x h' x w'}`` for a prior conditioned
on a coarser code map (every prior below the top takes the codes of the level above it: the
bottom prior of a two-level VQ-VAE-2 the top codes). Params: ``seed``, ``temperature`` and
``guidance`` (classifier-free guidance, for a prior trained with label dropout), with their
defaults in ``pipelines.mlflow_models.PARAMS`` (the signature declares those; MLflow drops any
other). Output: int64 codes N x h x w.
"""

from __future__ import annotations

import mlflow
import numpy as np

from pipelines.mlflow_models import PARAMS


class PriorSampler(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from vq_core.checkpoint import load_checkpoint

        self.model, _ = load_checkpoint(context.artifacts["checkpoint"])
        self.model.eval()

    def predict(self, context, model_input, params=None):
        import torch

        params = {**PARAMS["prior"], **(params or {})}
        labels = torch.as_tensor(np.asarray(model_input["labels"]), dtype=torch.long).flatten()
        condition = model_input.get("condition") if isinstance(model_input, dict) else None
        generator = torch.Generator().manual_seed(int(params["seed"]))
        codes = self.model.sample(
            len(labels),
            labels=labels if self.model.config.num_classes > 0 else None,
            condition=None if condition is None else torch.as_tensor(np.asarray(condition)).long(),
            temperature=float(params["temperature"]),
            guidance=float(params["guidance"]),
            generator=generator,
        )
        return codes.numpy().astype(np.int64)


mlflow.models.set_model(PriorSampler())
