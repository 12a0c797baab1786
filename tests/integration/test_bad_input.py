"""What the user sees on bad input, end to end: every configuration error (Hydra's override errors, '???', rules
that fail in prepare()) and every damaged input file exits 2 with one line and no traceback; under a 2-rank
torchrun the line is printed once and shown in torchrun's own failure summary."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

FAST = ["data.seq_len=64", "trainer.global_batch_size=8", "parallel.microbatch_size=4", "trainer.eval_every=0",
        "logging.wandb=false", "trainer.export_hf=false", "trainer.max_steps=1"]
GRAMMAR = "https://hydra.cc/docs/1.2/advanced/override_grammar/basic"
LINE = "meshtron: configuration error: "


def _env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "HYDRA_FULL_ERROR")
           and not k.startswith("SLURM_")}
    return {**env, "XDG_CACHE_HOME": str(tmp / "cache"), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def cli(tmp: Path, *args: str, module: str = "trainer", torchrun: int = 0) -> subprocess.CompletedProcess:
    launcher = ([str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", str(torchrun)]
                if torchrun else [sys.executable])
    cmd = [*launcher, "-m", module, f"trainer.output_dir={tmp / 'run'}", *args]
    return subprocess.run(cmd, cwd=tmp, env=_env(tmp), capture_output=True, text=True, timeout=300)


def assert_one_line(proc: subprocess.CompletedProcess, *needles: str, prefix: str = LINE) -> str:
    """Exit 2, stderr exactly one line (warnings aside) starting with ``prefix``, no traceback."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "Warning" not in ln and not ln.startswith("  ")]
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr[-3000:])
    assert lines[0].startswith(prefix), lines[0]
    assert "Traceback" not in proc.stderr and "Error executing job" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize("override,needles", [
    ("trainer.maxsteps=3", ["override 'trainer.maxsteps=3'", "trainer.maxsteps is not a config key"]),
    ("trainer.max_steps=abc", ["override 'trainer.max_steps=abc'", "could not be converted to Integer"]),
    ("trainer.max_steps=[1", ["cannot parse the override 'trainer.max_steps=[1'", GRAMMAR]),
    ("model=nosuch", ["override 'model=nosuch': there is no model config 'nosuch'; choose one of", "tiny"]),
    ("+model.bogus=1", ["model.bogus is not a config key"]),
    ("trainer.max_steps=???", ["trainer.max_steps has no value ('???' in the config)"]),
])
def test_configuration_errors_exit_2_in_one_line(tmp_path, override, needles):
    assert_one_line(cli(tmp_path, override), *needles)
    assert not (tmp_path / "run").exists()


