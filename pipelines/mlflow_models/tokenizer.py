"""MLflow pyfunc model (defined from code): images in, discrete codes out.

Input: uint8 images N x H x W x C at the size the autoencoder was trained on. Output: one int64
array N x h x w per code level, by the level's name ("top" and "bottom" for the default VQ-VAE-2,
the names of train_vqvae.model.levels for another depth, "codes" for one level), the same codes
the tokenize stage writes to its shards.
"""

from __future__ import annotations

import mlflow
import numpy as np


class Tokenizer(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from vq_core.checkpoint import load_checkpoint

        self.model, _ = load_checkpoint(context.artifacts["checkpoint"])
        self.model.eval()

    def predict(self, context, model_input, params=None):
        # The tokenize stage's own conversion, so that the codes are the shards' codes.
        from pipelines.data.images import to_model_input

        codes = self.model.encode(to_model_input(np.asarray(model_input)))
        return {level: c.numpy().astype(np.int64) for level, c in zip(self.model.levels, codes)}


mlflow.models.set_model(Tokenizer())
