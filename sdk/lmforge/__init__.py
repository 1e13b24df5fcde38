"""lmforge: train GPT-style language models on your own text and serve them over gRPC."""

__version__ = "0.1.0"
