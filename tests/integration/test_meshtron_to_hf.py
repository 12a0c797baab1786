"""HF -> meshtron (training from model.hf_path) -> HF again, at tp2 x pp2 and on one process, through the CLIs.

One tiny tied Llama (vocabulary 2100, so tensor parallelism pads it) is trained for 2 steps from its HF
directory by `torchrun -m trainer` at tp2 x pp2 and by one process. Both runs must agree (the layout starts
from the same HF weights), their checkpoints export with `meshtron-convert meshtron-to-hf`, transformers loads
the exports with the logits of meshtron's model from the same checkpoint, and `verify` says so (or fails on a
tampered copy). HF <-> Megatron through the CLI closes the loop.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoint_convert.cli import main as convert

RUN = ["data.seq_len=32", "trainer.global_batch_size=8", "trainer.max_steps=2", "trainer.eval_every=0",
       "logging.wandb=false", "optim.warmup_steps=0", "optim.lr=1e-3", "optim.min_lr=1e-4", "optim.eps=1e-6",
       "trainer.checkpoint.every_steps=2"]


def _env(tmp: Path) -> dict:
    return {**os.environ, "XDG_CACHE_HOME": str(tmp / "cache"), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def train(tmp: Path, name: str, nproc: int, *overrides: str) -> Path:
    out = tmp / name
    if nproc == 1:
        cmd = [sys.executable, "-m", "trainer"]
    else:
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", str(nproc),
               "-m", "trainer"]
    proc = subprocess.run([*cmd, f"trainer.output_dir={out}", *RUN, *overrides], cwd=tmp, env=_env(tmp),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    return out


def hf_tensors(d: Path) -> dict[str, torch.Tensor]:
    index = d / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    return {k: v for f in files for k, v in load_file(str(d / f)).items()}


@pytest.fixture(scope="module")
def hf_start(tmp_path_factory) -> Path:
    """A tiny random tied Llama in HF format with the bundled tokenizer: what a user would download."""
    import transformers

    from trainer.assets import BUNDLED_TOKENIZER

    d = tmp_path_factory.mktemp("hf_start") / "tiny-llama"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=2100, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=1)
    transformers.LlamaForCausalLM(config).save_pretrained(d)
    transformers.AutoTokenizer.from_pretrained(BUNDLED_TOKENIZER).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def single(hf_start) -> Path:
    return train(hf_start.parent, "single", 1, f"model.hf_path={hf_start}")


@pytest.fixture(scope="module")
def tp2pp2(hf_start) -> Path:
    return train(hf_start.parent, "tp2pp2", 4, f"model.hf_path={hf_start}", "parallel=tp2_pp2")


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(run: Path, ref: Path) -> None:
    assert _losses(run) == pytest.approx(_losses(ref), rel=1e-5)
    a, b = hf_tensors(run / "hf"), hf_tensors(ref / "hf")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.distributed
@pytest.mark.slow
def test_hf_path_at_tp2_pp2_matches_single_process(tp2pp2, single):
    """HF -> meshtron is `model.hf_path`: at tp2 x pp2 it starts from the same weights as one process."""
    assert_same_run(tp2pp2, single)


@pytest.mark.distributed
@pytest.mark.slow
def test_hf_path_at_fsdp2_tp2_matches_single_process(hf_start, single):
    run = train(hf_start.parent, "fsdp2tp2", 4, f"model.hf_path={hf_start}", "parallel=tp2")
    assert_same_run(run, single)


def check_export(run: Path, capsys) -> Path:
    """meshtron-to-hf of the run's latest checkpoint; transformers' logits equal meshtron's; generate runs."""
    import transformers

    from checkpoint_convert.meshtron import load_meshtron_checkpoint
    from checkpoint_convert.verify import meshtron_model

    out = run.parent / f"{run.name}-export"
    assert convert(["meshtron-to-hf", "--checkpoint", str(run / "checkpoints"), "--out", str(out),
                    "--no-progress"]) == 0
    assert f"to {out}" in capsys.readouterr().out
    for name in ("config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (out / name).is_file(), name
    assert not list(run.parent.glob(f".{out.name}.partial-*"))
    # Bitwise what the trainer itself exported at the end of the same run (same step).
    exported, final = hf_tensors(out), hf_tensors(run / "hf")
    assert exported.keys() == final.keys() and "lm_head.weight" not in exported  # tied
    assert all(torch.equal(exported[k], final[k]) for k in final)
    assert exported["model.embed_tokens.weight"].shape[0] == 2100  # tp padding removed

    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    cfg, state = load_meshtron_checkpoint(run / "checkpoints" / "step_2")
    ours = meshtron_model(cfg, state)
    ids = tok("def main():\n    print('hello')", return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (model(ids).logits - ours(ids)[..., :cfg.vocab_size]).abs().max()
    assert float(diff) <= 1e-4
    gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 4
    return out


@pytest.mark.distributed
@pytest.mark.slow
def test_tp2_pp2_checkpoint_exports_to_transformers(tp2pp2, capsys):
    out = check_export(tp2pp2, capsys)
    # verify: exit 0 on the export and its checkpoint, 1 once one tensor is off by a little.
    assert convert(["verify", "--hf", str(out), "--checkpoint", str(tp2pp2 / "checkpoints" / "step_2")]) == 0
    assert "verify: OK" in capsys.readouterr().out
    bad = out.parent / "tampered"
    shutil.copytree(out, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["model.layers.1.self_attn.k_proj.weight"][0, 0] += 0.05
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    assert convert(["verify", "--hf", str(bad), "--checkpoint", str(tp2pp2 / "checkpoints")]) == 1
    assert "verify: FAILED" in capsys.readouterr().out


def test_single_process_checkpoint_exports_to_transformers(single, capsys):
    check_export(single, capsys)


def test_console_script_exports_a_step_directory(single, tmp_path):
    """The installed `meshtron-convert` script, given one step_<N> directory; errors are one line, exit 2."""
    script = Path(sys.executable).with_name("meshtron-convert")
    if not script.exists():
        pytest.skip("meshtron-convert is not installed (pip install -e .)")
    out = tmp_path / "export"
    step = single / "checkpoints" / "step_2"
    proc = subprocess.run([str(script), "meshtron-to-hf", "--checkpoint", str(step), "--out", str(out),
                           "--no-progress", "--dtype", "bf16"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout
    assert all(t.dtype == torch.bfloat16 for t in hf_tensors(out).values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    again = subprocess.run([str(script), "meshtron-to-hf", "--checkpoint", str(step), "--out", str(out)],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "not empty" in again.stderr
    assert "Traceback" not in again.stderr and len(again.stderr.strip().splitlines()) == 1


# -------------------------------------------------------------------------------- HF <-> Megatron


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_hf_to_megatron_and_back_through_the_cli_is_bitwise(hf_start, tmp_path, capsys, fmt):
    meg, back = tmp_path / "megatron", tmp_path / "back"
    assert convert(["hf-to-megatron", "--hf", str(hf_start), "--out", str(meg), "--tp", "2", "--pp", "2",
                    "--format", fmt, "--no-progress"]) == 0
    assert (meg / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    files = {p.name for p in (meg / "release").iterdir()}
    if fmt == "torch":
        assert files == {"mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"}
    else:  # one layout-free checkpoint: megatron-core reshards it on load
        assert {".metadata", "common.pt", "metadata.json"} <= files and any(f.endswith(".distcp") for f in files)
    assert convert(["megatron-to-hf", "--megatron", str(meg), "--out", str(back), "--hf-config", str(hf_start),
                    "--no-progress"]) == 0
    a, b = hf_tensors(hf_start), hf_tensors(back)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert convert(["verify", "--hf", str(hf_start), "--megatron", str(meg)]) == 0
    assert "verify: OK" in capsys.readouterr().out
