"""Context parallelism: each cp rank holds a slice of every sequence and attends over all of it.

The split is Megatron's / Llama 3's load-balanced "head-tail" (zigzag) split: a row is cut into 2*cp equal
chunks and rank r keeps chunks r and 2*cp-1-r. Under a causal mask, token i does work proportional to
i + 1, so pairing an early chunk with a late one gives every rank the same amount of attention work
(Llama 3 paper, sec. 3.3.2; Megatron-LM's ``get_batch_on_this_cp_rank``).

Attention is the Llama 3 all-gather variant rather than ring attention: every layer all-gathers K and V
along the sequence (backward: reduce-scatter of their gradients) and each rank computes its own queries
against the whole row. Masking is exact because it is decided by each token's index in the full row
(``TokenLayout.seq_index``), not by its local position, so causal, Mistral sliding-window and
packed-document masks all hold across rank boundaries. The mask (the dense reference, or on CUDA a flex
BlockMask mapping the zigzag queries onto the gathered keys) and the gathered row indices and document ids
are built by the first layer and cached on the TokenLayout, so they cost one all-gather per forward, not
one per layer. The K/V all-gather costs one K/V row per layer;
with GQA K/V are small next to Q, which is why Llama 3 chose it over ring attention.

Loss and gradient convention (the training loop relies on it): each cp rank sums cross-entropy over its
local labels; the step's loss is the sum over cp (and dp) ranks divided by the global count of valid
tokens. Every replicated parameter then holds a partial gradient on each cp rank, and the true gradient is
their SUM over cp. FSDP does that in training because cp is folded into its shard group.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from trainer.model.attention import (TokenLayout, allowed_mask, choose_kernel, flex_block_mask, flex_forward,
                                     sdpa_forward)
from trainer.torch_compat import all_gather_autograd

CPGroup = Union[DeviceMesh, dist.ProcessGroup]


# ------------------------------------------------------------------------------------------ batch split


def zigzag_indices(seq_len: int, cp: int, cp_rank: int) -> torch.Tensor:
    """Indices (in the full row) of the tokens cp rank ``cp_rank`` holds: chunk r, then chunk 2*cp-1-r."""
    if cp < 1 or not 0 <= cp_rank < cp:
        raise ValueError(f"context parallel rank {cp_rank} is out of range for cp={cp}")
    if seq_len % (2 * cp):
        raise ValueError(
            f"sequence length seq_len={seq_len} is not divisible by 2*cp = {2 * cp} (cp={cp}); the "
            f"load-balanced split cuts each row into 2*cp equal chunks"
        )
    chunk = seq_len // (2 * cp)
    head = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    tail = torch.arange((2 * cp - 1 - cp_rank) * chunk, (2 * cp - cp_rank) * chunk)
    return torch.cat([head, tail])


def shard_batch_for_cp(batch: dict[str, torch.Tensor], cp: int, cp_rank: int) -> dict[str, torch.Tensor]:
    """This rank's tokens of every [B, S, ...] tensor in ``batch``, plus ``position_ids`` and ``seq_index``.

    position_ids keep the original values (given ones, else 0..S-1) because rotary embeddings must see
    where a token sits in its document, not in the shard. seq_index is each kept token's index in the
    full row; the model passes it to attention so masks stay exact (see ContextParallelAttention).
    """
    batch_size, seq_len = batch["input_ids"].shape[:2]
    index = zigzag_indices(seq_len, cp, cp_rank).to(batch["input_ids"].device)
    full = dict(batch)
    if full.get("position_ids") is None:
        full["position_ids"] = torch.arange(seq_len, device=index.device).expand(batch_size, seq_len)
    out = {}
    for name, tensor in full.items():
        if tensor.dim() < 2 or tensor.shape[:2] != (batch_size, seq_len):
            raise ValueError(f"batch[{name!r}] has shape {tuple(tensor.shape)}; context parallelism expects "
                             f"[B, S, ...] = [{batch_size}, {seq_len}, ...] like input_ids")
        out[name] = tensor.index_select(1, index)
    out["seq_index"] = index.expand(batch_size, -1).contiguous()
    return out


# ------------------------------------------------------------------------------------------ attention


class ContextParallelAttention(nn.Module):
    """Drop-in for DotProductAttention when the sequence is split over cp ranks (no parameters).

    q [B, H, S_local, d] stays local; k, v [B, G, S_local, d] are all-gathered along the sequence in the
    group's rank order, together with the row indices and document ids that decide the mask. Under tensor
    parallelism H and G are the local heads; nothing here depends on them.
    """

    def __init__(self, cp_mesh_or_group: CPGroup):
        super().__init__()
        if isinstance(cp_mesh_or_group, DeviceMesh) and cp_mesh_or_group.ndim != 1:
            raise ValueError(f"context parallelism needs a 1-D mesh (e.g. mesh['cp']), got "
                             f"{cp_mesh_or_group.ndim} dims {cp_mesh_or_group.mesh_dim_names}")
        self.group = cp_mesh_or_group
        self.cp = (cp_mesh_or_group.size() if isinstance(cp_mesh_or_group, DeviceMesh)
                   else dist.get_world_size(cp_mesh_or_group))

    def _gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        # Functional collectives carry autograd: all-gather forward, reduce-scatter (sum) backward, which
        # is exactly the gradient of "every rank reads every shard". Both work on gloo.
        return all_gather_autograd(t.contiguous(), gather_dim=dim, group=self.group)

    def _keys(self, layout: TokenLayout) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        # Row indices and document ids of the gathered keys: integers, no gradient, the same for every layer.
        k_index = funcol.all_gather_tensor(layout.seq_index.contiguous(), gather_dim=1, group=self.group)
        q_doc = layout.document_ids
        k_doc = None if q_doc is None else funcol.all_gather_tensor(q_doc.contiguous(), gather_dim=1,
                                                                    group=self.group)
        return funcol.wait_tensor(k_index), None if k_doc is None else funcol.wait_tensor(k_doc)

    def _mask(self, layout: TokenLayout, kernel: str, q: torch.Tensor):
        """This rank's zigzag queries against the gathered keys, in the gathered (rank-major) key order."""
        k_index, k_doc = layout.cached("cp_keys", lambda: self._keys(layout))
        if kernel == "flex":
            return flex_block_mask(q.shape[0], q.shape[2], k_index.shape[1], q.device, layout.seq_index,
                                   k_index, layout.sliding_window, layout.document_ids, k_doc)
        return allowed_mask(layout.seq_index, k_index, layout.sliding_window, layout.document_ids, k_doc)

    def prepare(self, q: torch.Tensor, k: torch.Tensor, layout: TokenLayout) -> tuple[str, Any]:
        """The kernel and its mask for this micro-batch, built once into ``layout.cache`` (see
        SelfAttention.prepare, which runs this before the layers, eagerly)."""
        if layout.seq_index is None:
            raise ValueError("context-parallel attention needs layout.seq_index (each local token's index in "
                             "the full row); pass seq_index from shard_batch_for_cp to the model")
        kernel = layout.cached("kernel", lambda: choose_kernel(layout, q, k, context_parallel=True))
        if kernel == "varlen":
            raise ValueError("model.attention_backend=varlen cannot run under context parallelism: the gathered "
                             "keys are zigzag chunks, not one contiguous sequence per document; use flex or auto")
        return kernel, layout.cached(f"cp_{kernel}", lambda: self._mask(layout, kernel, q))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        kernel, mask = self.prepare(q, k, layout)
        k_full, v_full = self._gather(k, 2), self._gather(v, 2)
        if kernel == "flex":
            return flex_forward(q, k_full, v_full, mask)
        # Every query sees at least itself (its own key is in the gathered row), so no row is fully masked.
        return sdpa_forward(q, k_full, v_full, mask)

    def extra_repr(self) -> str:
        return f"cp={self.cp}"


def apply_context_parallel(model: nn.Module, cp_mesh: DeviceMesh) -> None:
    """Swap every present layer's ``self_attention.core_attention`` for a ContextParallelAttention.

    A pipeline stage holds only some layers; the ModuleDict iteration covers exactly those.
    """
    for layer in model.decoder.layers.values():
        layer.self_attention.core_attention = ContextParallelAttention(cp_mesh)
