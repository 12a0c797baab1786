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
from trainer.errors import ConfigError
from trainer.families import FAMILY_FACTS, FamilyFacts


@dataclass(frozen=True)
class Family(FamilyFacts):
    """A family's facts (trainer/families.py) and the table converting its weights."""

    table: Optional[MappingTable] = None


TABLES = {"llama": LLAMA, "mistral": MISTRAL, "qwen2": QWEN2, "qwen3": QWEN3, "qwen3_moe": QWEN3_MOE,
          "mixtral": MIXTRAL, "qwen2_moe": QWEN2_MOE}
FAMILIES = {name: Family(**vars(facts), table=TABLES[name]) for name, facts in FAMILY_FACTS.items()}


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