def test_other_entry_points_report_hydra_errors_alike(tmp_path):
    assert_one_line(cli(tmp_path, "launcher.nodes=two", module="trainer.launch"), "override 'launcher.nodes=two'")
    assert_one_line(cli(tmp_path, "parallel=nosuch", module="trainer.verify"), "override 'parallel=nosuch'",
                    prefix="meshtron verify: configuration error: ")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A tiny Llama with the bundled tokenizer (vocabulary 2048), as model.hf_path takes it."""
    import torch
    import transformers

    from trainer.assets import BUNDLED_TOKENIZER

    d = tmp_path_factory.mktemp("hf") / "llama"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=True)
    transformers.LlamaForCausalLM(config).save_pretrained(d)
    shutil.copytree(BUNDLED_TOKENIZER, d, dirs_exist_ok=True)
    return d


def _truncated(src: Path, dst: Path, name: str) -> Path:
    shutil.copytree(src, dst)
    raw = (dst / name).read_bytes()
    (dst / name).write_bytes(raw[:len(raw) // 2])
    return dst / name


def test_truncated_hf_weights_exit_2_naming_the_file(tmp_path, hf_dir):
    bad = _truncated(hf_dir, tmp_path / "hf", "model.safetensors")
    assert_one_line(cli(tmp_path, *FAST, f"model.hf_path={bad.parent}"),
                    f"{bad}: not a readable safetensors file", "file not fully covered", "again")
    assert not (tmp_path / "run").exists()  # the output directory appears once data and weights are ready


def test_hf_weights_of_another_model_exit_2_naming_the_tensors(tmp_path, hf_dir):
    from safetensors.torch import load_file, save_file

    shutil.copytree(hf_dir, tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(weights)
    tensors.pop("model.layers.1.mlp.down_proj.weight")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    assert_one_line(cli(tmp_path, *FAST, f"model.hf_path={weights.parent}"),
                    "model.layers.1.mlp.down_proj.weight", "are missing", "re-download or re-export")
    assert not (tmp_path / "run").exists()


def test_truncated_tokenizer_exits_2_naming_the_file(tmp_path):
    from trainer.assets import BUNDLED_TOKENIZER

    bad = _truncated(BUNDLED_TOKENIZER, tmp_path / "tok", "tokenizer.json")
    assert_one_line(cli(tmp_path, *FAST, f"data.tokenizer={bad.parent}"), f"{bad}: not valid JSON",
                    "copy or download the tokenizer files again")


@pytest.mark.parametrize("damage,needle", [("idx", "not a Megatron indexed dataset index"),
                                           ("bin", "the .bin is truncated")])
def test_damaged_megatron_pair_exits_2_naming_the_file(tmp_path, damage, needle):
    from trainer.data.megatron_indexed import IndexedWriter, prefix_paths

    prefix = tmp_path / "corpus"
    with IndexedWriter(prefix, np.uint16) as w:
        for doc in np.random.default_rng(0).integers(0, 2000, size=(100, 80)):
            w.add(doc)
    idx, bin_ = prefix_paths(prefix)
    path = idx if damage == "idx" else bin_
    raw = path.read_bytes()
    path.write_bytes(b"NOTMEGA\0\0" + raw[9:] if damage == "idx" else raw[:-10])
    line = assert_one_line(cli(tmp_path, *FAST, "data.format=megatron", f"data.path={prefix}"), f"{path}: ", needle)
    assert "meshtron-preprocess" in line
    assert not (tmp_path / "run").exists()


def _once_and_in_torchruns_summary(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """torchrun itself exits 1 with its own summary; the line is printed once, every rank exits 2, and the
    summary shows the line as each rank's 'traceback' (torchrun's per-rank error file)."""
    assert proc.returncode == 1, proc.stderr[-3000:]
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith(LINE)]
    assert len(ours) == 1, proc.stderr[-5000:]
    for needle in needles:
        assert needle in ours[0], (needle, ours[0])
    assert re.findall(r"^\s+exitcode\s+: (-?\d+)", proc.stderr, re.M) == ["2", "2"], proc.stderr[-3000:]
    assert proc.stderr.count(f"traceback : {ours[0]}") == 2, proc.stderr[-3000:]
    assert "To enable traceback see" not in proc.stderr


@pytest.mark.distributed
@pytest.mark.parametrize("override,needle", [
    ("trainer.max_steps=abc", "override 'trainer.max_steps=abc'"),  # Hydra, before torch is imported
    ("parallel.tp=3", "does not divide world size 2"),              # prepare(), before the process group
])
def test_torchrun_prints_a_configuration_error_once(tmp_path, override, needle):
    _once_and_in_torchruns_summary(cli(tmp_path, *FAST, override, torchrun=2), needle)


@pytest.mark.distributed
def test_torchrun_prints_a_damaged_file_found_after_the_process_group_once(tmp_path, hf_dir):
    """Both ranks find the damaged weights once the group is up: the first to claim the store key prints."""
    bad = _truncated(hf_dir, tmp_path / "hf", "model.safetensors")
    proc = cli(tmp_path, *FAST, "parallel=fsdp", f"model.hf_path={bad.parent}", torchrun=2)
    _once_and_in_torchruns_summary(proc, f"{bad}: not a readable safetensors file")
