"""Checkpoint files without a training run: untrusted pickles, incomplete directories, shape checks, RNG."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch

from trainer.checkpoint import (
    COMPLETE,
    CheckpointError,
    check_shapes,
    find_resume,
    load_untrusted,
    rng_state,
    scan,
    set_rng_state,
)
from trainer.config import Config


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_in_trainer_state_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    ck = tmp_path / "checkpoints" / "step_3"
    (ck / "rng").mkdir(parents=True)
    (ck / COMPLETE).write_text("{}")
    with open(ck / "trainer_state.pt", "wb") as f:
        pickle.dump({"step": 3, "payload": _Evil(str(marker))}, f)
    cfg = Config()
    cfg.trainer.checkpoint.load_from = str(ck)
    path, _ = find_resume(cfg, tmp_path)
    with pytest.raises(CheckpointError, match="refusing to load .*trainer_state.pt"):
        load_untrusted(path / "trainer_state.pt")
    # torch.save's zip format with the same object is refused as well.
    torch.save({"payload": _Evil(str(marker))}, ck / "rng" / "rank_00000.pt")
    with pytest.raises(CheckpointError, match="weights-only"):
        load_untrusted(ck / "rng" / "rank_00000.pt")
    assert not marker.exists()


def test_incomplete_directories_are_ignored_and_reported(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step_2", "step_4", ".tmp_step_6", "step_8"):
        (root / name).mkdir(parents=True)
    for name in ("step_2", "step_4"):
        (root / name / COMPLETE).write_text("{}")
    complete, incomplete = scan(root)
    assert [p.name for p in complete] == ["step_2", "step_4"]
    assert sorted(p.name for p in incomplete) == [".tmp_step_6", "step_8"]
    path, notes = find_resume(Config(), tmp_path)
    assert path.name == "step_4"
    assert len(notes) == 2 and all("incomplete" in n for n in notes)
    cfg = Config()
    cfg.trainer.checkpoint.resume = "never"
    assert find_resume(cfg, tmp_path)[0] is None
    cfg.trainer.checkpoint.load_from = str(root / "step_8")
    with pytest.raises(CheckpointError, match="step_8"):
        find_resume(cfg, tmp_path)


def test_shape_check_names_first_mismatch(tmp_path):
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": {"a.weight": torch.zeros(4, 8), "b.weight": torch.zeros(3)}}, checkpoint_id=str(tmp_path),
             no_dist=True)
    check_shapes({"model": {"a.weight": torch.ones(4, 8)}}, tmp_path)
    with pytest.raises(CheckpointError, match=r"'a.weight' has shape \[4, 8\] in the checkpoint but \[4, 6\]"):
        check_shapes({"model": {"a.weight": torch.ones(4, 6), "b.weight": torch.ones(2)}}, tmp_path)
    with pytest.raises(CheckpointError, match="no tensor 'c.weight'"):
        check_shapes({"model": {"c.weight": torch.ones(1)}}, tmp_path)


def test_rng_state_roundtrips_weights_only(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1))
    set_rng_state(load_untrusted(tmp_path / "rng.pt"))
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
