"""Building blocks shared by every decoder family: RMSNorm, rotary embeddings, the SwiGLU MLP.

The math follows transformers' Llama implementation operation by operation (same dtype casts, same
order of multiplications), so HF checkpoints reproduce their logits to float rounding.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import RopeScalingConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich, 2019), statistics always in fp32 as HF and Megatron do."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        # HF casts back before the weight multiply; doing the same keeps bf16 results identical too.
        return self.weight * x.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


# ------------------------------------------------------------------------------------------ rotary


def rope_inv_freq(head_dim: int, base: float, scaling: Optional[RopeScalingConfig] = None) -> torch.Tensor:
    """Inverse frequencies theta_i = base^(-2i/d) (Su et al., RoFormer), optionally Llama-3.1 scaled."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is not None:
        inv_freq = _llama3_scale(inv_freq, scaling)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, s: RopeScalingConfig) -> torch.Tensor:
    """Llama 3.1's frequency bands, exactly as transformers' `_compute_llama3_parameters`.

    Wavelengths shorter than original_len/high_freq_factor are kept, those longer than
    original_len/low_freq_factor are divided by `factor`, and the band between is interpolated smoothly.
    """
    old_len = s.original_max_position_embeddings
    low_freq_wavelen = old_len / s.low_freq_factor
    high_freq_wavelen = old_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Computes (cos, sin) once per forward; every layer then rotates its q and k with them."""

    def __init__(self, head_dim: int, base: float, scaling: Optional[RopeScalingConfig] = None):
        super().__init__()
        self.head_dim, self.base, self.scaling = head_dim, base, scaling
        # Not persistent: derived from the config, so it never appears in checkpoints.
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, base, scaling), persistent=False)

    def reset_parameters(self) -> None:
        # Buffers created on the meta device come back empty after to_empty(); recompute them here.
        with torch.no_grad():
            self.inv_freq.copy_(rope_inv_freq(self.head_dim, self.base, self.scaling))

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, S] -> cos, sin [B, S, head_dim], computed in fp32 then cast like HF."""
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The non-interleaved rotation (HF and Megatron's default), so HF q/k weights need no permutation."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, heads, head_dim]; cos/sin [B, S, head_dim] broadcast over heads."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + rotate_half(x) * sin


# --------------------------------------------------------------------------------------------- MLP


class SwiGLUMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer, 2020).

    Gate and up stay separate parameters: a fused [gate; up] matrix split on dim 0 across tensor-parallel
    ranks would hand one rank all of gate and the other all of up. Only the Megatron converter fuses them.
    """

    def __init__(self, hidden_size: int, ffn_hidden_size: int):
        super().__init__()
        self.linear_fc1_gate = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.linear_fc1_up = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        # A plain Linear works on whatever input width it gets (row-parallel shards included).
        self.linear_fc2 = nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.silu(self.linear_fc1_gate(x)) * self.linear_fc1_up(x))
