"""Which table converts which model: by meshtron family, HF `model_type`, or HF `architectures`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from checkpoint_convert.mapping import MappingTable
from checkpoint_convert.models.llama import LLAMA
from checkpoint_convert.models.mistral import MISTRAL
from checkpoint_convert.models.mixtral import MIXTRAL
from checkpoint_convert.models.qwen2 import QWEN2
from checkpoint_convert.models.qwen2_moe import QWEN2_MOE
from checkpoint_convert.models.qwen3 import QWEN3
from checkpoint_convert.models.qwen3_moe import QWEN3_MOE
from trainer.config import ConfigError


@dataclass(frozen=True)
class Family:
    name: str  # ModelConfig.family
    hf_model_type: str
    hf_architecture: str
    table: MappingTable
    # The dense family whose attention (biases, q/k norms, sliding-window keys) this one has.
    attention: str = ""

    def __post_init__(self):
        if not self.attention:
            object.__setattr__(self, "attention", self.name)


FAMILIES = {
    f.name: f
    for f in (
        Family("llama", "llama", "LlamaForCausalLM", LLAMA),
        Family("mistral", "mistral", "MistralForCausalLM", MISTRAL),
        Family("qwen2", "qwen2", "Qwen2ForCausalLM", QWEN2),
        Family("qwen3", "qwen3", "Qwen3ForCausalLM", QWEN3),
        Family("qwen3_moe", "qwen3_moe", "Qwen3MoeForCausalLM", QWEN3_MOE, attention="qwen3"),
        Family("mixtral", "mixtral", "MixtralForCausalLM", MIXTRAL, attention="mistral"),
        Family("qwen2_moe", "qwen2_moe", "Qwen2MoeForCausalLM", QWEN2_MOE, attention="qwen2"),
    )
}


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise ConfigError(f"model family {name!r} has no conversion table; supported: {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_for_hf(model_type: Optional[str], architectures: Optional[list[str]] = None) -> Family:
    """The family of an HF config.json: by model_type, else by its architectures list."""
    for f in FAMILIES.values():
        if model_type == f.hf_model_type or (model_type is None and f.hf_architecture in (architectures or ())):
            return f
    supported = sorted(f.hf_model_type for f in FAMILIES.values())
    what = f"model_type={model_type!r}" if model_type is not None else f"architectures={architectures!r}"
    raise ConfigError(f"HF {what} is not supported; supported model_type values: {supported}")


def table_for(family_name: str) -> MappingTable:
    return family(family_name).table
