"""trainer.precision=fp8 through the CLI on one process (CPU: torchao's emulation, the same conversion, scaling
and casts as on a GPU without its fp8 GEMMs): 30 steps of the tiny model track the bf16 run, the checkpoint is a
bf16 run's (same keys) and resumes in bf16, and every refusal is one line, exit 2, before anything is allocated."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchao")
import torch.distributed.checkpoint as dcp  # noqa: E402

TINY = ["trainer.max_steps=30", "trainer.eval_every=0", "logging.wandb=false", "trainer.export_hf=false",
        "trainer.checkpoint.every_steps=30", "logging.console_every=10"]
# Measured on the tiny model (hidden 128, 4 layers), 30 steps at the default lr on the bundled corpus, fp8
# (rowwise, emulated) against bf16: the largest per-step relative loss difference was 5.0e-3 (step 23; the runs
# drift apart slowly: e4m3 keeps 3 mantissa bits, a relative rounding error of up to 2^-4 per element, averaged
# down by the matmuls' sums) and the first step's 3.0e-4 (the same weights; only the casts differ). The bound is
# 4x the drift; a conversion silently skipped leaves the runs bitwise equal, which the second assertion catches.
TRACK_REL = 2e-2


def _run(tmp: Path, out: Path, *overrides: str, site: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp / "cache"), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    if site is not None:  # a sitecustomize that changes what this process can import
        root = Path(__file__).resolve().parents[2]
        env["PYTHONPATH"] = os.pathsep.join([str(site), str(root)])
    return subprocess.run([sys.executable, "-m", "trainer", f"trainer.output_dir={out}", *overrides], cwd=tmp,
                          env=env, capture_output=True, text=True, timeout=900)


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _keys(step: Path) -> set[str]:
    return set(dcp.FileSystemReader(str(step)).read_metadata().state_dict_metadata)


def test_thirty_steps_track_bf16_and_the_checkpoint_is_a_bf16_one(tmp_path):
    bf16 = _run(tmp_path, tmp_path / "bf16", *TINY, "trainer.precision=bf16")
    fp8 = _run(tmp_path, tmp_path / "fp8", *TINY, "trainer.precision=fp8")
    assert bf16.returncode == 0 and fp8.returncode == 0, (bf16.stderr + fp8.stderr)[-3000:]
    assert ("fp8: 20 linear layers in fp8 on rank 0 (trainer.fp8.recipe=rowwise, emulated: fp8 numerics, "
            "high-precision matmuls)") in fp8.stdout
    a, b = _losses(tmp_path / "fp8"), _losses(tmp_path / "bf16")
    assert len(a) == len(b) == 30
    worst = max(abs(x - y) / y for x, y in zip(a, b))
    assert worst <= TRACK_REL, f"fp8 drifted {worst:.2e} (relative) from bf16: {a} vs {b}"
    assert a[0] != b[0], "fp8 and bf16 losses are identical: the fp8 conversion did not run"
    assert a[-1] < a[0] - 1.0  # and it trains
    assert _keys(tmp_path / "fp8" / "checkpoints" / "step_30") == _keys(tmp_path / "bf16" / "checkpoints" / "step_30")

    # The fp8 run's checkpoint resumes in bf16 (the same parameters; Float8Linear is an nn.Linear).
    resumed = _run(tmp_path, tmp_path / "fp8", *[o for o in TINY if not o.startswith("trainer.max_steps")],
                   "trainer.max_steps=32", "trainer.precision=bf16")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {tmp_path / 'fp8' / 'checkpoints' / 'step_30'} at step 30" in resumed.stdout
    assert len(_losses(tmp_path / "fp8")) == 32


MOE = ["model=tiny_moe", "trainer.max_steps=4", "trainer.eval_every=0", "logging.wandb=false",
       "trainer.export_hf=false", "trainer.checkpoint.every_steps=4", "logging.console_every=4"]


def test_an_moe_model_runs_fp8_on_cpu_with_its_routed_experts_in_bf16(tmp_path):
    """torchao's grouped-expert float8 has no emulation (refused below), but trainer.fp8.skip can keep the routed
    experts in bf16: attention runs emulated fp8 (the router, experts and output layer bf16), tracking bf16 and
    saving a bf16 run's checkpoint. The routed experts' real fp8 step: tests/gpu/test_cuda_fp8.py."""
    bf16 = _run(tmp_path, tmp_path / "bf16", *MOE, "trainer.precision=bf16")
    fp8 = _run(tmp_path, tmp_path / "fp8", *MOE, "trainer.precision=fp8", "trainer.fp8.skip=[*.mlp.experts.*]")
    assert bf16.returncode == 0 and fp8.returncode == 0, (bf16.stderr + fp8.stderr)[-3000:]
    assert "fp8: 8 linear layers in fp8 on rank 0" in fp8.stdout  # linear_qkv and linear_proj of 4 layers
    a, b = _losses(tmp_path / "fp8"), _losses(tmp_path / "bf16")
    assert len(a) == len(b) == 4 and a[0] != b[0]
    assert max(abs(x - y) / y for x, y in zip(a, b)) <= TRACK_REL, (a, b)
    assert _keys(tmp_path / "fp8" / "checkpoints" / "step_4") == _keys(tmp_path / "bf16" / "checkpoints" / "step_4")


HIDE_TORCHAO = """import importlib.util as _u
_find = _u.find_spec
_u.find_spec = lambda name, *a, **k: None if name.split('.')[0] == 'torchao' else _find(name, *a, **k)
"""
OLD_TORCHAO = """import importlib.metadata as _m
_version = _m.version
_m.version = lambda name: '0.9.0' if name == 'torchao' else _version(name)
"""


@pytest.mark.parametrize("overrides,site,needle", [
    ([], HIDE_TORCHAO, "trainer.precision=fp8 needs torchao, which is not installed: pip install 'meshtron[fp8]' "
                       "(torchao>=0.18,<0.19), or use trainer.precision=bf16"),
    ([], OLD_TORCHAO, "trainer.precision=fp8: torchao 0.9.0 with torch "),
    (["model=tiny_moe"], None, "trainer.precision=fp8 with MoE routed experts (decoder.layers.0.mlp.experts."
                               "linear_fc1_gate, ...) on CPU: torchao 0.18.0's grouped-expert float8 has no emulation"),
    (["model.hidden_size=72", "model.num_attention_heads=4", "model.num_query_groups=2"], None,
     "decoder.layers.0.self_attention.linear_qkv is 144 x 72 on each tensor-parallel rank (tp=1); fp8 GEMMs need "
     "both dimensions divisible by 16"),
    (["trainer.fp8.emulate=false"], None, "trainer.fp8.emulate=false on cpu: fp8 GEMMs need a CUDA GPU"),
    (["trainer.fp8.recipe=delayed"], None, "trainer.fp8.recipe='delayed' is not supported; expected one of "
                                           "['rowwise', 'tensorwise']"),
], ids=["no-torchao", "old-torchao", "moe", "not-16", "no-emulation-on-cpu", "bad-recipe"])
def test_refusals_are_one_line_exit_2(tmp_path, overrides, site, needle):
    shim = None
    if site is not None:
        shim = tmp_path / "site"
        shim.mkdir()
        (shim / "sitecustomize.py").write_text(site)
    out = tmp_path / "run"
    done = _run(tmp_path, out, "trainer.max_steps=1", "logging.wandb=false", "trainer.precision=fp8", *overrides,
                site=shim)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr and needle in lines[0], done.stderr[-3000:]
    assert not out.exists()  # refused before the output directory (or anything else) was made
