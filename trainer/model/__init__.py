"""The single-device decoder. Parallelism is applied from outside (see parallel/)."""

from trainer.model.gpt import GPTModel, TransformerLayer

__all__ = ["GPTModel", "TransformerLayer"]
