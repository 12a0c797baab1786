"""`python -m trainer` end to end on the tiny model and the bundled corpus, on CPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

FAST = [
    "data.seq_len=64",
    "trainer.global_batch_size=8",
    "parallel.microbatch_size=4",
    "trainer.eval_every=0",
    "logging.wandb=false",
    "trainer.export_hf=false",
]


def run_trainer(tmp_path: Path, *overrides: str, out: str = "run", check: bool = True,
                extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs the CLI from tmp_path (not the repo), so conf/ must come from the installed package."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "WANDB_MODE": "disabled",
           **(extra_env or {})}
    cmd = [sys.executable, "-m", "trainer", f"trainer.output_dir={tmp_path / out}", *overrides]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"trainer failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_on_bundled_corpus(tmp_path):
    """The loss at step 40 is at least 20% below the first step's, with the default tiny config."""
    proc = run_trainer(tmp_path, "trainer.max_steps=40", "trainer.eval_every=20", "trainer.eval_batches=2",
                       "logging.wandb=false", "trainer.export_hf=false")
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 41))
    first, last = rows[0]["loss"], rows[-1]["loss"]
    assert last <= 0.8 * first, (first, last)
    for r in rows:
        assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"} <= r.keys()
        assert r["tokens"] == r["step"] * 16 * 256 and r["tokens_per_s"] > 0
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [20, 40]
    assert evals[1]["val_loss"] < evals[0]["val_loss"]
    assert "tok/s" in proc.stdout and "eta" in proc.stdout and "Outputs in" in proc.stdout
    ready = re.search(r"ready in ([\d.]+) s \(import ([\d.]+) s, data index ([\d.]+) s, model init ([\d.]+) s, "
                      r"weights ([\d.]+) s\)", proc.stdout)
    assert ready, proc.stdout[:3000]
    total, *phases = map(float, ready.groups())
    assert 0 < total and abs(total - sum(phases)) <= 0.2 and phases[0] > 0  # python + torch take time to import


def test_same_seed_same_losses_and_lr_schedule(tmp_path):
    args = [*FAST, "trainer.max_steps=6", "optim.warmup_steps=2", "optim.decay=linear"]
    run_trainer(tmp_path, *args, out="a")
    run_trainer(tmp_path, *args, out="b")
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
    lrs = [r["lr"] for r in a]
    assert lrs[0] == pytest.approx(1.5e-3) and lrs[1] == pytest.approx(3e-3)  # warmup over 2 steps
    assert lrs[-1] == pytest.approx(3e-4)  # linear decay ends at min_lr


def test_resolved_config_written_without_secrets(tmp_path):
    secret = "wandb-key-that-must-not-leak-0123456789"
    run_trainer(tmp_path, *FAST, "trainer.max_steps=1", f"logging.wandb_api_key={secret}")
    run_dir = tmp_path / "run"
    text = (run_dir / "config.yaml").read_text()
    saved = yaml.safe_load(text)
    assert saved["logging"]["wandb_api_key"] == "<redacted>"
    assert saved["trainer"]["max_steps"] == 1 and saved["data"]["seq_len"] == 64
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert secret not in path.read_text(errors="ignore"), path


