"""Document isolation in packed rows: a document's logits are the same whether it is packed after another
document or run alone, in one process and under context and tensor parallelism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.distributed.launcher import run_ranks
from trainer.config import ModelConfig
from trainer.model import GPTModel

CFG = ModelConfig(vocab_size=128, hidden_size=32, ffn_hidden_size=64, num_layers=2, num_attention_heads=4,
                  num_query_groups=2, max_position_embeddings=64)
LEN_A, LEN_B = 12, 20  # a 32-token row: A then B


def packed_row():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 128, (LEN_A,), generator=g)
    b = torch.randint(0, 128, (LEN_B,), generator=g)
    ids = torch.cat([a, b])[None]
    pos = torch.cat([torch.arange(LEN_A), torch.arange(LEN_B)])[None]
    docs = torch.cat([torch.zeros(LEN_A), torch.ones(LEN_B)]).long()[None]
    return ids, pos, docs, b[None]


def alone_logits() -> torch.Tensor:
    _, _, _, b = packed_row()
    with torch.no_grad():
        return GPTModel(CFG, seed=1)(b)[0]


def test_packed_document_sees_only_itself():
    ids, pos, docs, b = packed_row()
    model = GPTModel(CFG, seed=1)
    with torch.no_grad():
        packed = model(ids, position_ids=pos, document_ids=docs)[0, LEN_A:]
        changed_a = ids.clone()
        changed_a[0, :LEN_A] = (changed_a[0, :LEN_A] + 1) % 128
        packed_other_a = model(changed_a, position_ids=pos, document_ids=docs)[0, LEN_A:]
    torch.testing.assert_close(packed, alone_logits(), rtol=0, atol=1e-6)
    assert torch.equal(packed, packed_other_a)  # nothing of A leaks into B, bit for bit


def _cp_rank(rank: int, world: int) -> np.ndarray:
    from torch.distributed.device_mesh import init_device_mesh

    from parallel.context_parallel import apply_context_parallel, shard_batch_for_cp

    ids, pos, docs, _ = packed_row()
    model = GPTModel(CFG, seed=1)
    apply_context_parallel(model, init_device_mesh("cpu", (world,), mesh_dim_names=("cp",)))
    local = shard_batch_for_cp({"input_ids": ids, "position_ids": pos, "document_ids": docs}, world, rank)
    with torch.no_grad():
        logits = model(local["input_ids"], position_ids=local["position_ids"], seq_index=local["seq_index"],
                       document_ids=local["document_ids"])
    return np.concatenate([local["seq_index"][0].numpy()[:, None], logits[0].numpy()], axis=1)


def _tp_rank(rank: int, world: int) -> np.ndarray:
    from torch.distributed.device_mesh import init_device_mesh

    from parallel.tensor_parallel import apply_tensor_parallel

    ids, pos, docs, _ = packed_row()
    model = GPTModel(CFG, seed=1)
    apply_tensor_parallel(model, init_device_mesh("cpu", (world,), mesh_dim_names=("tp",)), loss_parallel=False)
    with torch.no_grad():
        return model(ids, position_ids=pos, document_ids=docs)[0, LEN_A:].numpy()


@pytest.mark.distributed
def test_packed_document_isolated_under_cp2_and_tp2():
    expected = alone_logits().numpy()
    parts = np.concatenate(run_ranks(2, _cp_rank))
    full = np.zeros((LEN_A + LEN_B, expected.shape[1]), dtype=np.float32)
    full[parts[:, 0].astype(int)] = parts[:, 1:]
    np.testing.assert_allclose(full[LEN_A:], expected, rtol=0, atol=1e-5)
    for tp_logits in run_ranks(2, _tp_rank):
        np.testing.assert_allclose(tp_logits, expected, rtol=0, atol=1e-5)
