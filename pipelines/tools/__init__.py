"""One-off tools beside the stages: ``vqpipe decode`` and ``vqpipe reconstruct``."""
