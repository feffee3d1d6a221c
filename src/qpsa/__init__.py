"""q-psa: sensitivity analysis of quantized GGUF language models in PyTorch."""

__version__ = "0.1.0"
