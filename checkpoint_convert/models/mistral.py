"""Mistral <-> meshtron. Same tensors as Llama; sliding-window attention lives in the config only."""

from checkpoint_convert.models.llama import LLAMA

MISTRAL = LLAMA.with_rules()
