"""Model FLOPs of a training step, achieved TFLOP/s and MFU: pure functions, computed on the host.

The count is the model's arithmetic (PaLM's MFU, Chowdhery et al. 2022, app. B), not the hardware's: no
activation recompute, no padding slots, no elementwise work. For one optimizer step of real tokens T, of
which T_y have a label that counts:

    flops = 6 * N * T  +  6 * hidden * padded_vocab * T_y
            +  sum over layers l, documents d of  12 * heads * head_dim * pairs(L_d, W_l)

- N, the matmul parameters a token goes through: per layer the fused QKV projection
  (hidden * (heads + 2 * query_groups) * head_dim), the attention output projection
  (heads * head_dim * hidden) and the SwiGLU MLP (gate, up and down: 3 * hidden * ffn_hidden) or, in an MoE
  layer, the active parameters: the router (hidden * experts), top_k routed experts and the shared expert
  (3 * hidden * their widths, plus the shared expert's gate row). The embedding lookup is a gather, not a
  matmul, and is not counted. 6 = 2 FLOPs per multiply-add x (forward + backward, the backward being two
  matmuls: input and weight gradients).
- The output layer (hidden * padded_vocab, the matmul that actually runs; counted also when tied to the
  embedding), 6 * hidden * padded_vocab per labelled token: the loss needs it nowhere else, and the model
  runs it only there when it can (trainer/loss.py selected_token_losses), as TRL's fused LM head does.
- Attention: per visible (query, key) pair the forward runs two matmuls, Q K^T and P V, each
  2 * heads * head_dim FLOPs; backward is twice the forward, so 3 x 4 = 12 * heads * head_dim per pair.
- pairs(L, W): the (query, key) pairs a document of L tokens sees under causal masking, counted exactly:
  query i (0-based) sees min(i + 1, W) keys, so L (L + 1) / 2 without a window (W >= L), and
  W (W + 1) / 2 + (L - W) * W with a Mistral window W < L. Documents are the runs of one document id within
  a packed row (padding, id < 0, is no document), as the attention mask isolates them.

    tflops = flops / step seconds / number of devices / 1e12      mfu = tflops / peak TFLOP/s of one device
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from trainer.config import ModelConfig

# Dense (no 2:4 sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s per GPU. Matched against
# torch.cuda.get_device_name() in order, so the more specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("h100 pcie", 756.0),
    ("h100 nvl", 835.0),
    ("gh200", 989.0),
    ("h200", 989.0),
    ("h100", 989.0),  # SXM (the "H100 80GB HBM3" name)
    ("h800", 989.0),
    ("b200", 2250.0),
    ("a100", 312.0),
    ("a800", 312.0),
    ("l40s", 362.0),
    ("l40", 181.0),
    ("l4", 121.0),
)


def moe_layer_params(cfg: ModelConfig, experts: int) -> int:
    """Weights of one MoE layer's MLP with ``experts`` routed experts counted: the router, their gate/up/down,
    the shared expert and its gate (``experts`` = top-k for what a token uses, all E for what a rank holds)."""
    m, h = cfg.moe, cfg.hidden_size
    shared = m.moe_shared_expert_intermediate_size or 0
    return (h * m.num_moe_experts + 3 * h * (experts * m.expert_ffn(cfg.ffn_hidden_size) + shared)
            + (h if m.moe_shared_expert_gate else 0))


def matmul_params_per_token(cfg: ModelConfig, padded_vocab: Optional[int] = None) -> int:
    """Weights of every matmul one token goes through: the layers' and the output layer's."""
    h, hd = cfg.hidden_size, cfg.head_dim
    qkv = h * (cfg.num_attention_heads + 2 * cfg.num_query_groups) * hd
    proj = cfg.num_attention_heads * hd * h
    dense = 3 * h * cfg.ffn_hidden_size
    m = cfg.moe
    moe_layers = len(m.moe_layers(cfg.num_layers)) if m.enabled else 0
    moe = moe_layer_params(cfg, m.moe_router_topk) if moe_layers else 0
    return (cfg.num_layers * (qkv + proj) + (cfg.num_layers - moe_layers) * dense + moe_layers * moe
            + h * (padded_vocab or cfg.vocab_size))


def document_lengths(document_ids: np.ndarray) -> np.ndarray:
    """Lengths of the documents of a [B, S] array of document ids: runs of one id within a row; ids < 0
    (padding) are no document. A 1-D array is one row."""
    ids = np.atleast_2d(np.asarray(document_ids))
    B, S = ids.shape
    if ids.size == 0:
        return np.zeros(0, np.int64)
    starts = np.ones((B, S), dtype=bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    flat_starts = np.flatnonzero(starts.ravel())
    lengths = np.diff(np.append(flat_starts, B * S))
    real = ids.ravel()[flat_starts] >= 0
    return lengths[real].astype(np.int64)


def visible_pairs(lengths: np.ndarray, window: Optional[int] = None) -> int:
    """Causal (query, key) pairs of documents of these lengths; with a sliding window W, query i sees the
    min(i + 1, W) keys i - W < j <= i."""
    L = np.asarray(lengths, dtype=np.int64)
    full = L * (L + 1) // 2
    if not window:
        return int(full.sum())
    W = int(window)
    windowed = W * (W + 1) // 2 + (L - W) * W
    return int(np.where(L <= W, full, windowed).sum())


def attention_flops(cfg: ModelConfig, lengths: np.ndarray) -> int:
    """Forward + backward FLOPs of Q K^T and P V over all layers for documents of these lengths."""
    per_pair = 3 * 2 * (2 * cfg.num_attention_heads * cfg.head_dim)
    return cfg.num_layers * per_pair * visible_pairs(lengths, cfg.sliding_window)


def real_tokens(document_ids: np.ndarray) -> int:
    return int(np.count_nonzero(np.asarray(document_ids) >= 0))


def step_flops(cfg: ModelConfig, document_ids: np.ndarray, padded_vocab: Optional[int] = None,
               labelled: Optional[int] = None) -> int:
    """Model FLOPs of one optimizer step over a global batch with these document ids [B, S], whose
    ``labelled`` tokens (default: every real token) run the output layer."""
    lengths = document_lengths(document_ids)  # every real token is in exactly one document
    tokens = int(lengths.sum())
    labelled = tokens if labelled is None else labelled
    head = cfg.hidden_size * (padded_vocab or cfg.vocab_size)
    body = matmul_params_per_token(cfg, padded_vocab) - head
    if cfg.lora.enabled:
        # Only the FLOPs that run: a frozen weight's matmul runs forward and for its input's gradient (2 + 2 per
        # weight and token), never for its own gradient; the adapters' run all three. Attention's backward runs.
        from trainer.lora import trainable_count

        adapters = trainable_count(cfg, cfg.lora, per_token=True)  # of the routed experts', a token's top k
        return (4 * body + 6 * adapters) * tokens + 4 * head * labelled + attention_flops(cfg, lengths)
    return 6 * body * tokens + 6 * head * labelled + attention_flops(cfg, lengths)


def achieved_tflops(flops: float, seconds: float, devices: int) -> float:
    return flops / seconds / devices / 1e12


def detected_peak_tflops(device_name: str) -> Optional[float]:
    """The table's dense bf16 peak for a GPU name, or None for a GPU it does not know."""
    name = device_name.lower()
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def peak_tflops(configured: Optional[float], device_name: Optional[str]) -> Optional[float]:
    """trainer.peak_tflops when set, else the peak of the named GPU, else None (then no mfu is reported)."""
    if configured is not None:
        return float(configured)
    return detected_peak_tflops(device_name) if device_name else None
