"""Damaged inputs (safetensors, their index, config.json, tokenizer files) fail as a DamagedFileError naming the
file, what is wrong and what to do: the message the entry points print in one line with exit 2."""

from __future__ import annotations

import json
import re
import shutil
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from checkpoint_convert.hf import check_hf_checkpoint, read_hf_config
from checkpoint_convert.safetensors_files import open_safetensors
from tests.tiny_hf import save_tiny_hf
from trainer.config import DataConfig
from trainer.errors import ConfigError, DamagedFileError


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hf") / "llama"
    save_tiny_hf("llama3.1", d)
    return d


def _open(path: Path) -> None:
    with ExitStack() as stack:
        open_safetensors(path, stack)


@pytest.mark.parametrize("damage,needles", [
    (lambda raw: raw[:len(raw) // 2], ["not a readable safetensors file", "file not fully covered"]),
    (lambda raw: raw + b"\0" * 8, ["not a readable safetensors file", "file not fully covered"]),
    (lambda raw: raw[:20], ["20 bytes", "invalid header length"]),
    (lambda raw: b"", ["0 bytes", "header too small"]),
    (lambda raw: bytes(range(256)) * 4, ["1024 bytes", "header too large"]),
])
def test_damaged_safetensors_are_named_with_the_reason(good, tmp_path, damage, needles):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(damage((good / "model.safetensors").read_bytes()))
    with pytest.raises(DamagedFileError) as err:
        _open(bad)
    msg = str(err.value)
    assert msg.startswith(f"{bad}: ") and err.value.path == str(bad) and "\n" not in msg
    assert "truncated or corrupt" in msg and "again" in msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    _open(good / "model.safetensors")  # the intact file opens


def test_git_lfs_pointer_says_to_pull(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 2471645608\n")
    with pytest.raises(DamagedFileError, match=re.escape(f"{bad}: is a Git LFS pointer, not the weights; run "
                                                         f"`git lfs pull` in {tmp_path}")):
        _open(bad)


def _sharded(tmp_path: Path) -> Path:
    d = tmp_path / "sharded"
    d.mkdir()
    save_file({"a": torch.zeros(2)}, str(d / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.ones(2)}, str(d / "model-00002-of-00002.safetensors"))
    index = {"metadata": {"total_size": 16}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                                            "b": "model-00002-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return d


def test_damaged_or_incomplete_shard_index(good, tmp_path):
    d = _sharded(tmp_path)
    shutil.copy(good / "config.json", d / "config.json")
    index = d / "model.safetensors.index.json"
    text = index.read_text()
    index.write_text(text[:30])
    with pytest.raises(DamagedFileError, match=re.escape(f"{index}: not valid JSON (") + ".*truncated or corrupt"):
        check_hf_checkpoint(d)
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(DamagedFileError, match=re.escape(f"{index}: has no weight_map")):
        check_hf_checkpoint(d)
    index.write_text(text)
    (d / "model-00002-of-00002.safetensors").unlink()  # an interrupted download
    with pytest.raises(DamagedFileError, match=r"model-00002-of-00002.safetensors: does not exist; the checkpoint is "
                                               r"incomplete"):
        check_hf_checkpoint(d)


def test_hf_directory_problems_are_config_errors(good, tmp_path):
    nope = tmp_path / "nope"
    with pytest.raises(ConfigError, match=re.escape(f"{nope} is not a directory; expected an HF checkpoint")):
        read_hf_config(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"has no config.json"):
        read_hf_config(empty)
    shutil.copy(good / "config.json", empty / "config.json")
    with pytest.raises(ConfigError, match=r"has neither model.safetensors nor model.safetensors.index.json.*"
                                          r"pytorch_model.bin is not read"):
        check_hf_checkpoint(empty)
    (empty / "config.json").write_text("[1, 2]")
    with pytest.raises(DamagedFileError, match=r"config.json: holds a JSON list, not an object"):
        read_hf_config(empty)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_damaged_tokenizer_file_is_named(tmp_path, name):
    from trainer.assets import BUNDLED_TOKENIZER
    from trainer.data.tokenizer import load_tokenizer

    d = tmp_path / "tok"
    shutil.copytree(BUNDLED_TOKENIZER, d)
    raw = (d / name).read_bytes()
    (d / name).write_bytes(raw[:len(raw) // 2])
    with pytest.raises(DamagedFileError) as err:
        load_tokenizer(DataConfig(tokenizer=str(d)), None)
    msg = str(err.value)
    assert msg.startswith(f"{d / name}: not valid JSON") and "\n" not in msg, msg
    assert "data.tokenizer" in msg and "copy or download the tokenizer files again" in msg
