"""vq_core: discrete-latent image models in plain PyTorch.

Autoencoders that turn images into integer code maps and back (VQ-VAE-2, VQ-VAE, DALL-E's dVAE),
the vector quantizer they share, autoregressive priors over code maps (PixelSNAIL, Gated
PixelCNN, a decoder-only transformer) with cached sampling, and one checkpoint format for all of
them. No Ray, MLflow or webdataset in here: the library can be used, read and tested on its own.
"""

from vq_core.checkpoint import load_checkpoint, model_from_config, save_checkpoint
from vq_core.dvae import DiscreteVAE, DiscreteVAEConfig
from vq_core.pixelcnn import GatedPixelCNN, GatedPixelCNNConfig, bits_per_code
from vq_core.pixelsnail import PixelSNAIL, PixelSNAILConfig
from vq_core.quantizer import QuantizerOutput, VectorQuantizer
from vq_core.sampling import draw_categorical, filter_logits, sample_codes, sample_levels
from vq_core.transformer import TransformerPrior, TransformerPriorConfig
from vq_core.vqvae import VQVAE, VQVAE2, AutoencoderOutput, VQVAE2Config, VQVAEConfig

__all__ = [
    "VQVAE",
    "VQVAE2",
    "AutoencoderOutput",
    "DiscreteVAE",
    "DiscreteVAEConfig",
    "GatedPixelCNN",
    "GatedPixelCNNConfig",
    "PixelSNAIL",
    "PixelSNAILConfig",
    "QuantizerOutput",
    "TransformerPrior",
    "TransformerPriorConfig",
    "VQVAE2Config",
    "VQVAEConfig",
    "VectorQuantizer",
    "bits_per_code",
    "draw_categorical",
    "filter_logits",
    "load_checkpoint",
    "model_from_config",
    "sample_codes",
    "sample_levels",
    "save_checkpoint",
]
