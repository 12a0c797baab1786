"""trainer.objective=dpo end to end: the bundled quickstart, bad input (exit 2, one line, before any process
group), the precomputed reference reused by a rerun and a resume (and a resume without it refused), the online
reference equal to the precomputed one, and packing changing throughput, not the loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.integration.test_bad_input import assert_one_line, cli

DPO = ["data=preference", "trainer.objective=dpo", "model=tiny", "data.seq_len=256", "trainer.global_batch_size=4",
       "parallel.microbatch_size=2", "trainer.eval_every=0", "logging.wandb=false", "trainer.export_hf=false"]


def _pairs(tmp: Path, n: int) -> Path:
    from trainer.assets import asset_path

    path = tmp / "pairs.jsonl"
    path.write_text("\n".join(asset_path("preference", "val.jsonl").read_text().splitlines()[:n]) + "\n")
    return path


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_bundled_quickstart_trains_and_validates(tmp_path):
    proc = cli(tmp_path, "data=preference", "trainer.objective=dpo", "trainer.max_steps=4", "trainer.eval_every=4",
               "trainer.eval_batches=1", "trainer.global_batch_size=8", "logging.wandb=false", "trainer.export_hf=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _records(tmp_path / "run")
    assert records[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)  # ln 2: policy = reference
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "pairs", "val_loss", "val_rewards/accuracies"):
        assert key in records[-1], key
    assert "reward acc" in proc.stdout and "val_loss" in proc.stdout
    assert list((tmp_path / "cache" / "meshtron" / "tokens" / "reference").glob("*.npy"))


@pytest.mark.parametrize("args,needles", [
    (["dpo.reference=none"], ["dpo.reference=none with dpo.loss_type='sigmoid'", "simpo"]),
    (["dpo.loss_type=simpo"], ["dpo.loss_type='simpo' is reference-free", "dpo.reference=none"]),
    (["data=sft_chat"], ["trainer.objective=dpo needs preference pairs", "data=preference"]),
    (["trainer.objective=lm"], ["data.format=preference holds pairs", "trainer.objective=dpo"]),
    (["dpo.beta=0"], ["dpo.beta=0"]),
    (["dpo.loss_type=orpo", "dpo.reference=none", "dpo.sft_weight=1"], ["ORPO's loss already holds"]),
    (["dpo.loss_type=hinge", "dpo.label_smoothing=0.1"], ["applies to loss_type sigmoid or simpo"]),
])
def test_configuration_errors(compose, args, needles):
    from trainer.errors import ConfigError
    from trainer.loop import prepare

    with pytest.raises(ConfigError) as err:
        prepare(compose(*DPO, *args), 1)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


def test_a_configuration_error_and_a_bad_row_exit_2_in_one_line(tmp_path):
    """One line, exit 2, no run directory (prepare() runs before any process group)."""
    assert_one_line(cli(tmp_path, *DPO, "dpo.reference=none"), "dpo.reference=none with")
    assert not (tmp_path / "run").exists()
    good = {"prompt": "a", "chosen": " b", "rejected": " c"}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "p", "chosen": " c"}) + "\n")
    assert_one_line(cli(tmp_path, *DPO, f"data.path={path}"), "pairs.jsonl:2: no 'rejected' field",
                    "data.on_bad_row=skip")


def test_the_reference_is_reused_by_a_rerun_and_a_resume_and_a_resume_without_it_is_refused(tmp_path):
    data = f"data.path={_pairs(tmp_path, 16)}"
    ckpt = ["trainer.checkpoint.every_steps=2", "optim.decay=constant"]
    first = cli(tmp_path, *DPO, data, *ckpt, "trainer.max_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    tables = list((tmp_path / "cache" / "meshtron" / "tokens" / "reference").glob("*.npy"))
    assert len(tables) == 1
    stamp = tables[0].stat().st_mtime_ns
    resumed = cli(tmp_path, *DPO, data, *ckpt, "trainer.max_steps=3")
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]
    assert tables[0].stat().st_mtime_ns == stamp  # read, not recomputed
    tables[0].unlink()
    refused = cli(tmp_path, *DPO, data, *ckpt, "trainer.max_steps=4")
    assert_one_line(refused, "dpo.reference=precompute", "are missing", "resumes from", "whose weights are no longer")


def test_online_reference_equals_the_precomputed_one(tmp_path):
    data = f"data.path={_pairs(tmp_path, 16)}"
    runs = {}
    for ref in ("precompute", "online"):
        proc = cli(tmp_path, *DPO, data, f"dpo.reference={ref}", "trainer.max_steps=3",
                   f"trainer.output_dir={tmp_path / ref}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[ref] = _records(tmp_path / ref)
    for a, b in zip(runs["precompute"], runs["online"]):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    assert runs["online"][1]["rewards/margins"] != 0.0  # the policy moved away from the frozen copy


def test_packed_and_padded_give_the_same_loss_and_update(compose, tmp_path):
    """All 12 pairs in one step either way (packed: fewer rows); the loss and the trained weights agree."""
    from safetensors.torch import load_file

    from trainer.assets import asset_path
    from trainer.distributed import RankInfo
    from trainer.loop import train

    lines = asset_path("preference", "val.jsonl").read_text().splitlines()[:12]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    results = {}
    for packing, rows in ((True, None), (False, 12)):
        base = ["model=tiny", "data=preference", f"data.path={tmp_path / 'pairs.jsonl'}", "data.seq_len=512",
                f"data.packing={str(packing).lower()}", f"data.cache_dir={tmp_path / 'cache'}",
                "trainer.objective=dpo", "trainer.precision=fp32", "trainer.eval_every=0",
                "trainer.checkpoint.save_before_export=false", "optim.warmup_steps=0", "trainer.device=cpu",
                # Adam turns float noise in near-zero gradients into O(lr) updates with its default eps.
                "optim.eps=1e-6", "optim.lr=1e-3"]
        if rows is None:  # the packed rows of the 12 pairs: one global batch holds them all
            from trainer.data.build import build_split
            from trainer.data.tokenizer import load_tokenizer

            cfg = compose(*base)
            rows = build_split(cfg.data, load_tokenizer(cfg.data, None), "train", tmp_path / "cache" / "tokens").rows.num_rows
            assert rows < 12
        out = tmp_path / f"packed_{packing}"
        cfg = compose(*base, f"trainer.global_batch_size={rows}", "parallel.microbatch_size=1", "trainer.max_steps=2",
                      f"trainer.output_dir={out}")
        train(cfg, RankInfo(0, 1, 0))
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        results[packing] = records, load_file(out / "hf" / "model.safetensors")
    (packed, wp), (padded, wd) = results[True], results[False]
    assert packed[0]["pairs"] == padded[0]["pairs"] == 12
    for a, b in zip(packed, padded):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-5)
    assert packed[1]["packing_efficiency"] > padded[1]["packing_efficiency"]
    for k in wp:
        torch.testing.assert_close(wp[k], wd[k], atol=1e-5, rtol=0, msg=k)
