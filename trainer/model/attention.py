"""Causal self-attention with a Megatron-layout fused QKV projection.

Layout of `linear_qkv.weight` (Megatron's, per query group g = 0..G-1):

    [ q heads of g (heads_per_group * head_dim rows) | k of g (head_dim) | v of g (head_dim) ]

so a plain dim-0 shard over tensor-parallel ranks gives each rank whole groups. The forward therefore
reads the number of (local) groups from the tensor shape, never from the config's head counts.

What a token may attend to is described by a :class:`TokenLayout` and decided in one place,
:func:`allowed_mask`; the softmax(QK^T)V part is the swappable ``core_attention`` module (Megatron's
name), which context parallelism replaces with a version that gathers K/V across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import ModelConfig
from trainer.model.layers import RMSNorm, apply_rotary


@dataclass
class TokenLayout:
    """Where the tokens of a batch sit in their rows; built once per forward, shared by every layer.

    seq_index: [B, S] index of each token in its full row. None means 0..S-1 (the row is whole and in
        order); context parallelism passes the indices of the chunks a rank holds.
    document_ids: [B, S] id of the packed document each token belongs to; None means one per row.
    sliding_window: Mistral's window (query i sees keys j with i - window < j <= i); None/0 = unlimited.
    """

    seq_index: Optional[torch.Tensor] = None
    document_ids: Optional[torch.Tensor] = None
    sliding_window: Optional[int] = None

    def is_plain_causal(self, seq_len: int) -> bool:
        window_bites = bool(self.sliding_window) and seq_len > self.sliding_window
        return self.seq_index is None and self.document_ids is None and not window_bites


def allowed_mask(q_index: torch.Tensor, k_index: torch.Tensor, sliding_window: Optional[int] = None,
                 q_doc: Optional[torch.Tensor] = None, k_doc: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean [B, 1, Sq, Sk] (True = may attend): causal by row index, within the window, same document.

    Indices are positions in the full row, not position_ids (which restart per packed document).
    """
    q, k = q_index[:, :, None], k_index[:, None, :]
    mask = k <= q
    if sliding_window:
        mask = mask & (k > q - sliding_window)
    if q_doc is not None:
        mask = mask & (q_doc[:, :, None] == k_doc[:, None, :])
    return mask[:, None]


def row_index(batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
    return torch.arange(seq_len, device=device).expand(batch, seq_len)


class DotProductAttention(nn.Module):
    """softmax(QK^T / sqrt(d)) V over local tensors; q [B, H, S, d], k and v [B, G, S, d]."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        B, _, S, _ = q.shape
        # enable_gqa repeats each k/v head over its query heads, the same pairing as HF's repeat_kv.
        gqa = q.shape[1] != k.shape[1]
        if layout.is_plain_causal(S):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        index = layout.seq_index if layout.seq_index is not None else row_index(B, S, q.device)
        mask = allowed_mask(index, index, layout.sliding_window, layout.document_ids, layout.document_ids)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


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
        self.core_attention = DotProductAttention()
        self.linear_proj = nn.Linear(cfg.num_attention_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], layout: TokenLayout) -> torch.Tensor:
        """x [B, S, hidden] (sequence-sharded under SP); rope = (cos, sin) [B, S, head_dim]."""
        hpg, hd = self.heads_per_group, self.head_dim
        qkv = self.linear_qkv(x)  # full sequence here even when x is sequence-parallel
        B, S = qkv.shape[:2]
        q, k, v = qkv.view(B, S, -1, (hpg + 2) * hd).split([hpg * hd, hd, hd], dim=-1)
        q = q.reshape(B, S, -1, hd)  # query head h belongs to group h // hpg
        if self.q_layernorm is not None:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, S, hd]
        out = self.core_attention(q, k, v, layout)
        return self.linear_proj(out.transpose(1, 2).reshape(B, S, -1))
