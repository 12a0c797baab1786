"""A single-device decoder-only transformer (Llama 2/3/3.1, Mistral, Qwen2/2.5, Qwen3).

Parameter names follow megatron-core's GPTModel with its local layer spec, so checkpoints and converters
never depend on how the model is later parallelised:

    embedding.word_embeddings.weight
    decoder.layers.N.{input_layernorm, self_attention.{linear_qkv, q_layernorm, k_layernorm, linear_proj},
                      pre_mlp_layernorm, mlp.{linear_fc1_gate, linear_fc1_up, linear_fc2}}
    decoder.final_layernorm.weight
    output_layer.weight            (absent with tied embeddings)

No process groups live here: tensor, pipeline and data parallelism are applied from outside.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from trainer.config import ModelConfig
from trainer.model.attention import SelfAttention, build_attention_mask
from trainer.model.layers import RMSNorm, RotaryEmbedding, SwiGLUMLP


class TransformerLayer(nn.Module):
    """Pre-norm block: h + attn(norm(h)), then + mlp(norm(.)). The unit of checkpointing and PP splits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_epsilon)
        self.self_attention = SelfAttention(cfg)
        self.pre_mlp_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_epsilon)
        self.mlp = SwiGLUMLP(cfg.hidden_size, cfg.ffn_hidden_size)

    def forward(
        self,
        hidden: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attn_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        hidden = hidden + self.self_attention(self.input_layernorm(hidden), rope, attn_mask)
        return hidden + self.mlp(self.pre_mlp_layernorm(hidden))


class TransformerBlock(nn.Module):
    """Megatron's `decoder`: the layer stack and the final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.num_layers))
        self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_epsilon)


class LanguageModelEmbedding(nn.Module):
    """Megatron's `embedding` wrapper (word embeddings only: rotary models have no position table)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)


class GPTModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.embedding = LanguageModelEmbedding(cfg)
        self.rotary_pos_emb = RotaryEmbedding(cfg.head_dim, cfg.rotary_base, cfg.rope_scaling)
        self.decoder = TransformerBlock(cfg)
        # Tied: the logits reuse embedding.word_embeddings.weight and no output_layer exists at all.
        self.output_layer = (
            None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Megatron's init: N(0, init_std) for matrices, std / sqrt(2 * num_layers) for the two
        projections that write into the residual stream (GPT-2 paper, sec. 2.3), ones for norms,
        zeros for biases. Deterministic given torch's global seed (modules visited in definition order).
        Kept apart from __init__ so a model built on the meta device can be materialised and then
        initialised in place.
        """
        std = self.config.init_std
        residual_std = std / math.sqrt(2.0 * self.config.num_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                last = name.rsplit(".", 1)[-1]
                nn.init.normal_(module.weight, 0.0, residual_std if last in ("linear_proj", "linear_fc2") else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, (RMSNorm, RotaryEmbedding)):
                module.reset_parameters()

    def output_weight(self) -> torch.Tensor:
        return self.embedding.word_embeddings.weight if self.output_layer is None else self.output_layer.weight

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids [B, S] -> logits [B, S, vocab]. position_ids default to 0..S-1 in every row."""
        B, S = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(S, device=input_ids.device).expand(B, S)
        hidden = self.embedding(input_ids)
        rope = self.rotary_pos_emb(position_ids, hidden.dtype)  # once per forward, shared by all layers
        attn_mask = build_attention_mask(S, self.config.sliding_window, input_ids.device)
        for layer in self.decoder.layers:
            hidden = layer(hidden, rope, attn_mask)
        hidden = self.decoder.final_layernorm(hidden)
        return nn.functional.linear(hidden, self.output_weight())
