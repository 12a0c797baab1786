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
    [path], _ = find_resume(cfg, tmp_path)
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
    paths, notes = find_resume(Config(), tmp_path)
    assert [p.name for p in paths] == ["step_4", "step_2"]  # newest first: the first intact one is used
    assert len(notes) == 2 and all("incomplete" in n for n in notes)
    cfg = Config()
    cfg.trainer.checkpoint.resume = "never"
    assert find_resume(cfg, tmp_path)[0] == []
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


def test_file_list_checks_sizes_always_and_checksums_split_between_ranks(tmp_path):
    from checkpoint_convert.integrity import (DamagedCheckpoint, check_files, recorded_files, write_complete,
                                              write_rank_manifest)

    for r in range(3):
        (tmp_path / f"__{r}_0.distcp").write_bytes(bytes([r]) * (1000 + r))
        write_rank_manifest(tmp_path, r, [f"__{r}_0.distcp"])
    with pytest.raises(OSError, match="rank 3 left no file manifest"):
        write_complete(tmp_path, 7, world_size=4)  # a rank that did not finish: no COMPLETE
    assert not (tmp_path / COMPLETE).exists()
    write_complete(tmp_path, 7, world_size=3)
    files = recorded_files(tmp_path)
    assert sorted(files) == ["__0_0.distcp", "__1_0.distcp", "__2_0.distcp"] and not (tmp_path / ".manifest").exists()
    assert all(check_files(tmp_path, files, True, (r, 2)) == [] for r in range(2))

    (tmp_path / "__1_0.distcp").write_bytes(b"\x09" * 1001)  # same size, other bytes
    with open(tmp_path / "__2_0.distcp", "r+b") as f:
        f.truncate(10)
    assert [p.split(": ")[1].split(" ")[0] for p in check_files(tmp_path, files, False)] == ["10"]  # sizes only
    found = [check_files(tmp_path, files, True, (r, 2)) for r in range(2)]
    assert len(found[0]) == 1 and "truncated" in found[0][0] and "__2_0" in found[0][0]  # share 0: every size
    assert len(found[1]) == 1 and "__1_0.distcp: CRC-32" in found[1][0]  # the checksum of file 1 is share 1's
    (tmp_path / COMPLETE).write_text("{not json")
    with pytest.raises(DamagedCheckpoint, match="unreadable"):
        recorded_files(tmp_path)


def test_verify_setting_is_checked():
    from trainer.errors import ConfigError

    cfg = Config()
    cfg.trainer.checkpoint.verify = "fast"
    with pytest.raises(ConfigError, match="trainer.checkpoint.verify.*'fast'"):
        cfg.trainer.checkpoint.validate()
