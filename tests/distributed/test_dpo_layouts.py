"""trainer.objective=dpo under every layout: `torchrun -m trainer` trains the same as one process (3 steps, fp32:
loss and TRL's metrics within 1e-5), with the reference precomputed on that layout (each run its own cache) or
run online beside the policy (the cases where its reductions differ; see ONLINE). What each layout tests: fsdp/hsdp the per-pair normalisation over data ranks,
tp2 (+SP) the replicated per-token losses, pp2 (two schedules) the last stage's micro-batch loss, cp2 the
per-sequence sums reduced over cp with autograd before the nonlinearity (parallel.collectives.sum_of_parts),
ep2 a tiny MoE."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed.test_mesh_matrix import MODEL, MOE, _run
from trainer.assets import asset_path

# 40 bundled validation pairs as the training set, seq 256 (the longest pairs are cut to fit): 8 rows a step.
DPO = ["data=preference", "trainer.objective=dpo", "data.seq_len=256", "trainer.global_batch_size=8",
       "trainer.max_steps=3", "trainer.eval_every=0", "logging.wandb=false", "trainer.export_hf=false",
       "optim.warmup_steps=0", "optim.lr=1e-3", "optim.eps=1e-6", "trainer.precision=fp32"]
KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "pairs")
PP = ["parallel=fsdp", "parallel.dp_shard=1", "parallel.pp=2"]
CASES = [
    ("fsdp2", 2, ["parallel=fsdp"], []),
    ("hsdp2x2", 4, ["parallel=hsdp"], []),
    ("tp2_sp", 2, ["parallel=tp2"], []),
    ("pp2_1f1b", 2, [*PP, "parallel.pp_schedule=1f1b"], []),
    ("pp2_gpipe", 2, [*PP, "parallel.pp_schedule=gpipe"], []),
    ("cp2", 2, ["parallel=fsdp", "parallel.dp_shard=1", "parallel.cp=2"], []),
    ("ep2_moe", 2, ["parallel=fsdp", "parallel.ep=2"], MOE),
    # Not in CI (pytest -m extended): the 4-axis composition is the layout matrix's 4d_16ranks case.
    pytest.param("4d_16ranks", 16, ["parallel=4d_16ranks"], [], marks=[pytest.mark.slow, pytest.mark.extended]),
]


def _data(tmp: Path) -> str:
    return f"data.path={asset_path('preference', 'val.jsonl')}"


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo_layouts")
    made: dict[tuple, Path] = {}

    def get(reference: str, variant: list[str]) -> tuple[Path, Path]:
        key = (reference, *variant)
        if key not in made:
            name = f"single_{len(made)}"
            made[key] = _run(tmp, name, 1, [*MODEL, *DPO, *variant, _data(tmp), f"dpo.reference={reference}",
                                            f"data.cache_dir={tmp / name / 'cache'}"])
        return made[key], tmp

    return get


def _check(run: Path, ref: Path, name: str) -> None:
    ours, theirs = _records(run), _records(ref)
    assert len(ours) == len(theirs) == 3
    assert theirs[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)  # ln 2: policy = reference
    for step, (a, b) in enumerate(zip(ours, theirs), start=1):
        for key in KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5), f"{name}: step {step} {key}: {a[key]} vs {b[key]}"


@pytest.mark.distributed
@pytest.mark.parametrize("name,nproc,parallel,variant", CASES)
def test_precomputed_reference_layout_matches_one_process(single, name, nproc, parallel, variant):
    ref, tmp = single("precompute", variant)
    run = _run(tmp, f"pre_{name}", nproc, [*MODEL, *DPO, *variant, *parallel, _data(tmp),
                                           f"data.cache_dir={tmp / f'pre_{name}' / 'cache'}"])
    assert list((tmp / f"pre_{name}" / "cache" / "tokens" / "reference").glob("*.npy"))  # computed on this layout
    _check(run, ref, name)


# The online reference where its reduction differs from the policy's: tp (replicated token losses), pp (the
# reference pipeline's last stage), cp (its sums all-reduced over cp); fsdp, hsdp, gpipe, ep2 and
# 4d_16ranks pass too (run them with -k online after removing this filter) but cost CI time they do not repay.
ONLINE = [c for c in CASES if c[0] in ("tp2_sp", "pp2_1f1b", "cp2")]


@pytest.mark.distributed
@pytest.mark.parametrize("name,nproc,parallel,variant", ONLINE)
def test_online_reference_layout_matches_one_process(single, name, nproc, parallel, variant):
    ref, tmp = single("online", variant)
    run = _run(tmp, f"online_{name}", nproc, [*MODEL, *DPO, *variant, *parallel, _data(tmp), "dpo.reference=online"])
    _check(run, ref, name)
