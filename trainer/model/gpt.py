"""A single-device decoder-only transformer (Llama 2/3/3.1, Mistral, Qwen2/2.5, Qwen3, and the MoE families
Qwen3-MoE, Mixtral, Qwen2-MoE).

Parameter names follow megatron-core's GPTModel with its local layer spec, so checkpoints and converters
never depend on how the model is later parallelised:

    embedding.word_embeddings.weight
    decoder.layers.N.{input_layernorm, self_attention.{linear_qkv, q_layernorm, k_layernorm, linear_proj},
                      pre_mlp_layernorm, mlp.{linear_fc1_gate, linear_fc1_up, linear_fc2}}
                      (an MoE layer's mlp: router, experts, shared_experts; see trainer/model/moe.py)
    decoder.final_layernorm.weight
    output_layer.weight            (absent with tied embeddings)

No process groups live here: tensor, pipeline and data parallelism are applied from outside.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

from trainer.config import ModelConfig
from trainer.loss import chunked_token_losses, cross_entropy_tokens, selected_token_losses
from trainer.model.attention import SelfAttention, TokenLayout
from trainer.model.init import assign_full, clean_fqn, normal_fill_, normal_like

ADAPTER = ".lora_"  # in LoRA adapter names only (trainer/lora.py)
from trainer.model.layers import RMSNorm, RotaryEmbedding, SwiGLUMLP
from trainer.model.moe import EXTRA_COLUMNS, MoELayer, RouterStats, compute_dtype, grouped_mm_usable


class TransformerLayer(nn.Module):
    """Pre-norm block: h + attn(norm(h)), then + mlp(norm(.)). The unit of checkpointing and PP splits."""

    def __init__(self, cfg: ModelConfig, layer_number: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_epsilon)
        self.self_attention = SelfAttention(cfg)
        self.pre_mlp_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_epsilon)
        self.mlp = (MoELayer(cfg, cfg.moe.moe_layers(cfg.num_layers).index(layer_number))
                    if cfg.moe.is_moe_layer(layer_number) else SwiGLUMLP(cfg.hidden_size, cfg.ffn_hidden_size))

    def forward(self, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                layout: TokenLayout, router: Optional[RouterStats] = None) -> torch.Tensor:
        hidden = hidden + self.self_attention(self.input_layernorm(hidden), rope, layout)
        normed = self.pre_mlp_layernorm(hidden)
        return hidden + (self.mlp(normed, router) if isinstance(self.mlp, MoELayer) else self.mlp(normed))


class TransformerBlock(nn.Module):
    """Megatron's `decoder`: the layer stack and the final norm.

    Layers live in a ModuleDict keyed by their global index, so a pipeline stage that keeps layers 4..7
    still calls them decoder.layers.4 .. decoder.layers.7 and checkpoints never see the split.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layers = nn.ModuleDict({str(i): TransformerLayer(cfg, i) for i in range(cfg.num_layers)})
        self.final_layernorm: Optional[RMSNorm] = RMSNorm(cfg.hidden_size, cfg.norm_epsilon)


class LanguageModelEmbedding(nn.Module):
    """Megatron's `embedding` wrapper (word embeddings only: rotary models have no position table)."""

    def __init__(self, num_embeddings: int, hidden_size: int):
        super().__init__()
        self.word_embeddings = nn.Embedding(num_embeddings, hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)


# Parameters whose rows are vocabulary entries: padded for tensor parallelism, un-padded on export.
VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")


