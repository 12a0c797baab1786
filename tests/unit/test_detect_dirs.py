"""checkpoint_convert.detect: what a directory is and which command reads it, and every reader refusing a
directory of another kind in one line that says so (exit 2 from the CLI, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from checkpoint_convert import detect as d
from checkpoint_convert.cli import main as convert_cli
from checkpoint_convert.megatron import hf_to_megatron, megatron_to_hf
from checkpoint_convert.meshtron import resolve_checkpoint
from trainer.errors import ConfigError

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    """One directory of each kind: HF and Megatron legacy written by the real writers, meshtron's layout as
    trainer/checkpoint.py leaves it, Megatron torch_dist's as megatron-core 0.16 writes it (file names only)."""
    root = tmp_path_factory.mktemp("kinds")
    hf = root / "hf"
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).save_pretrained(hf)
    out = {"hf": hf, "megatron": hf_to_megatron(hf, root / "megatron", tp=2, pp=1, progress=False)}
    out["megatron_iter"] = out["megatron"] / "release"

    run = root / "run"
    ckpts = run / "checkpoints"
    for step, complete in ((2, True), (4, True), (6, False)):
        s = ckpts / f"step_{step}"
        (s / "hf").mkdir(parents=True)
        for name in (".metadata", "__0_0.distcp", "config.yaml", "trainer_state.pt"):
            (s / name).write_bytes(b"")
        if complete:
            (s / "COMPLETE").write_text("{}")
    (ckpts / "latest").write_text("step_4\n")
    out.update(run=run, checkpoints=ckpts, step=ckpts / "step_4", incomplete=ckpts / "step_6")

    dist = root / "torch_dist"
    it = dist / "iter_0000020"
    it.mkdir(parents=True)
    (it / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                                  "common_backend": "torch", "common_backend_version": 1}))
    for name in (".metadata", "__0_0.distcp", "__0_1.distcp", "common.pt"):
        (it / name).write_bytes(b"")
    (dist / "latest_checkpointed_iteration.txt").write_text("20")
    out.update(torch_dist=dist, torch_dist_iter=it)

    zarr = root / "zarr" / "iter_0000001"
    zarr.mkdir(parents=True)
    (zarr / "metadata.json").write_text('{"sharded_backend": "zarr"}')
    out["zarr"] = zarr
    (root / "config_only").mkdir()
    (root / "config_only" / "config.json").write_text(json.dumps(config.to_dict()))
    out["config_only"] = root / "config_only"
    (root / "empty").mkdir()
    out["empty"] = root / "empty"
    out["file"] = hf / "config.json"
    out["missing"] = root / "nope"
    return out


KINDS = [
    ("hf", d.HF, "an HF model directory", "hf-to-megatron --hf {p} --out DIR --tp T --pp P"),
    ("megatron", d.MEGATRON_LEGACY, "Megatron-LM legacy (torch format) checkpoint (latest_checkpointed_iteration.txt "
                                    "-> release)", "megatron-to-hf --megatron {p} --out DIR"),
    ("megatron_iter", d.MEGATRON_LEGACY, "iteration directory release", "megatron-to-hf --megatron {p} --out DIR"),
    ("torch_dist", d.MEGATRON_TORCH_DIST, "Megatron-LM torch_dist checkpoint (latest_checkpointed_iteration.txt -> "
                                          "iter_0000020)", "megatron-to-hf --megatron {p} --out DIR"),
    ("torch_dist_iter", d.MEGATRON_TORCH_DIST, "torch_dist checkpoint (iteration", "megatron-to-hf --megatron {p}"),
    ("zarr", d.MEGATRON_OTHER, "sharded_backend 'zarr', unsupported", None),
    ("step", d.MESHTRON_STEP, "a meshtron checkpoint (step directory)", "meshtron-to-hf --checkpoint {p} --out DIR"),
    ("incomplete", d.MESHTRON_INCOMPLETE, "no COMPLETE file", "meshtron-to-hf --checkpoint {parent} --out DIR"),
    ("checkpoints", d.MESHTRON_CHECKPOINTS, "a meshtron checkpoints/ directory", "meshtron-to-hf --checkpoint {p}"),
    ("run", d.MESHTRON_CHECKPOINTS, "a meshtron run directory", "meshtron-to-hf --checkpoint {p} --out DIR"),
    ("config_only", d.HF_CONFIG, "config.json without *.safetensors", "--hf-config {p}"),
    ("empty", d.UNKNOWN, "not a checkpoint meshtron-convert knows", None),
    ("file", d.NOT_A_DIRECTORY, "a file", None),
    ("missing", d.MISSING, "missing", None),
]


