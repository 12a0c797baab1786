"""Causal self-attention with a Megatron-layout fused QKV projection.

Layout of `linear_qkv.weight` (Megatron's, per query group g = 0..G-1):

    [ q heads of g (heads_per_group * head_dim rows) | k of g (head_dim) | v of g (head_dim) ]

so a plain dim-0 shard over tensor-parallel ranks gives each rank whole groups. The forward therefore
reads the number of (local) groups from the tensor shape, never from the config's head counts.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import ModelConfig
from trainer.model.layers import RMSNorm, apply_rotary


def build_attention_mask(
    seq_len: int, sliding_window: Optional[int], device: torch.device
) -> Optional[torch.Tensor]:
    """Boolean [S, S] mask (True = may attend), or None when SDPA's built-in causal mask is enough.

    Sliding window follows transformers' Mistral: query i sees keys j with i - window < j <= i, i.e.
    `window` tokens including itself. Positions are token indices in the row, not position_ids.
    Packed documents (a later extension) would AND a same-document mask [B, 1, S, S] in here.
    """
    if not sliding_window or seq_len <= sliding_window:
        return None
    q = torch.arange(seq_len, device=device)[:, None]
    k = torch.arange(seq_len, device=device)[None, :]
    return (k <= q) & (k > q - sliding_window)


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        # Heads per group is a ratio that tensor parallelism preserves; the group count is not stored.
        self.heads_per_group = cfg.num_attention_heads // cfg.num_query_groups
        qkv_rows = (self.heads_per_group + 2) * cfg.num_query_groups * self.head_dim
        self.linear_qkv = nn.Linear(cfg.hidden_size, qkv_rows, bias=cfg.add_qkv_bias)
        # Qwen3 normalises each head's q and k before rotary (no mean-centering, per-head_dim weight).
        self.q_layernorm = RMSNorm(self.head_dim, cfg.norm_epsilon) if cfg.qk_layernorm else None
        self.k_layernorm = RMSNorm(self.head_dim, cfg.norm_epsilon) if cfg.qk_layernorm else None
        self.linear_proj = nn.Linear(cfg.num_attention_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attn_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """x [B, S, hidden]; rope = (cos, sin) [B, S, head_dim]; attn_mask boolean, broadcast to [B, H, S, S]."""
        B, S, _ = x.shape
        hpg, hd = self.heads_per_group, self.head_dim
        qkv = self.linear_qkv(x).view(B, S, -1, (hpg + 2) * hd)  # [B, S, groups, group rows]
        q, k, v = qkv.split([hpg * hd, hd, hd], dim=-1)
        q = q.reshape(B, S, -1, hd)  # query head h belongs to group h // hpg
        if self.q_layernorm is not None:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, S, hd]
        # enable_gqa repeats each k/v head over its hpg query heads, the same pairing as HF's repeat_kv.
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None, enable_gqa=hpg > 1
        )
        return self.linear_proj(out.transpose(1, 2).reshape(B, S, -1))