class GPTModel(nn.Module):
    """The decoder. ``padded_vocab_size`` (>= vocab_size) adds rows as Megatron does so the vocabulary
    splits evenly over tensor-parallel ranks; their logits are -inf, so they never change the loss.

    A pipeline stage is this module with parts removed (set to None): no ``embedding`` means the input is
    a hidden state; no ``decoder.final_layernorm`` means the stage returns its hidden state.
    """

    def __init__(self, cfg: ModelConfig, padded_vocab_size: Optional[int] = None, seed: int = 0):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.padded_vocab_size = padded_vocab_size or cfg.vocab_size
        if self.padded_vocab_size < cfg.vocab_size:
            raise ValueError(f"padded_vocab_size={padded_vocab_size} < model.vocab_size={cfg.vocab_size}")
        self.embedding: Optional[LanguageModelEmbedding] = LanguageModelEmbedding(
            self.padded_vocab_size, cfg.hidden_size)
        self.rotary_pos_emb = RotaryEmbedding(cfg.head_dim, cfg.rotary_base, cfg.rope_scaling)
        self.decoder = TransformerBlock(cfg)
        # Tied: the logits reuse embedding.word_embeddings.weight and no output_layer exists at all.
        self.output_layer: Optional[nn.Linear] = (
            None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, self.padded_vocab_size, bias=False)
        )
        self.init_weights(seed)
        # Tokens per output-layer + cross-entropy chunk (trainer.loss_chunk_size; 0: all at once) and the
        # per-chunk function, replaceable by a compiled one. Plain attributes: state_dict never sees them.
        self.loss_chunk_size = 0
        self.loss_chunk_fn = loss_chunk
        # label_index selections are padded to a multiple of this many rows; None: to whole loss chunks, so a
        # compiled chunk (parallel/compile.py sets it) sees one shape every step. See selected_token_losses.
        self.selection_multiple: Optional[int] = SELECTION_MULTIPLE
        # MoE: rows of the training step (the aux losses' mean is over them; None: the forward's own rows),
        # and the step's router totals in training mode (trainer/model/moe.py start_router_step,
        # step_router_totals). Plain attributes too.
        self.moe_rows_per_step: Optional[int] = None
        self.router_records: list[torch.Tensor] = []  # one [MoE layers, E + 3] per training forward

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Megatron's init: N(0, init_std) for matrices, std / sqrt(2 * num_layers) for the two
        projections that write into the residual stream (GPT-2 paper, sec. 2.3), ones for norms, zeros
        for biases, zeros for padded vocabulary rows. Each tensor comes from its own generator seeded by
        (seed, name), so the result is the same for any parallel layout (see trainer/model/init.py).
        Kept apart from __init__ so a model built on the meta device can be materialised, then initialised.
        """
        std = self.config.init_std
        residual_std = std / math.sqrt(2.0 * self.config.num_layers)
        for name, p in self.named_parameters():
            name = clean_fqn(name)
            if p.is_meta or ADAPTER in name:  # LoRA's adapters: trainer/lora.py initialises them
                continue
            if name.endswith("layernorm.weight"):
                full = torch.ones(p.shape, device=p.device)
            elif name.endswith(".bias"):
                full = torch.zeros(p.shape, device=p.device)
            elif name in VOCAB_PARAMS:
                # A pipeline's last stage may hold a copy of tied embeddings: it must start equal to them.
                source = VOCAB_PARAMS[0] if self.config.tie_word_embeddings else name
                # Drawn into the first vocab_size rows of the padded tensor: one full tensor alive, not two.
                full = torch.zeros(p.shape, device=p.device)
                normal_fill_(full[:self.config.vocab_size], std, seed, source)
            else:
                proj = name.endswith(("linear_proj.weight", "linear_fc2.weight"))
                full = normal_like(tuple(p.shape), residual_std if proj else std, seed, name, p.device)
            assign_full(p, full)
        if not self.rotary_pos_emb.inv_freq.is_meta:
            self.rotary_pos_emb.reset_parameters()

    def output_weight(self) -> torch.Tensor:
        return self.embedding.word_embeddings.weight if self.output_layer is None else self.output_layer.weight

    def forward(self, tokens: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                seq_index: Optional[torch.Tensor] = None, document_ids: Optional[torch.Tensor] = None,
                doc_lens: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                label_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens [B, S] (or, on a later pipeline stage, the previous stage's hidden state)
        -> logits [B, S, padded_vocab], or with ``labels`` the per-token cross-entropy [B, S] in fp32 (0 where
        labels are IGNORE_INDEX; see token_losses; ``label_index`` lets the output layer skip them). Before the
        last pipeline stage: the hidden state.

        position_ids [B, S] feed rotary embeddings (default 0..S-1); seq_index, document_ids and doc_lens
        decide what attends to what (see TokenLayout). Under sequence or pipeline parallelism the hidden
        state is sharded or received, so position_ids must be given: they carry the full sequence length.
        """
        if position_ids is None:
            B, S = tokens.shape[:2]
            position_ids = torch.arange(S, device=tokens.device).expand(B, S)
        hidden = self.embedding(tokens) if self.embedding is not None else tokens
        rope = self.rotary_pos_emb(position_ids, hidden.dtype)  # once per forward, shared by all layers
        layout = TokenLayout(seq_index, document_ids, self.config.sliding_window, doc_lens,
                             backend=self.config.attention_backend)
        self._prepare_attention(layout, position_ids, hidden.dtype)
        router = self._router_stats(hidden) if self.config.moe.enabled else None
        for layer in self.decoder.layers.values():
            hidden = layer(hidden, rope, layout) if router is None else layer(hidden, rope, layout, router)
        if router is not None and self.training:
            self._add_router_totals(router, hidden.device)
        if self.decoder.final_layernorm is None:
            return hidden
        hidden = self.decoder.final_layernorm(hidden)
        return self.lm_head(hidden) if labels is None else self.token_losses(hidden, labels, label_index)

    def _prepare_attention(self, layout: TokenLayout, position_ids: torch.Tensor, dtype: torch.dtype) -> None:
        """Kernel choice, masks and cu_seqlens once per forward, eagerly: every layer (compiled or not, and
        activation-checkpoint recomputation) then reads them from the layout."""
        layer = next(iter(self.decoder.layers.values()), None)
        if layer is None:
            return
        # Activation checkpointing wraps a layer; the wrapper keeps the layer as _checkpoint_wrapped_module.
        layer = getattr(layer, "_checkpoint_wrapped_module", layer)
        B, S = position_ids.shape[:2]
        layer.self_attention.prepare(layout, B, S, dtype, position_ids.device)

    def _router_stats(self, hidden: torch.Tensor) -> RouterStats:
        """This forward's router record, made eagerly before the layers: the GEMM path (grouped_mm_usable
        probes the device once) and the weight of a row's auxiliary loss."""
        m = self.config.moe
        widths = (self.config.hidden_size, m.expert_ffn(self.config.ffn_hidden_size))
        grouped = m.moe_grouped_gemm and grouped_mm_usable(hidden.device, compute_dtype(hidden), *widths)
        return RouterStats(len(m.moe_layers(self.config.num_layers)), self.moe_rows_per_step or hidden.shape[0],
                           grouped)

    @torch.no_grad()
    def _add_router_totals(self, router: RouterStats, device: torch.device) -> None:
        m = self.config.moe
        record = torch.zeros(len(m.moe_layers(self.config.num_layers)), m.num_moe_experts + EXTRA_COLUMNS,
                             dtype=torch.float64, device=device)
        for index, values in router.records.items():
            record[index] += values
        self.router_records.append(record)

    @property
    def router_totals(self) -> Optional[torch.Tensor]:
        """The sum of this step's training forwards' router records (None before the first)."""
        return torch.stack(self.router_records).sum(0) if self.router_records else None

    def token_losses(self, hidden: torch.Tensor, labels: torch.Tensor,
                     label_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-token cross-entropy (fp32, shaped like labels) of the final-normed hidden state, computed
        ``loss_chunk_size`` tokens at a time so the whole [tokens, vocab] logits never exist (loss.py); with
        ``label_index`` (loss.label_index of these labels) only at the positions whose label counts."""
        weight = self.output_weight()
        if isinstance(weight, DTensor):
            # Gather sequence-parallel shards once for all chunks, not once per chunk.
            hidden = replicate_hidden(hidden, weight.device_mesh)
        if label_index is not None:
            return selected_token_losses(self.loss_chunk_fn, hidden, weight, labels, label_index,
                                         self.config.vocab_size, self.loss_chunk_size,
                                         self.selection_multiple or self.loss_chunk_size)
        return chunked_token_losses(self.loss_chunk_fn, hidden, weight, labels, self.config.vocab_size,
                                    self.loss_chunk_size)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [..., padded_vocab] (vocab-sharded DTensor under tensor parallelism; see output_logits)."""
        return output_logits(hidden, self.output_weight(), self.config.vocab_size)


# Rows of a label selection: a multiple of 64 keeps the output layer's matmul on whole tensor-core tiles.
SELECTION_MULTIPLE = 64


def loss_chunk(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """One chunk's output layer and cross-entropy: hidden [n, h], labels [n] -> fp32 losses [n].

    The matmul runs in the caller's precision (bf16 under autocast or FSDP's bf16 parameters); the
    cross-entropy upcasts only this chunk's logits. A plain function of tensors, so it can be compiled.
    """
    return cross_entropy_tokens(output_logits(hidden, weight, vocab_size), labels)


def output_logits(hidden: torch.Tensor, weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """hidden @ weight.T with columns >= vocab_size (padding rows of the weight) set to -inf."""
    if isinstance(weight, DTensor):  # tensor parallel: see vocab_parallel_logits
        return vocab_parallel_logits(hidden, weight, vocab_size)
    logits = nn.functional.linear(hidden, weight)
    if weight.shape[0] > vocab_size:
        logits[..., vocab_size:] = float("-inf")
    return logits


def replicate_hidden(hidden: torch.Tensor, mesh) -> DTensor:
    """The hidden state as a Replicate DTensor on ``mesh``: all-gathered from sequence shards (a DTensor,
    under sequence parallelism) or wrapped as is (a local tensor, full on every rank). In backward its
    gradient, a partial sum over the vocabulary shards, is reduce-scattered or all-reduced accordingly."""
    replicate = [Replicate()] * mesh.ndim
    if isinstance(hidden, DTensor):
        return hidden.redistribute(mesh, replicate)
    return DTensor.from_local(hidden, mesh, replicate, run_check=False)


def vocab_parallel_logits(hidden: torch.Tensor, weight: DTensor, vocab_size: int) -> DTensor:
    """Logits sharded on the vocabulary dim (Megatron's ColumnParallelLinear without gather_output).

    Tensor parallelism shards the output weight (or the tied embedding) on its vocabulary rows, so each
    rank multiplies the full hidden state by its rows. The hidden state arrives sequence-sharded (a
    DTensor, under sequence parallelism) or full (a local tensor); either way it is made Replicate first.
    Padded vocabulary columns get -inf through an additive 0/-inf row sharded like the weight, since a
    slice assignment cannot address global columns of a sharded tensor.
    """
    mesh = weight.device_mesh
    hidden = replicate_hidden(hidden, mesh)  # a no-op for token_losses' chunks, already replicated
    logits = nn.functional.linear(hidden, weight)
    if weight.shape[0] > vocab_size:
        pad = torch.zeros(weight.shape[0], dtype=logits.dtype, device=logits.device)
        pad[vocab_size:] = float("-inf")
        vocab_placements = [p if p.is_shard(0) else Replicate() for p in weight.placements]
        logits = logits + distribute_tensor(pad, mesh, vocab_placements, src_data_rank=None)
    return logits
