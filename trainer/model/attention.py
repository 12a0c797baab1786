"""Causal self-attention with a Megatron-layout fused QKV projection.

Layout of `linear_qkv.weight` (Megatron's, per query group g = 0..G-1):

    [ q heads of g (heads_per_group * head_dim rows) | k of g (head_dim) | v of g (head_dim) ]

so a plain dim-0 shard over tensor-parallel ranks gives each rank whole groups. The forward therefore
reads the number of (local) groups from the tensor shape, never from the config's head counts.

What a token may attend to is described by a :class:`TokenLayout` and decided in one place: the rule of
:func:`allowed_mask` (causal by row index, within Mistral's window, same document). The kernels only
express that rule differently (``model.attention_backend``, chosen per micro-batch by
:func:`choose_kernel`):

* sdpa: ``is_causal=True`` (flash-eligible) when every row is one document and no window bites, else the
  dense boolean mask, which is the CPU reference;
* flex: ``flex_attention`` with one ``BlockMask`` per forward, built from the same rule;
* varlen: flash's ``varlen_attn`` over the rows flattened to tokens, one sequence per document run
  (``doc_lens``, made on the host by trainer/data/attention_meta.py).

The softmax(QK^T)V part is the swappable ``core_attention`` module (Megatron's name), which context
parallelism replaces with a version that gathers K/V across ranks (parallel/context_parallel.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import ModelConfig
from trainer.errors import ConfigError
from trainer.model.layers import RMSNorm, apply_rotary
from trainer.torch_compat import varlen_kwargs, varlen_missing


@dataclass
class TokenLayout:
    """Where the tokens of a batch sit in their rows; built once per forward, shared by every layer.

    seq_index: [B, S] index of each token in its full row. None means 0..S-1 (the row is whole and in
        order); context parallelism passes the indices of the chunks a rank holds.
    document_ids: [B, S] id of the packed document each token belongs to; None means one per row.
    sliding_window: Mistral's window (query i sees keys j with i - window < j <= i); None/0 = unlimited.
    doc_lens: [B, K] int32 lengths of each row's consecutive document runs, zero-padded (host-made, see
        trainer/data/attention_meta.py); what varlen needs, so it never reads document ids on the device.
    backend: model.attention_backend (auto | sdpa | flex | varlen).
    cache: what the first layer derives from the above (masks, gathered key metadata, cu_seqlens) so the
        other layers, and activation-checkpoint recomputation, reuse it. Lives as long as the forward.
    """

    seq_index: Optional[torch.Tensor] = None
    document_ids: Optional[torch.Tensor] = None
    sliding_window: Optional[int] = None
    doc_lens: Optional[torch.Tensor] = None
    backend: str = "auto"
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    def window_bites(self, seq_len: int) -> bool:
        return bool(self.sliding_window) and seq_len > self.sliding_window

    def is_plain_causal(self, seq_len: int) -> bool:
        return self.seq_index is None and self.document_ids is None and not self.window_bites(seq_len)

    def cached(self, key: str, build: Callable[[], Any]) -> Any:
        if key in self.cache:
            return self.cache[key]
        value = build()
        # A compiled block must not mutate its inputs (fullgraph tracing, and selective checkpointing's
        # "unsafe side effect" check, refuse it): GPTModel.forward fills the cache eagerly before the
        # layers (SelfAttention.prepare), so inside a compiled layer this only reads.
        if not torch.compiler.is_compiling():
            self.cache[key] = value
        return value


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


# ------------------------------------------------------------------------------------ kernel choice


def check_attention_backend(model_cfg: ModelConfig, device_type: str, context_parallel: bool = False) -> None:
    """Refuse a backend that cannot train here, before any process group or tensor exists."""
    backend = model_cfg.attention_backend
    if backend == "flex" and device_type != "cuda":
        raise ConfigError(
            f"model.attention_backend=flex needs CUDA, but the device is {device_type}: flex_attention has no "
            f"backward on CPU in torch {torch.__version__}; use model.attention_backend=sdpa (or auto)")
    if backend != "varlen":
        return
    if device_type != "cuda":
        raise ConfigError(
            f"model.attention_backend=varlen needs CUDA, but the device is {device_type}: varlen_attn is a "
            f"CUDA-only flash kernel; use model.attention_backend=sdpa (or auto)")
    if context_parallel:
        raise ConfigError(
            "model.attention_backend=varlen cannot run under context parallelism (cp > 1): each rank's "
            "zigzag query chunks attend to all-gathered keys, which are not contiguous per-document "
            "sequences; use model.attention_backend=flex (or auto, which picks flex under cp)")
    missing = varlen_missing()
    if missing:
        raise ConfigError(f"model.attention_backend=varlen is not usable: {missing}; use "
                          f"model.attention_backend=flex (or auto, which falls back to flex)")


def _half_precision(q: torch.Tensor) -> bool:
    # Flash kernels run in fp16/bf16 only; under autocast the inputs are cast (see _kernel_inputs).
    return q.dtype in (torch.float16, torch.bfloat16) or torch.is_autocast_enabled(q.device.type)


def choose_kernel(layout: TokenLayout, q: torch.Tensor, k: torch.Tensor, context_parallel: bool = False) -> str:
    """'sdpa', 'flex' or 'varlen' for this micro-batch, from host metadata and q's device and dtype only
    (never from device values, so choosing costs no device->host sync)."""
    backend, cuda, seq_len = layout.backend, q.device.type == "cuda", q.shape[2]
    if backend != "auto":
        return backend
    if not cuda:
        return "sdpa"
    if not context_parallel and layout.is_plain_causal(seq_len):
        return "sdpa"  # one document per row: flash via is_causal
    usable = (not context_parallel and _half_precision(q)
              and (layout.doc_lens is not None or layout.document_ids is None)
              and varlen_missing() is None)
    return "varlen" if usable else "flex"


# ------------------------------------------------------------------------------------------ kernels


def _kernel_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v in one dtype: autocast's when it is on. sdpa is on autocast's list, flex_attention and
    varlen_attn are not, and rotary embeddings in fp32 leave q and k fp32 next to a bf16 v."""
    device = q.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else q.dtype
    return tuple(t.to(dtype) for t in (q, k, v))


