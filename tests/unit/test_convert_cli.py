"""`python -m checkpoint_convert`: argument parsing and user errors (one line on stderr, exit 2, nothing
written), and the pieces of meshtron-to-hf that need no training run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoint_convert.cli import build_parser, main as convert
from checkpoint_convert.safetensors_files import ShardWriter
from checkpoint_convert.meshtron import groups, resolve_checkpoint
from trainer.errors import ConfigError


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    import transformers

    d = tmp_path_factory.mktemp("hf") / "tiny"
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(d)
    return d


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = convert(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_usage_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("meshtron-convert"), err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)


def test_subcommands_and_flags_parse():
    p = build_parser()
    a = p.parse_args(["hf-to-megatron", "--hf", "h", "--out", "o", "--tp", "2", "--pp", "4"])
    assert (a.tp, a.pp, a.spec, a.vocab_divisible_by, a.progress, a.format) == (2, 4, "local", 128, True, "torch_dist")
    a = p.parse_args(["hf-to-megatron", "--hf", "h", "--out", "o", "--format", "torch"])
    assert (a.format, a.tp, a.pp) == ("torch", None, None)
    a = p.parse_args(["hf-to-megatron", "--hf", "h", "--out", "o", "--tp", "1", "--pp", "1", "--spec", "te",
                      "--vocab-divisible-by", "64", "--no-progress"])
    assert (a.spec, a.vocab_divisible_by, a.progress) == ("te", 64, False)
    a = p.parse_args(["megatron-to-hf", "--megatron", "m", "--out", "o", "--hf-config", "c", "--iteration", "500"])
    assert (a.megatron, a.hf_config, a.iteration) == (Path("m"), Path("c"), 500)
    a = p.parse_args(["meshtron-to-hf", "--checkpoint", "c", "--out", "o"])
    assert a.checkpoint == Path("c") and a.dtype is None
    a = p.parse_args(["verify", "--hf", "h", "--megatron", "m"])
    assert (a.megatron, a.checkpoint, a.tolerance) == (Path("m"), None, 1e-4)
    a = p.parse_args(["verify", "--hf", "h", "--checkpoint", "c", "--tolerance", "1e-3"])
    assert a.checkpoint == Path("c") and a.tolerance == 1e-3


@pytest.mark.parametrize("argv,needles", [
    ([], ["required: command"]),
    (["hf-to-megatron", "--hf", "h", "--out", "o", "--tp", "0", "--pp", "1"], ["--tp", "positive"]),
    (["hf-to-megatron", "--hf", "h", "--out", "o", "--tp", "two", "--pp", "1"], ["--tp", "'two'"]),
    (["hf-to-megatron", "--hf", "h", "--out", "o", "--format", "torch", "--tp", "2"], ["--format torch", "--pp"]),
    (["hf-to-megatron", "--hf", "h", "--out", "o", "--format", "torch"], ["--tp, --pp"]),
    (["hf-to-megatron", "--hf", "h", "--out", "o", "--format", "dist"], ["--format", "'dist'"]),
    (["hf-to-megatron", "--hf", "h", "--out", "o", "--tp", "1", "--pp", "1", "--spec", "fast"], ["--spec"]),
    (["verify", "--hf", "h"], ["--megatron", "--checkpoint"]),
    (["verify", "--hf", "h", "--megatron", "m", "--checkpoint", "c"], ["not allowed"]),
    (["verify", "--hf", "h", "--megatron", "m", "--tolerance", "-1"], ["--tolerance"]),
    (["hf-to-hf"], ["invalid choice"]),
])
def test_bad_arguments_exit_2_in_one_line(argv, needles, capsys):
    code, _, err = run(argv, capsys)
    assert_usage_error(code, err, *needles)


def test_missing_input_directories_exit_2(tmp_path, capsys):
    out = tmp_path / "out"
    for argv, flag in [
        (["hf-to-megatron", "--hf", str(tmp_path / "nope"), "--out", str(out), "--tp", "1", "--pp", "1"], "--hf"),
        (["megatron-to-hf", "--megatron", str(tmp_path / "nope"), "--out", str(out)], "--megatron"),
        (["meshtron-to-hf", "--checkpoint", str(tmp_path / "nope"), "--out", str(out)], "--checkpoint"),
        (["verify", "--hf", str(tmp_path / "nope"), "--checkpoint", str(tmp_path)], "--hf"),
    ]:
        code, _, err = run(argv, capsys)
        assert_usage_error(code, err, flag, "no such directory")
    assert not out.exists()


def test_hf_dir_without_config_exits_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run(["hf-to-megatron", "--hf", str(tmp_path / "empty"), "--out", str(tmp_path / "o"),
                        "--tp", "1", "--pp", "1"], capsys)
    assert_usage_error(code, err, "config.json")
    assert not (tmp_path / "o").exists()


def test_non_empty_out_exits_2_and_is_left_alone(hf_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for argv in (["hf-to-megatron", "--hf", str(hf_dir), "--out", str(out), "--tp", "1", "--pp", "1"],
                 ["megatron-to-hf", "--megatron", str(hf_dir), "--out", str(out)],
                 ["meshtron-to-hf", "--checkpoint", str(hf_dir), "--out", str(out)]):
        code, _, err = run(argv, capsys)
        assert_usage_error(code, err, "--out", "not empty")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_out_equal_to_input_exits_2(hf_dir, capsys):
    code, _, err = run(["megatron-to-hf", "--megatron", str(hf_dir.parent), "--out", str(hf_dir.parent)], capsys)
    assert_usage_error(code, err, "--out")


def _fake_step(root: Path, n: int, complete: bool = True) -> Path:
    step = root / f"step_{n}"
    step.mkdir(parents=True)
    (step / ".metadata").write_bytes(b"")
    if complete:
        (step / "COMPLETE").write_text("{}")
    return step


def test_checkpoint_dir_forms(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    _fake_step(ckpts, 2)
    s4 = _fake_step(ckpts, 4)
    (ckpts / "latest").write_text("step_4\n")
    assert resolve_checkpoint(s4) == s4
    assert resolve_checkpoint(ckpts) == s4
    assert resolve_checkpoint(tmp_path / "run") == s4  # the run directory above checkpoints/ too


def test_bad_checkpoint_dirs_name_what_was_expected(tmp_path, capsys):
    ckpts = tmp_path / "checkpoints"
    _fake_step(ckpts, 6, complete=False)
    with pytest.raises(ConfigError, match="incomplete"):
        resolve_checkpoint(ckpts / "step_6")
    (ckpts / "latest").write_text("step_6\n")
    with pytest.raises(ConfigError, match="step_6"):
        resolve_checkpoint(ckpts)
    (tmp_path / "hf").mkdir()
    code, _, err = run(["meshtron-to-hf", "--checkpoint", str(tmp_path / "hf"), "--out", str(tmp_path / "o")],
                       capsys)
    assert_usage_error(code, err, "step_<N>", "latest")
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture_exits_2_before_writing(tmp_path, capsys):
    pytest.importorskip("checkpoint_convert.megatron")
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    code, _, err = run(["hf-to-megatron", "--hf", str(d), "--out", str(tmp_path / "o"), "--tp", "1", "--pp", "1"],
                       capsys)
    assert_usage_error(code, err, "gpt2")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("tp,pp,needle", [(3, 1, "3"), (1, 3, "3"), (8, 1, "8")])
def test_tp_pp_that_do_not_divide_the_model_exit_2_before_writing(hf_dir, tmp_path, capsys, tp, pp, needle):
    """4 heads, 2 query groups, 2 layers: tp must divide 2 groups, pp the 2 layers."""
    pytest.importorskip("checkpoint_convert.megatron")
    out = tmp_path / "o"
    code, _, err = run(["hf-to-megatron", "--hf", str(hf_dir), "--out", str(out), "--tp", str(tp), "--pp", str(pp),
                        "--no-progress"], capsys)
    assert_usage_error(code, err, needle)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name != "o"]  # no temporary directory left either


def test_shard_writer_and_groups(tmp_path):
    from safetensors.torch import load_file

    w = ShardWriter(tmp_path, max_shard_bytes=100)
    for i in range(3):
        w.add(f"t{i}", torch.full((10,), float(i)))  # 40 bytes each: two per shard
    w.finish()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {"t0": "model-00001-of-00002.safetensors", "t1": "model-00001-of-00002.safetensors",
                                   "t2": "model-00002-of-00002.safetensors"}
    assert index["metadata"]["total_size"] == 120
    assert torch.equal(load_file(str(tmp_path / "model-00002-of-00002.safetensors"))["t2"], torch.full((10,), 2.0))
    assert not list(tmp_path.glob(".shard-*"))
    names = ["output_layer.weight", "decoder.layers.10.mlp.linear_fc2.weight", "decoder.final_layernorm.weight",
             "decoder.layers.2.mlp.linear_fc1_up.weight", "decoder.layers.2.mlp.linear_fc1_gate.weight",
             "embedding.word_embeddings.weight"]
    assert list(groups(names)) == [
        ["embedding.word_embeddings.weight"],
        ["decoder.layers.2.mlp.linear_fc1_gate.weight", "decoder.layers.2.mlp.linear_fc1_up.weight"],
        ["decoder.layers.10.mlp.linear_fc2.weight"],
        ["decoder.final_layernorm.weight"], ["output_layer.weight"]]


def test_module_entry_point_help_documents_exit_codes():
    proc = subprocess.run([sys.executable, "-m", "checkpoint_convert", "--help"], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0
    for cmd in ("hf-to-megatron", "megatron-to-hf", "meshtron-to-hf", "verify", "exit codes", "model.hf_path"):
        assert cmd in proc.stdout, cmd


def _damaged_copy(src: Path, dst: Path, how: str) -> Path:
    """A copy of an HF directory whose model.safetensors is cut in half or replaced by a Git LFS pointer."""
    import shutil

    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(raw[:len(raw) // 2] if how == "truncated" else
                        b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 123\n")
    return dst


@pytest.mark.parametrize("how,needles", [
    ("truncated", ["model.safetensors: not a readable safetensors file", "file not fully covered", "again"]),
    ("lfs", ["model.safetensors: is a Git LFS pointer", "git lfs pull"]),
])
def test_damaged_safetensors_exit_2_in_one_line(hf_dir, tmp_path, capsys, how, needles):
    """hf-to-megatron reads the weights itself; verify hands them to transformers, so it checks them first."""
    pytest.importorskip("checkpoint_convert.megatron")
    bad = _damaged_copy(hf_dir, tmp_path / "bad", how)
    out = tmp_path / "o"
    code, _, err = run(["hf-to-megatron", "--hf", str(bad), "--out", str(out), "--tp", "1", "--pp", "1",
                        "--no-progress"], capsys)
    assert_usage_error(code, err, str(bad / "model.safetensors"), *needles)
    assert not out.exists()

    code, _, _ = run(["hf-to-megatron", "--hf", str(hf_dir), "--out", str(out), "--tp", "1", "--pp", "1",
                      "--no-progress"], capsys)
    assert code == 0
    code, _, err = run(["verify", "--hf", str(bad), "--megatron", str(out)], capsys)
    assert_usage_error(code, err, str(bad / "model.safetensors"), *needles)


def test_damaged_config_json_exits_2_naming_it(hf_dir, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    (bad / "config.json").write_text((hf_dir / "config.json").read_text()[:40])
    code, _, err = run(["hf-to-megatron", "--hf", str(bad), "--out", str(tmp_path / "o"), "--tp", "1", "--pp", "1"],
                       capsys)
    assert_usage_error(code, err, f"{bad / 'config.json'}: not valid JSON", "truncated or corrupt")


# ------------------------------------------------------------------------------------ torch_dist


def test_torch_dist_is_the_default_and_both_formats_convert_back(hf_dir, tmp_path, capsys):
    """hf-to-megatron writes torch_dist unless --format torch; megatron-to-hf tells the two apart by itself."""
    from tests.unit.test_hf_parity import _read_safetensors_dir

    dist_out, legacy_out = tmp_path / "dist", tmp_path / "legacy"
    code, out, _ = run(["hf-to-megatron", "--hf", str(hf_dir), "--out", str(dist_out), "--no-progress"], capsys)
    assert code == 0 and "torch_dist" in out and "any TP x PP" in out
    assert (dist_out / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert sorted(p.name for p in (dist_out / "release").iterdir()) == [".metadata", "__0_0.distcp", "common.pt",
                                                                         "metadata.json"]
    assert json.loads((dist_out / "release" / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    code, _, _ = run(["hf-to-megatron", "--hf", str(hf_dir), "--out", str(legacy_out), "--format", "torch",
                      "--tp", "1", "--pp", "1", "--no-progress"], capsys)
    assert code == 0 and [p.name for p in (legacy_out / "release").iterdir()] == ["mp_rank_00"]
    original = _read_safetensors_dir(hf_dir)
    for src in (dist_out, legacy_out, dist_out / "release"):  # the iteration directory itself is accepted too
        back = tmp_path / f"back-{src.name}"
        code, _, err = run(["megatron-to-hf", "--megatron", str(src), "--out", str(back), "--no-progress"], capsys)
        assert code == 0, err
        returned = _read_safetensors_dir(back)
        assert returned.keys() == original.keys() and all(torch.equal(returned[k], original[k]) for k in original)


def test_torch_dist_records_tp_pp_and_spec_and_keeps_bf16(tmp_path, capsys):
    """--tp/--pp/--spec only go into the args (and the padding); the tensors stay global and bf16."""
    from checkpoint_convert.megatron_dist import read_dcp_metadata
    from checkpoint_convert.megatron_format import load_rank_file
    from tests.tiny_hf import save_tiny_hf
    from tests.unit.test_hf_parity import _read_safetensors_dir

    src, meg, back = tmp_path / "hf", tmp_path / "meg", tmp_path / "back"
    save_tiny_hf("qwen3-head-dim", src, dtype=torch.bfloat16)
    assert run(["hf-to-megatron", "--hf", str(src), "--out", str(meg), "--tp", "2", "--pp", "4", "--spec", "te",
                "--no-progress"], capsys)[0] == 0
    args = load_rank_file(meg / "release" / "common.pt")["args"]
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.transformer_impl,
            args.ckpt_format, args.padded_vocab_size, args.params_dtype) == (2, 4, "transformer_engine", "torch_dist",
                                                                             256, torch.bfloat16)
    entries = read_dcp_metadata(meg / "release").state_dict_metadata
    qkv = entries["decoder.layers.self_attention.linear_qkv.weight"]
    assert list(qkv.size) == [4, (4 + 2 * 2) * 24, 64] and qkv.properties.dtype == torch.bfloat16
    assert [list(c.sizes) for c in qkv.chunks] == [[1, 192, 64]] * 4  # one chunk per layer, not per TP rank
    assert "decoder.layers.self_attention.core_attention._extra_state/shard_3_4" in entries
    assert run(["megatron-to-hf", "--megatron", str(meg), "--out", str(back), "--no-progress"], capsys)[0] == 0
    original, returned = _read_safetensors_dir(src), _read_safetensors_dir(back)
    assert returned.keys() == original.keys()
    assert all(returned[k].dtype == torch.bfloat16 and torch.equal(returned[k], original[k]) for k in original)


@pytest.fixture(scope="module")
def dist_dir(hf_dir, tmp_path_factory) -> Path:
    from checkpoint_convert.megatron_dist_write import hf_to_megatron_dist

    return hf_to_megatron_dist(hf_dir, tmp_path_factory.mktemp("dist") / "meg", progress=False)


class _RunsCode:
    """Unpickling this runs a shell command: what a hostile .metadata would hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def _damage(root: Path, how: str, marker: Path) -> None:
    import pickle

    from checkpoint_convert.megatron_dist import read_dcp_metadata

    it = root / "release"
    if how == "metadata truncated":
        (it / ".metadata").write_bytes((it / ".metadata").read_bytes()[:300])
    elif how == "metadata lfs":
        (it / ".metadata").write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n")
    elif how == "metadata runs code":
        (it / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    elif how == "distcp missing":
        (it / "__0_0.distcp").unlink()
    elif how == "distcp truncated":
        (it / "__0_0.distcp").write_bytes((it / "__0_0.distcp").read_bytes()[:5000])
    elif how == "distcp corrupt":  # same size, chunk archives overwritten
        raw = bytearray((it / "__0_0.distcp").read_bytes())
        raw[: len(raw) // 2] = bytes(len(raw) // 2)
        (it / "__0_0.distcp").write_bytes(bytes(raw))
    elif how == "tensor missing":
        md = read_dcp_metadata(it)
        del md.state_dict_metadata["decoder.final_layernorm.weight"]
        (it / ".metadata").write_bytes(pickle.dumps(md))
    elif how == "common missing":
        (it / "common.pt").unlink()
    elif how == "common state runs code":  # core 0.19 keeps it in the DCP files: an object entry, torch.save'd
        import torch.distributed.checkpoint as dcp

        for f in [it / "common.pt", it / ".metadata", *it.glob("*.distcp")]:
            f.unlink()
        with pytest.warns(UserWarning, match="single process"):
            dcp.save({"common_state/shard_0_1": [{"args": _RunsCode(marker)}]}, checkpoint_id=it, no_dist=True,
                     planner=dcp.DefaultSavePlanner(flatten_state_dict=False))  # torch.save of the list, as megatron
    elif how == "other backend":
        (it / "metadata.json").write_text(json.dumps({"sharded_backend": "zarr"}))


@pytest.mark.parametrize("how,needles", [
    ("metadata truncated", [".metadata: is not readable DCP metadata", "copy it again"]),
    ("metadata lfs", [".metadata: is a Git LFS pointer", "git lfs pull"]),
    ("metadata runs code", [".metadata: refusing to unpickle posix.system", "nothing was run"]),
    ("distcp missing", ["__0_0.distcp: is missing"]),
    ("distcp truncated", ["__0_0.distcp: is truncated (5000 bytes"]),
    ("distcp corrupt", ["__0_0.distcp: is truncated or corrupt"]),
    ("tensor missing", ["lacks decoder.final_layernorm.weight, which the llama model its args describe has"]),
    ("common missing", ["common.pt: is missing", "common_state/shard_0_1"]),
    ("common state runs code", [".metadata entry common_state/shard_0_1: refusing to unpickle posix.system",
                                "nothing was run"]),
    ("other backend", ["sharded_backend 'zarr'", "no meshtron-convert command reads it"]),
])
def test_damaged_torch_dist_exits_2_in_one_line(dist_dir, tmp_path, capsys, how, needles):
    import shutil

    bad, out, marker = tmp_path / "bad", tmp_path / "out", tmp_path / "ran"
    shutil.copytree(dist_dir, bad)
    _damage(bad, how, marker)
    code, _, err = run(["megatron-to-hf", "--megatron", str(bad), "--out", str(out), "--no-progress"], capsys)
    assert_usage_error(code, err, *needles)
    assert not out.exists() and not marker.exists()
