"""The model families meshtron trains, as data: what each one's HF config says and how (read by
checkpoint_convert/hf.py, which never tests family names), and the HF names. The conversion table of each
lives beside it in checkpoint_convert/models/registry.py. Imports nothing, so the config schema can list the
families without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# How an HF config switches sliding-window attention on (WINDOW_*), None: it has no such keys.
WINDOW_SLIDING_WINDOW = "sliding_window"  # Mistral, Mixtral: sliding_window (null: off)
WINDOW_MAX_WINDOW_LAYERS = "max_window_layers"  # Qwen2/3: use_sliding_window, windowed layers >= max_window_layers
WINDOW_USE_SLIDING_WINDOW = "use_sliding_window"  # Qwen3-MoE: use_sliding_window, one window for every layer
WINDOW_LAYER_TYPES = "layer_types"  # Qwen2-MoE: read from layer_types only, never written


@dataclass(frozen=True)
class FamilyFacts:
    name: str  # ModelConfig.family
    hf_model_type: str
    hf_architecture: str
    qkv_bias: bool = False  # q/k/v projections carry biases (Qwen2 hard-codes them; HF's attention_bias would also
    #                         put one on o_proj, which is refused)
    qkv_bias_key: bool = False  # ... switched by a config key of its own, qkv_bias (Qwen2-MoE)
    qk_norm: bool = False  # RMSNorm on q and k per head (Qwen3)
    window: Optional[str] = None  # WINDOW_*


FAMILY_FACTS = {
    f.name: f
    for f in (
        FamilyFacts("llama", "llama", "LlamaForCausalLM"),
        FamilyFacts("mistral", "mistral", "MistralForCausalLM", window=WINDOW_SLIDING_WINDOW),
        FamilyFacts("qwen2", "qwen2", "Qwen2ForCausalLM", qkv_bias=True, window=WINDOW_MAX_WINDOW_LAYERS),
        FamilyFacts("qwen3", "qwen3", "Qwen3ForCausalLM", qk_norm=True, window=WINDOW_MAX_WINDOW_LAYERS),
        FamilyFacts("qwen3_moe", "qwen3_moe", "Qwen3MoeForCausalLM", qk_norm=True, window=WINDOW_USE_SLIDING_WINDOW),
        FamilyFacts("mixtral", "mixtral", "MixtralForCausalLM", window=WINDOW_SLIDING_WINDOW),
        FamilyFacts("qwen2_moe", "qwen2_moe", "Qwen2MoeForCausalLM", qkv_bias=True, qkv_bias_key=True,
                    window=WINDOW_LAYER_TYPES),
    )
}
MODEL_FAMILIES = tuple(FAMILY_FACTS)