def flex_mask_mod(q_pos: Optional[torch.Tensor], k_pos: Optional[torch.Tensor], window: Optional[int],
                  q_doc: Optional[torch.Tensor], k_doc: Optional[torch.Tensor]):
    """allowed_mask's rule as a flex ``mask_mod``; positions None mean the plain 0..S-1 row index."""

    def mask_mod(b, h, q_idx, kv_idx):
        qi = q_idx if q_pos is None else q_pos[b, q_idx]
        ki = kv_idx if k_pos is None else k_pos[b, kv_idx]
        ok = ki <= qi
        if window:
            ok = ok & (ki > qi - window)
        if q_doc is not None:
            ok = ok & (q_doc[b, q_idx] == k_doc[b, kv_idx])
        return ok

    return mask_mod


def flex_block_mask(batch: int, q_len: int, kv_len: int, device: torch.device, q_pos=None, k_pos=None,
                    window: Optional[int] = None, q_doc=None, k_doc=None):
    """One BlockMask for a micro-batch (broadcast over heads; over rows too when nothing is per row)."""
    from torch.nn.attention.flex_attention import create_block_mask

    per_row = any(t is not None for t in (q_pos, k_pos, q_doc))
    # On CUDA the compiled builder never materialises the [B, S, S] mask; on CPU (tests) eager is enough.
    build = _compiled_block_mask_builder() if device.type == "cuda" else create_block_mask
    return build(flex_mask_mod(q_pos, k_pos, window, q_doc, k_doc), batch if per_row else None, None, q_len,
                 kv_len, device=device)


