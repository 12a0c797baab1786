"""The one-transfer-per-step budget under parallel layouts on 2 gloo ranks: each rank's step loop reads the
device once per step (tests/sync_counter.py), in step_totals, whatever the layout adds (FSDP's collectives,
DTensor ops, the pipeline schedule)."""

from __future__ import annotations

import pytest

from tests.distributed.launcher import run_ranks
from tests.unit.test_sync_budget import TINY

pytestmark = pytest.mark.distributed

LAYOUTS = {
    "fsdp2": ["parallel=fsdp"],
    "tp2": ["parallel=tp2"],
    "pp2": ["parallel=fsdp", "parallel.dp_shard=1", "parallel.pp=2", "parallel.pp_schedule=1f1b",
            "model.tie_word_embeddings=true"],
}


def _rank(rank: int, world: int, cfg):
    from tests.sync_counter import counted_train
    from trainer.distributed import RankInfo

    transfers = counted_train(cfg, RankInfo(rank, world, rank))
    return [(t.what, "step_totals" in t.stack) for t in transfers]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_one_transfer_per_step_on_every_rank(tmp_path, compose, layout):
    overrides = [o for o in TINY if not o.startswith("parallel.microbatch_size")]
    cfg = compose(*overrides, *LAYOUTS[layout], "parallel.microbatch_size=1",
                  f"trainer.output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}")
    for rank, transfers in enumerate(run_ranks(2, _rank, cfg)):
        assert transfers == [("Tensor.cpu", True)] * 3, f"rank {rank}: {transfers}"
