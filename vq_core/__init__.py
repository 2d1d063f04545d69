"""vq_core: discrete-latent image models in plain PyTorch.

Autoencoders that turn images into integer code maps and back (VQ-VAE-2, VQ-VAE, DALL-E's dVAE),
the vector quantizer they share, autoregressive priors over code maps (PixelSNAIL, Gated
PixelCNN, a decoder-only transformer) with cached sampling, and one checkpoint format for all of
them. No Ray, MLflow or webdataset in here: the library can be used, read and tested on its own.
"""

import importlib

# name -> the module that defines it. Imported on first use (PEP 562), so that a process which
# reads only the torch-free tables (``vq_core.kinds``: a config being parsed, a Ray Data task
# decoding images) does not pay for importing torch and every model.
_EXPORTS = {
    "load_checkpoint": "vq_core.checkpoint",
    "model_from_config": "vq_core.checkpoint",
    "save_checkpoint": "vq_core.checkpoint",
    "DiscreteVAE": "vq_core.dvae",
    "DiscreteVAEConfig": "vq_core.dvae",
    "GatedPixelCNN": "vq_core.pixelcnn",
    "GatedPixelCNNConfig": "vq_core.pixelcnn",
    "bits_per_code": "vq_core.pixelcnn",
    "PixelSNAIL": "vq_core.pixelsnail",
    "PixelSNAILConfig": "vq_core.pixelsnail",
    "QuantizerOutput": "vq_core.quantizer",
    "VectorQuantizer": "vq_core.quantizer",
    "draw_categorical": "vq_core.sampling",
    "filter_logits": "vq_core.sampling",
    "sample_codes": "vq_core.sampling",
    "sample_levels": "vq_core.sampling",
    "TransformerPrior": "vq_core.transformer",
    "TransformerPriorConfig": "vq_core.transformer",
    "VQVAE": "vq_core.vqvae",
    "VQVAE2": "vq_core.vqvae",
    "AutoencoderOutput": "vq_core.vqvae",
    "VQVAE2Config": "vq_core.vqvae",
    "VQVAEConfig": "vq_core.vqvae",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vq_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