@functools.lru_cache(maxsize=None)
def _compiled_block_mask_builder():
    from torch.nn.attention.flex_attention import create_block_mask

    # One compiled builder per process, torch's recommended form in 2.11-2.14. `_compile=True` is deprecated
    # there and wraps create_block_mask in a new torch.compile on every call, i.e. compiles on every call.
    # Each micro-batch's mask_mod is a new closure of the same code: dynamo guards on the code and the
    # captured tensors' shapes, so fixed-shape micro-batches reuse one compiled builder.
    return torch.compile(create_block_mask)


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # Eager flex_attention is an unfused reference that materialises the scores; the fused kernel is
    # what torch.compile generates (torch docs, FlexAttention).
    return torch.compile(flex_attention, dynamic=False)


def flex_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    q, k, v = _kernel_inputs(q, k, v)
    # Inside a compiled model, flex_attention is traced into the graph; outside, use its compiled wrapper.
    fn = _compiled_flex() if q.is_cuda and not torch.compiler.is_compiling() else flex_attention
    return fn(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


def cu_seqlens(doc_lens: Optional[torch.Tensor], batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """int32 [N + 1] offsets of the sequences in the flattened micro-batch, computed on the device.

    Each row's runs of doc_lens (zero-padded to K: empty sequences, which flash skips) are one sequence
    each; without doc_lens every row is one sequence.
    """
    if doc_lens is None:
        return torch.arange(0, (batch + 1) * seq_len, seq_len, dtype=torch.int32, device=device)
    ends = doc_lens.to(device, non_blocking=True).flatten().cumsum(0, dtype=torch.int32)
    return F.pad(ends, (1, 0))


def varlen_window(sliding_window: Optional[int], seq_len: int) -> tuple[int, int]:
    """Flash's (left, right): query i sees keys i - left .. i + right. Our rule i - W < j <= i is
    left = W - 1, right = 0; (-1, 0) is plain causal (torch's varlen_attn docstring)."""
    return (sliding_window - 1, 0) if sliding_window and seq_len > sliding_window else (-1, 0)


def varlen_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """q [B, H, S, d], k/v [B, G, S, d] -> [B, H, S, d] through flash's varlen_attn (CUDA only)."""
    q, k, v = _kernel_inputs(q, k, v)
    kernel, cu, kwargs = layout.cached("varlen", lambda: varlen_setup(layout, q, k))
    return varlen_tokens(kernel, q, k, v, cu, **kwargs)


def varlen_setup(layout: TokenLayout, q: torch.Tensor, k: torch.Tensor) -> tuple[Callable, torch.Tensor, dict]:
    """Checks, cu_seqlens and the keyword arguments this torch's varlen_attn takes; once per forward."""
    from torch.nn.attention.varlen import varlen_attn

    B, _, S, _ = q.shape
    gqa, window = q.shape[1] != k.shape[1], varlen_window(layout.sliding_window, S)
    if layout.document_ids is not None and layout.doc_lens is None:
        raise ValueError("model.attention_backend=varlen needs doc_lens for packed rows (made on the host by "
                         "trainer.data.attention_meta.attention_metadata); got document_ids only")
    if not q.is_cuda:
        raise ValueError("model.attention_backend=varlen: varlen_attn is a CUDA-only flash kernel, got "
                         f"tensors on {q.device.type}")
    missing = varlen_missing()
    if missing:
        raise ValueError(f"model.attention_backend=varlen: {missing}")
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"model.attention_backend=varlen runs flash in bf16/fp16, got {q.dtype} without "
                         f"autocast; use trainer.precision=bf16")
    # Grouped key/value heads go to flash as they are, on every torch (trainer/torch_compat.py says why).
    return varlen_attn, cu_seqlens(layout.doc_lens, B, S, q.device), varlen_kwargs(window, gqa)


def varlen_tokens(attn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
                  **kwargs) -> torch.Tensor:
    """Runs a varlen kernel ([T, heads, d] tokens, cu_seqlens) on [B, heads, S, d] tensors and back."""
    B, H, S, d = q.shape
    tokens = (t.transpose(1, 2).reshape(B * S, t.shape[1], d) for t in (q, k, v))
    # max_q = max_k = S: a valid upper bound known on the host (the true maximum would need a sync).
    out = attn(*tokens, cu, cu, S, S, **kwargs)
    return out.view(B, S, H, d).transpose(1, 2)


def sdpa_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                 expand_groups: Optional[bool] = None) -> torch.Tensor:
    """SDPA, causal (``mask`` None) or with the dense boolean mask.

    enable_gqa repeats each k/v head over its query heads, the same pairing as HF's repeat_kv. On CUDA a dense
    mask with grouped k/v heads would go to the math kernel (flash takes no mask, the memory-efficient kernel
    no GQA: SDPA's priority is flash, efficient, math), which materialises [B, H, S, S] fp32 scores, 8.6 GB per
    layer at 8K tokens and 32 heads. There the k/v heads are repeated first (``expand_groups``, default: on
    CUDA with a mask), so the memory-efficient kernel takes the call for the price of H/G-fold k/v copies.
    """
    gqa = q.shape[1] != k.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if expand_groups is None:
        expand_groups = q.is_cuda
    if gqa and expand_groups:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        gqa = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class DotProductAttention(nn.Module):
    """softmax(QK^T / sqrt(d)) V over local tensors; q [B, H, S, d], k and v [B, G, S, d]."""

    def prepare(self, q: torch.Tensor, k: torch.Tensor, layout: TokenLayout) -> tuple[str, Any]:
        """This micro-batch's kernel and what it needs besides q, k, v (mask, BlockMask, cu_seqlens), built
        once into ``layout.cache``. Reads only shapes, dtype and device of q and k."""
        B, _, S, _ = q.shape
        kernel = layout.cached("kernel", lambda: choose_kernel(layout, q, k))
        if kernel == "varlen":
            qk, kk, _ = _kernel_inputs(q, k, k)
            return kernel, layout.cached("varlen", lambda: varlen_setup(layout, qk, kk))
        if kernel == "flex":
            return kernel, layout.cached("flex", lambda: flex_block_mask(
                B, S, S, q.device, layout.seq_index, layout.seq_index, layout.sliding_window,
                layout.document_ids, layout.document_ids))
        if layout.is_plain_causal(S):
            return kernel, None
        return kernel, layout.cached("dense", lambda: dense_mask(layout, B, S, q.device))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        kernel, aux = self.prepare(q, k, layout)
        if kernel == "varlen":
            return varlen_forward(q, k, v, layout)  # its setup is the cached entry prepare made
        if kernel == "flex":
            return flex_forward(q, k, v, aux)
        return sdpa_forward(q, k, v, aux)


def dense_mask(layout: TokenLayout, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
    index = layout.seq_index if layout.seq_index is not None else row_index(batch, seq_len, device)
    return allowed_mask(index, index, layout.sliding_window, layout.document_ids, layout.document_ids)


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

    def prepare(self, layout: TokenLayout, batch: int, seq_len: int, dtype: torch.dtype,
                device: torch.device) -> None:
        """Fills ``layout.cache`` for this micro-batch before any layer runs (eagerly, also when the layers are
        compiled). Stand-ins of q and k carry what the choice reads: shape (heads per group against one
        k/v head decides GQA), dtype, device; autocast is the caller's, as in the real forward."""
        q = torch.empty(batch, self.heads_per_group, seq_len, 1, dtype=dtype, device=device)
        k = torch.empty(batch, 1, seq_len, 1, dtype=dtype, device=device)
        self.core_attention.prepare(q, k, layout)

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
