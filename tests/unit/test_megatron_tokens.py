"""Special tokens and the tokenizer through HF -> Megatron -> HF without --hf-config (both formats): the ids come
from what the Megatron checkpoint records, never transformers' defaults; where it records none, config.json gets
null and one line says so."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch

from checkpoint_convert.cli import main as convert
from checkpoint_convert.megatron_tokenizer import TOKEN_IDS, special_tokens
from tests.tiny_hf import save_tiny_hf

ASSETS = Path(__file__).resolve().parents[2] / "trainer" / "assets" / "tokenizer"
# The bundled tokenizer's own ids: <|bos|> 0, <|eos|> 1, <|pad|> 2 (transformers' Llama defaults are 1, 2, None).
BUNDLED = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}


def _hf_dir(path: Path, ids: dict, tokenizer: bool = True) -> Path:
    save_tiny_hf("llama3.1", path)
    for name in ("config.json", "generation_config.json"):
        raw = json.loads((path / name).read_text())
        raw.update(ids)
        (path / name).write_text(json.dumps(raw, indent=2))
    if tokenizer:
        for f in ASSETS.iterdir():
            shutil.copyfile(f, path / f.name)
    return path


def _ids(hf: Path) -> dict:
    raw = json.loads((hf / "config.json").read_text())
    return {k: raw.get(k) for k in TOKEN_IDS}


def _to_megatron(src: Path, out: Path, fmt: str, capsys) -> Path:
    layout = ["--tp", "2", "--pp", "2"] if fmt == "torch" else []
    assert convert(["hf-to-megatron", "--hf", str(src), "--out", str(out), "--format", fmt, "--no-progress",
                    *layout]) == 0, capsys.readouterr().err
    return out


def _rewrite_args(meg: Path, **changes) -> None:
    """Edit the args of every file that holds them (our own files, so a full load is fine here)."""
    for f in [*meg.glob("release/mp_rank_*/model_optim_rng.pt"), *meg.glob("release/common.pt")]:
        state = torch.load(f, map_location="cpu", weights_only=False)
        for k, v in changes.items():
            if v is None:
                vars(state["args"]).pop(k, None)
            else:
                setattr(state["args"], k, v)
        torch.save(state, f)


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
@pytest.mark.parametrize("ids", [BUNDLED, {"bos_token_id": 5, "eos_token_id": [1, 3], "pad_token_id": None}],
                         ids=["bundled", "config-differs-from-tokenizer"])
def test_round_trip_keeps_config_ids_and_tokenizer(tmp_path, capsys, fmt, ids):
    src = _hf_dir(tmp_path / "hf", ids)
    meg = _to_megatron(src, tmp_path / "meg", fmt, capsys)
    assert convert(["megatron-to-hf", "--megatron", str(meg), "--out", str(tmp_path / "back"),
                    "--no-progress"]) == 0
    back = tmp_path / "back"
    assert _ids(back) == _ids(src) == ids
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (back / name).read_bytes() == (src / name).read_bytes(), name
    assert "special-token" not in capsys.readouterr().err

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(back))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_ids_from_a_local_hf_tokenizer_the_args_name(tmp_path, capsys, fmt):
    """A Megatron-LM checkpoint of our users: HuggingFaceTokenizer and a local tokenizer_model, no ids recorded."""
    src = _hf_dir(tmp_path / "hf", {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None})
    meg = _to_megatron(src, tmp_path / "meg", fmt, capsys)
    elsewhere = shutil.move(str(meg / "hf"), str(tmp_path / "tok"))
    _rewrite_args(meg, meshtron_token_ids=None, tokenizer_model=elsewhere)
    assert convert(["megatron-to-hf", "--megatron", str(meg), "--out", str(tmp_path / "back"),
                    "--no-progress"]) == 0
    assert _ids(tmp_path / "back") == BUNDLED  # the tokenizer's, not config.json's defaults-like 1, 2
    assert (tmp_path / "back" / "tokenizer.json").read_bytes() == (ASSETS / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_nothing_recorded_writes_null_ids_and_says_so_in_one_line(tmp_path, capsys, fmt):
    src = _hf_dir(tmp_path / "hf", BUNDLED)
    meg = _to_megatron(src, tmp_path / "meg", fmt, capsys)
    shutil.rmtree(meg / "hf")
    _rewrite_args(meg, meshtron_token_ids=None, tokenizer_model="meta-llama/Llama-3.2-1B")
    capsys.readouterr()
    assert convert(["megatron-to-hf", "--megatron", str(meg), "--out", str(tmp_path / "back"),
                    "--no-progress"]) == 0
    back = tmp_path / "back"
    assert _ids(back) == dict.fromkeys(TOKEN_IDS)
    gen = json.loads((back / "generation_config.json").read_text())
    assert not any(gen.get(k) is not None for k in TOKEN_IDS), gen
    assert not list(back.glob("tokenizer*"))
    notes = [line for line in capsys.readouterr().err.splitlines() if "special-token" in line]
    assert len(notes) == 1 and "'meta-llama/Llama-3.2-1B' is not a local directory" in notes[0]
    assert "--hf-config" in notes[0]


def test_hf_source_without_a_tokenizer_keeps_its_config_ids(tmp_path, capsys):
    src = _hf_dir(tmp_path / "hf", BUNDLED, tokenizer=False)
    meg = _to_megatron(src, tmp_path / "meg", "torch_dist", capsys)
    assert not (meg / "hf" / "tokenizer.json").exists()
    assert convert(["megatron-to-hf", "--megatron", str(meg), "--out", str(tmp_path / "back"),
                    "--no-progress"]) == 0
    assert _ids(tmp_path / "back") == BUNDLED


@pytest.mark.parametrize("args,ids,note", [
    (dict(tokenizer_type="NullTokenizer", vocab_size=256), {"eos_token_id": 256}, None),
    (dict(tokenizer_type="GPT2BPETokenizer", vocab_file="/data/gpt2-vocab.json"), {},
     "tokenizer_type='GPT2BPETokenizer' is not an HF tokenizer"),
    (dict(tokenizer_type="Llama2Tokenizer", tokenizer_model="/data/tokenizer.model"), {},
     "tokenizer_type='Llama2Tokenizer' with tokenizer_model='/data/tokenizer.model' is not an HF tokenizer"),
    (dict(), {}, "its args name no tokenizer"),
])
def test_what_other_megatron_tokenizers_record(tmp_path, args, ids, note):
    tokens = special_tokens(argparse.Namespace(**args), tmp_path)
    assert tokens.ids == {**dict.fromkeys(TOKEN_IDS), **ids} and tokens.source is None
    assert (tokens.note is None) if note is None else (note in tokens.note and "\n" not in tokens.note)


def test_an_unloadable_tokenizer_directory_is_said_not_raised(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "tokenizer.json").write_text("{not json")
    tokens = special_tokens(argparse.Namespace(tokenizer_type="HuggingFaceTokenizer"), tmp_path)
    assert tokens.ids == dict.fromkeys(TOKEN_IDS) and "transformers cannot load the tokenizer" in tokens.note