def test_config_error_exits_before_writing(tmp_path):
    proc = run_trainer(tmp_path, *FAST, "model.num_attention_heads=6", "model.num_query_groups=4",
                       "model.hidden_size=96", check=False)
    assert proc.returncode == 2
    assert "num_attention_heads=6" in proc.stderr and "num_query_groups=4" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_unknown_key_fails_naming_it(tmp_path):
    """Hydra's own override errors are configuration errors too: exit 2, one line naming the override."""
    proc = run_trainer(tmp_path, "trainer.maxsteps=3", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("meshtron: configuration error: override 'trainer.maxsteps=3'")


def test_bf16_autocast_trains(tmp_path):
    run_trainer(tmp_path, *FAST, "trainer.max_steps=3", "trainer.precision=bf16")
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == 3 and all(r["loss"] == r["loss"] for r in rows)  # finite, not NaN


def test_wandb_offline_logs_the_run(tmp_path):
    pytest.importorskip("wandb")
    run_trainer(tmp_path, *FAST, "trainer.max_steps=2", "logging.wandb=true",
                extra_env={"WANDB_MODE": "offline", "WANDB_API_KEY": ""})
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1


@pytest.mark.slow
def test_hf_export_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    run_trainer(tmp_path, *FAST[:-1], "trainer.max_steps=2")
    hf_dir = tmp_path / "run" / "hf"
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ids = tok("def main():", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5
    assert torch.isfinite(model(ids).logits).all()


def test_trains_from_hf_checkpoint_and_torchrun(tmp_path):
    """model.hf_path: shape from config.json, weights from safetensors, tokenizer from the directory; the
    first logged loss is transformers' own loss on the same batch. Launched through torchrun."""
    transformers = pytest.importorskip("transformers")
    import torch

    from trainer.assets import BUNDLED_TOKENIZER
    from trainer.config import DataConfig
    from trainer.data.build import build_split
    from trainer.data.loader import GlobalBatchLoader
    from trainer.data.pretrain import default_cache_dir
    from trainer.data.tokenizer import load_tokenizer

    hf_dir = tmp_path / "hf_llama"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=True)
    hf_model = transformers.LlamaForCausalLM(config).eval()
    hf_model.save_pretrained(hf_dir)
    tok = transformers.AutoTokenizer.from_pretrained(BUNDLED_TOKENIZER)
    tok.save_pretrained(hf_dir)

    args = [*FAST, "trainer.max_steps=2", f"model.hf_path={hf_dir}", "optim.warmup_steps=0"]
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "WANDB_MODE": "disabled"}
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "1",
           "-m", "trainer", f"trainer.output_dir={tmp_path / 'run'}", *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["hidden_size"] == 64 and saved["model"]["tie_word_embeddings"] is True

    # The same first step's batch, as the trainer draws it, scored by transformers one packed document at a
    # time (each document attends only to itself).
    data_cfg = DataConfig(seq_len=64)
    rows = build_split(data_cfg, load_tokenizer(data_cfg, str(hf_dir)), "train",
                       default_cache_dir(DataConfig(cache_dir=str(tmp_path / "cache" / "meshtron")))).rows
    batch = next(iter(GlobalBatchLoader(rows, 8, seed=1234, prefetch=0)))
    total, count = 0.0, 0
    with torch.no_grad():
        for r in range(batch["input_ids"].shape[0]):
            for d in batch["document_ids"][r].unique():
                piece = batch["document_ids"][r] == d
                if d < 0:
                    continue
                ids, labels = batch["input_ids"][r][piece][None], batch["labels"][r][piece]
                logits = hf_model(ids).logits[0]
                total += float(torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100,
                                                                 reduction="sum"))
                count += int((labels != -100).sum())
    expected = total / count
    first = read_metrics(tmp_path / "run")[0]["loss"]
    assert first == pytest.approx(expected, rel=1e-5)


def test_trains_without_wandb_installed_with_one_warning(tmp_path):
    """logging.wandb defaults to true; without the package the run says so once at start-up and trains."""
    site = tmp_path / "site"
    site.mkdir()
    # sys.modules["wandb"] = None: `import wandb` fails and importlib.util.find_spec("wandb") is None, as when
    # the package is absent.
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['wandb'] = None\n")
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    env["PYTHONPATH"] = os.pathsep.join([str(site)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    overrides = [o for o in FAST if not o.startswith("logging.wandb")]
    cmd = [sys.executable, "-m", "trainer", f"trainer.output_dir={tmp_path / 'run'}", "trainer.max_steps=2",
           *overrides]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if "wandb" in line]
    assert len(warnings) == 1 and "wandb is not installed" in warnings[0] and "logging.wandb=false" in warnings[0]
    assert proc.stdout.index("ready in") > 0 and "Traceback" not in proc.stderr
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["logging"]["wandb"] is False
    assert not (tmp_path / "run" / "wandb").exists()


def test_help_prints_meshtrons_usage_before_hydras(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "trainer", "--help"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert out.startswith("usage: python -m trainer [group=preset ...] [key=value ...]")
    assert re.search(r"^  model +.*\btiny, tiny_moe$", out, re.M) and re.search(r"^  parallel +.*\btp2_pp2\b", out, re.M)
    assert "README.md" in out and out.index("Hydra's own help follows") < out.index("powered by Hydra")
    assert not (tmp_path / "outputs").exists()  # help trains nothing
