"""Shape rules shared by the parallel layouts and the Megatron converter: how Megatron pads the vocabulary,
and which tensor-parallel degrees split a model evenly. Pure functions of the model's shape (no process
groups), so the converters use them without importing parallel/."""

from __future__ import annotations

from trainer.config import ModelConfig
from trainer.errors import ConfigError


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's rule: round the vocabulary up to a multiple of divisible_by x tp."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def check_tp_divisibility(model_cfg: ModelConfig, tp: int, tp_name: str = "parallel.tp",
                          field_prefix: str = "model.") -> None:
    """Refuse a tp degree that cannot split the heads, query groups or MLP width evenly.

    The fused QKV is sharded by whole query groups (each rank must own whole groups with all their query
    heads), and colwise/rowwise shards of fc1/fc2 must be equal for the rowwise matmul to line up. The same
    holds for a Megatron-LM checkpoint's shards (the converter names its values `tp=` and the bare fields).
    """
    for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
        value = getattr(model_cfg, name)
        if value % tp:
            raise ConfigError(
                f"{field_prefix}{name}={value} is not divisible by {tp_name}={tp}; tensor parallelism gives "
                f"every rank an equal share of it"
            )


# The linear modules of a dense decoder layer, under decoder.layers.N (what fp8 converts and QLoRA quantizes).
DECODER_LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1_gate",
                   "mlp.linear_fc1_up", "mlp.linear_fc2")


def linear_shapes(model_cfg: ModelConfig, tp: int = 1) -> dict[str, tuple[int, int]]:
    """(out, in) of each of a dense layer's linear weights (DECODER_LINEARS) as one tensor-parallel rank holds
    them: column-parallel ones split their rows, row-parallel ones their columns."""
    m = model_cfg
    heads, groups, hd = m.num_attention_heads, m.num_query_groups, m.head_dim
    return {
        "self_attention.linear_qkv": ((heads + 2 * groups) * hd // tp, m.hidden_size),
        "self_attention.linear_proj": (m.hidden_size, heads * hd // tp),
        "mlp.linear_fc1_gate": (m.ffn_hidden_size // tp, m.hidden_size),
        "mlp.linear_fc1_up": (m.ffn_hidden_size // tp, m.hidden_size),
        "mlp.linear_fc2": (m.hidden_size, m.ffn_hidden_size // tp),
    }
