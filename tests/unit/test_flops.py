"""trainer/flops.py: the step's model FLOPs, checked by hand and against a brute-force count of the mask."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from trainer.config import ModelConfig
from trainer.flops import (achieved_tflops, attention_flops, detected_peak_tflops, document_lengths,
                           matmul_params_per_token, peak_tflops, real_tokens, step_flops, visible_pairs)

# hidden 8, 2 heads of 4, 1 query group, ffn 16, 2 layers, vocabulary 32
SMALL = ModelConfig(vocab_size=32, hidden_size=8, ffn_hidden_size=16, num_layers=2, num_attention_heads=2,
                    num_query_groups=1, make_vocab_size_divisible_by=8)
IDS = np.array([[0, 0, 0, 1, 1, -1],   # documents of 3 and 2 tokens, one padding slot
                [0, 0, 0, 0, 0, 0]])   # one document of 6


def test_hand_computed_step():
    # per layer: qkv 8 * (2 + 2) * 4 = 128, proj 2 * 4 * 8 = 64, SwiGLU 3 * 8 * 16 = 384 -> 576;
    # 2 layers 1152 + output layer 8 * 32 = 256 -> 1408 weights per token.
    assert matmul_params_per_token(SMALL) == 1408
    assert real_tokens(IDS) == 11
    assert sorted(document_lengths(IDS).tolist()) == [2, 3, 6]
    # causal pairs: 3*4/2 + 2*3/2 + 6*7/2 = 6 + 3 + 21 = 30; per pair 12 * heads 2 * head_dim 4 = 96; 2 layers
    assert visible_pairs(document_lengths(IDS)) == 30
    assert attention_flops(SMALL, document_lengths(IDS)) == 2 * 96 * 30 == 5760
    assert step_flops(SMALL, IDS) == 6 * 1408 * 11 + 5760 == 98688
    # 4 labelled tokens (a prompt's labels ignored): the output layer's 256 weights count for those only
    assert step_flops(SMALL, IDS, labelled=4) == 6 * 1152 * 11 + 6 * 256 * 4 + 5760


def test_moe_counts_active_parameters_by_hand():
    from trainer.moe_config import MoEConfig

    moe = dataclasses.replace(SMALL, moe=MoEConfig(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=8,
                                                   moe_shared_expert_intermediate_size=4,
                                                   moe_shared_expert_gate=True, moe_layer_freq=[0, 1]))
    # layer 0 as above (576); layer 1: attention 192 + router 8 * 4 = 32 + top-2 experts 2 * 3 * 8 * 8 = 384
    # + shared expert 3 * 8 * 4 = 96 + its gate row 8 -> 712 (all 4 experts would be 1480); output layer 256
    assert matmul_params_per_token(moe) == 576 + 712 + 256 == 1544
    assert step_flops(moe, IDS) == 6 * 1544 * 11 + 5760
    every = dataclasses.replace(moe, moe=dataclasses.replace(moe.moe, moe_layer_freq=None))
    assert matmul_params_per_token(every) == 2 * 712 + 256


def test_output_layer_counted_when_tied_and_padded():
    tied = dataclasses.replace(SMALL, tie_word_embeddings=True)
    assert matmul_params_per_token(tied) == matmul_params_per_token(SMALL)
    assert matmul_params_per_token(SMALL, padded_vocab=40) == 1408 + 8 * 8


def test_sliding_window_by_hand():
    # W=2: the 3-token document sees 1 + 2 + 2, the 2-token one 1 + 2, the 6-token one 1 + 2*5
    assert visible_pairs(document_lengths(IDS), window=2) == 5 + 3 + 11
    windowed = dataclasses.replace(SMALL, sliding_window=2)
    assert attention_flops(windowed, document_lengths(IDS)) == 2 * 96 * 19
    # a window at least as long as every document changes nothing
    assert visible_pairs(document_lengths(IDS), window=6) == 30


def _brute_force_pairs(ids: np.ndarray, window) -> int:
    """Count the allowed (query, key) slots of the document-causal(-window) mask directly."""
    S = ids.shape[1]
    i, j = np.arange(S)[:, None], np.arange(S)[None, :]
    allowed = j <= i
    if window:
        allowed = allowed & (j > i - window)
    total = 0
    for row in ids:
        same = (row[:, None] == row[None, :]) & (row[:, None] >= 0)
        total += int((allowed & same).sum())
    return total


@pytest.mark.parametrize("window", [None, 0, 1, 3, 7, 64])
def test_pairs_match_the_mask_on_random_packed_rows(window):
    gen = np.random.default_rng(0)
    rows = []
    for _ in range(16):
        lengths = gen.integers(1, 12, size=8)
        row = np.repeat(np.arange(len(lengths)), lengths)[:40]
        pad = gen.integers(0, 6)
        row = np.concatenate([row[:40 - pad], np.full(pad, -1)])
        rows.append(np.pad(row, (0, 40 - len(row)), constant_values=-1))
    ids = np.stack(rows)
    assert visible_pairs(document_lengths(ids), window) == _brute_force_pairs(ids, window)


def test_empty_and_all_padding():
    assert document_lengths(np.full((2, 4), -1)).size == 0
    assert step_flops(SMALL, np.full((2, 4), -1)) == 0


def test_peak_table_and_override():
    assert detected_peak_tflops("NVIDIA H200") == 989
    assert detected_peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert detected_peak_tflops("NVIDIA H100 PCIe") == 756
    assert detected_peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert detected_peak_tflops("NVIDIA L40S") == 362 and detected_peak_tflops("NVIDIA L4") == 121
    assert detected_peak_tflops("Some Future Accelerator") is None
    assert peak_tflops(None, None) is None  # CPU: no name, nothing configured -> no mfu
    assert peak_tflops(500.0, "NVIDIA H200") == 500.0
    assert peak_tflops(None, "NVIDIA H200") == 989


def test_achieved_tflops():
    assert achieved_tflops(8e12, 2.0, 4) == pytest.approx(1.0)


def test_step_meter_on_cpu_and_console_line():
    import torch

    from trainer.metrics import StepMeter, format_record

    cpu = StepMeter(torch.device("cpu"), devices=2)
    assert cpu.peak is None and cpu.throughput(4e12, 2.0) == {"tflops": 1.0}  # no mfu without a known peak
    mem = cpu.memory()["mem_gib"]
    assert 0.01 < mem < 64  # this process's peak RSS, in GiB
    assert StepMeter(torch.device("cpu"), 2, configured_peak=4.0).throughput(4e12, 2.0) == {"tflops": 1.0,
                                                                                            "mfu": 0.25}
    base = {"step": 3, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 1234.0}
    assert "TFLOP/s" not in format_record(base) and "mfu" not in format_record(base)
    line = format_record({**base, "tflops": 1.0, "mfu": 0.25, "mem_gib": 1.5})
    assert line.endswith("| 1,234 tok/s | 1 TFLOP/s | mfu 25.0% | mem 1.50 GiB")