@pytest.mark.parametrize("key,name,description,command", KINDS, ids=[k[0] for k in KINDS])
def test_detect_says_what_each_directory_is(dirs, key, name, description, command):
    kind = d.detect(dirs[key])
    assert kind.name == name and description in kind.description, kind
    if command is None:
        assert kind.command is None
    else:
        assert command.format(p=dirs[key], parent=dirs[key].parent) in kind.command
        read = "read the newest complete one with" if name == d.MESHTRON_INCOMPLETE else "read it with"
        assert kind.sentence() == f"{dirs[key]} is {kind.description}; {read} `meshtron-convert {kind.command}`"


def _cli_error(argv: list[str], capsys) -> str:
    code = convert_cli(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("key,reader", [("megatron", "megatron-to-hf --megatron"),
                                        ("megatron_iter", "megatron-to-hf --megatron"),
                                        ("torch_dist_iter", "megatron-to-hf --megatron"),
                                        ("hf", "hf-to-megatron --hf")])
def test_meshtron_to_hf_on_another_kind_names_it_and_its_command(dirs, tmp_path, capsys, key, reader):
    err = _cli_error(["meshtron-to-hf", "--checkpoint", str(dirs[key]), "--out", str(tmp_path / "o")], capsys)
    assert f"--checkpoint {dirs[key]} is a" in err and f"read it with `meshtron-convert {reader} {dirs[key]}" in err
    assert "incomplete" not in err and "interrupted" not in err  # a torch_dist directory also holds .metadata
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("key,reader", [("step", "meshtron-to-hf --checkpoint"), ("run", "meshtron-to-hf --checkpoint"),
                                        ("checkpoints", "meshtron-to-hf --checkpoint"), ("hf", "hf-to-megatron --hf")])
def test_megatron_to_hf_on_another_kind_names_it_and_its_command(dirs, tmp_path, capsys, key, reader):
    err = _cli_error(["megatron-to-hf", "--megatron", str(dirs[key]), "--out", str(tmp_path / "o")], capsys)
    assert f"{dirs[key]} is a" in err and f"read it with `meshtron-convert {reader} {dirs[key]}" in err
    assert not (tmp_path / "o").exists()


def test_hf_inputs_of_another_kind_are_refused_naming_them(dirs, tmp_path):
    with pytest.raises(ConfigError, match=r"megatron is a Megatron-LM legacy .*`meshtron-convert megatron-to-hf"):
        hf_to_megatron(dirs["megatron"], tmp_path / "o", tp=1, pp=1, progress=False)
    with pytest.raises(ConfigError, match=r"step_4 is a meshtron checkpoint .*`meshtron-convert meshtron-to-hf"):
        megatron_to_hf(dirs["megatron"], tmp_path / "o", hf_config_dir=dirs["step"], progress=False)
    assert not (tmp_path / "o").exists()


def test_meshtron_checkpoint_forms_still_resolve(dirs):
    assert resolve_checkpoint(dirs["step"]) == dirs["step"]
    assert resolve_checkpoint(dirs["checkpoints"]) == dirs["step"] == resolve_checkpoint(dirs["run"])
    with pytest.raises(ConfigError, match="incomplete .no COMPLETE file: its save was interrupted"):
        resolve_checkpoint(dirs["incomplete"])
    with pytest.raises(ConfigError, match="not a meshtron checkpoint .not a checkpoint meshtron-convert knows"):
        resolve_checkpoint(dirs["empty"])


def test_detection_never_unpickles(dirs, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("detect loaded a file")

    monkeypatch.setattr(torch, "load", refuse)
    assert [d.detect(dirs[k]).name for k in ("megatron", "torch_dist", "step")] == [
        d.MEGATRON_LEGACY, d.MEGATRON_TORCH_DIST, d.MESHTRON_STEP]
