"""LoRA settings of a model (``model.lora.*``), named as PEFT names them; targets by megatron-core's module names.
Kept apart from trainer/config.py like moe_config.py; the adapters themselves are trainer/lora.py."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from trainer.errors import one_of, require

# megatron-core's names of a dense layer's linear modules; linear_fc1 is our gate and up (two nn.Linear). In an
# MoE layer linear_fc1/linear_fc2 are the shared experts' (where the family has them, as PEFT's gate_proj/up_proj/
# down_proj match them), `experts` the routed experts' stacked weights, `router` the router's.
LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
ALL_LINEAR = "all-linear"
MOE_TARGETS = ("experts", "router")


@dataclass
class LoraConfig:
    """Low-rank adapters on the decoder's linear layers, the base model frozen.

    ``rank=0`` (the default) trains every parameter, as without this group."""

    rank: int = 0
    alpha: float = 16.0
    # On the adapters' input, as PEFT's lora_dropout.
    dropout: float = 0.0
    # Any of linear_qkv, linear_proj, linear_fc1, linear_fc2, and for MoE models experts and router, or all-linear
    # for all of them (experts and router only where the model has them).
    target_modules: list[str] = field(default_factory=lambda: [ALL_LINEAR])
    # Scale alpha / sqrt(rank) instead of alpha / rank (rank-stabilised LoRA).
    use_rslora: bool = False
    # default: PEFT's (A Kaiming-uniform, B zero); gaussian: A ~ N(0, 1/rank), B zero.
    init: str = "default"
    # A PEFT adapter directory (adapter_config.json + adapter_model.safetensors) to continue training.
    init_from: Optional[str] = None
    # The frozen base's storage: fp32, or bf16 (half the memory; it has no fp32 master copy to keep, since it
    # never changes, nor gradients or optimizer state). bf16 needs trainer.precision=bf16.
    base_dtype: str = "fp32"
    # QLoRA: nf4 stores the decoder's frozen linear weights as torchao's 4-bit NF4 tensors (blocks of 64 values,
    # dequantized to bf16 for each matmul); needs base_dtype=bf16 and the `qlora` extra (torchao). Under FSDP/HSDP
    # each weight is quantized whole and each rank keeps its rows of it (trainer/qlora.py quantize_base).
    base_quant: Optional[str] = None

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def targets(self) -> tuple[str, ...]:
        """What the adapters go on; experts and router do nothing in a dense model (trainer/lora.py)."""
        every = LORA_TARGETS + MOE_TARGETS
        return every if ALL_LINEAR in self.target_modules else tuple(t for t in every if t in self.target_modules)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def validate(self) -> None:
        require(self.rank >= 0, f"model.lora.rank={self.rank} must be >= 0 (0: no adapters)")
        if not self.enabled:
            return
        require(self.alpha > 0, f"model.lora.alpha={self.alpha} must be positive")
        require(0.0 <= self.dropout < 1.0, f"model.lora.dropout={self.dropout} must be in [0, 1)")
        one_of("model.lora.init", self.init, ("default", "gaussian"))
        one_of("model.lora.base_dtype", self.base_dtype, ("fp32", "bf16"))
        one_of("model.lora.base_quant", self.base_quant, (None, "nf4"))
        require(bool(self.target_modules), "model.lora.target_modules is empty; name at least one of "
                                           f"{list(LORA_TARGETS + MOE_TARGETS)} or {ALL_LINEAR}")
        for t in self.target_modules:
            require(t in LORA_TARGETS + MOE_TARGETS or t == ALL_LINEAR,
                    f"model.lora.target_modules has {t!r}; expected any of {list(LORA_TARGETS + MOE_TARGETS)} or "
                    f"{ALL_LINEAR!r} (megatron-core's module names; linear_fc1 is the gate and up projections)")
