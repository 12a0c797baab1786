"""conf/experiment/: the real-run presets compose on top of conf/config.yaml's defaults (`+experiment=NAME`),
carry the GPU-step settings, and pass `trainer.launch --dry-run`'s checks at the world size they launch."""

from __future__ import annotations

import json
import sys

import pytest

from trainer.loop import cfg_param_count

# name -> (nodes, gpus per node, model group, approximate parameter count)
PRESETS = {
    "llama3_8b_8gpu": (1, 8, "llama3_8b", 8.03e9),
    "llama3_70b_64gpu": (8, 8, "llama3_70b", 70.55e9),
    "qwen2_5_7b_sft_8gpu": (1, 8, "qwen2_5_7b", 7.62e9),
}


def dry_run(capsys, monkeypatch, *overrides: str) -> tuple[int, str, str]:
    """`python -m trainer.launch --dry-run ...` in this process: (exit code, stdout, stderr)."""
    from trainer.launch import main

    monkeypatch.setattr(sys, "argv", ["trainer.launch", "--dry-run", *overrides])
    with pytest.raises(SystemExit) as done:
        main()
    out = capsys.readouterr()
    return done.value.code or 0, out.out, out.err


@pytest.fixture
def qwen_ckpt(tmp_path):
    """A Qwen2.5-7B checkpoint directory as far as a dry run reads it: its config.json (the published one)."""
    from transformers import Qwen2Config

    path = tmp_path / "Qwen2.5-7B"
    Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072,
                rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False).save_pretrained(path)
    assert json.loads((path / "config.json").read_text())["model_type"] == "qwen2"
    return path


@pytest.mark.parametrize("name", PRESETS)
def test_preset_composes_with_the_gpu_step_settings(compose, name):
    nodes, gpus, model, params = PRESETS[name]
    cfg = compose(f"+experiment={name}")
    assert cfg.model.name == model
    assert cfg_param_count(cfg) == pytest.approx(params, rel=0.01)  # the published shape, not the tiny default
    assert cfg.trainer.precision == "bf16" and cfg.trainer.device == "cuda"
    assert cfg.parallel.activation_checkpoint in ("full", "selective") and cfg.parallel.compile
    assert cfg.data.seq_len == 8192 and cfg.parallel.microbatch_size == 1
    assert cfg.model.attention_backend == "auto"
    assert (cfg.launcher.nodes, cfg.launcher.gpus_per_node) == (nodes, gpus)
    assert cfg.optim.warmup_steps > 0 and cfg.optim.lr < 1e-3
    # Rows of the global batch per data-parallel rank are a whole number of micro-batches.
    dp = nodes * gpus // (cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp)
    assert cfg.trainer.global_batch_size % (dp * cfg.parallel.microbatch_size) == 0


def test_command_line_overrides_win_over_a_preset(compose):
    cfg = compose("+experiment=llama3_8b_8gpu", "optim.lr=1e-4", "parallel.compile=false")
    assert cfg.optim.lr == 1e-4 and not cfg.parallel.compile and cfg.trainer.precision == "bf16"


def test_sft_preset_trains_chat_data_on_assistant_turns(compose):
    cfg = compose("+experiment=qwen2_5_7b_sft_8gpu")
    assert cfg.data.format == "messages" and cfg.data.train_on == "all_assistant" and cfg.data.packing
    assert cfg.model.family == "qwen2" and cfg.model.add_qkv_bias


@pytest.mark.parametrize("name", ["llama3_8b_8gpu", "llama3_70b_64gpu"])
def test_pretraining_preset_dry_run_at_its_world_size(tmp_path, capsys, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    nodes, gpus, _, _ = PRESETS[name]
    code, script, err = dry_run(capsys, monkeypatch, f"+experiment={name}")
    assert code == 0, err
    assert f"#SBATCH --nodes={nodes}\n" in script and f"#SBATCH --gpus-per-node={gpus}\n" in script
    block = script.split("# >>> meshtron overrides\n")[1].split("# <<< meshtron overrides")[0]
    assert f"  +experiment={name} \\\n" in block  # the job composes the same preset
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # a dry run writes nothing


def test_sft_preset_dry_run_reads_the_checkpoint_shape(tmp_path, capsys, monkeypatch, qwen_ckpt):
    monkeypatch.chdir(tmp_path)
    code, script, err = dry_run(capsys, monkeypatch, "+experiment=qwen2_5_7b_sft_8gpu", f"model.hf_path={qwen_ckpt}")
    assert code == 0, err
    assert "#SBATCH --nodes=1\n" in script and f"model.hf_path={qwen_ckpt}" in script


def test_preset_layout_is_checked_against_a_smaller_allocation(tmp_path, capsys, monkeypatch):
    """70B's tp=8 cannot fit 4 GPUs: refused before anything is written, naming both numbers."""
    monkeypatch.chdir(tmp_path)
    code, out, err = dry_run(capsys, monkeypatch, "+experiment=llama3_70b_64gpu", "launcher.nodes=1",
                             "launcher.gpus_per_node=4")
    assert code == 2 and out == ""
    assert "= 4 GPUs, but the parallel mesh needs a multiple of 8" in err


def test_preset_checks_model_against_tensor_parallelism(tmp_path, capsys, monkeypatch):
    """The model's shape is validated at the launch layout: 28 heads of Qwen2.5-7B do not split over tp=8."""
    monkeypatch.chdir(tmp_path)
    code, _, err = dry_run(capsys, monkeypatch, "+experiment=qwen2_5_7b_sft_8gpu", "parallel.tp=8")
    assert code == 2 and "model.num_attention_heads=28 is not divisible by parallel.tp=8" in err, err


def test_dpo_preset_trains_packed_pairs_of_an_8b_model_and_passes_a_dry_run(compose, tmp_path, capsys, monkeypatch):
    cfg = compose("+experiment=dpo_8gpu")
    assert cfg.model.name == "llama3_8b" and cfg_param_count(cfg) == pytest.approx(8.03e9, rel=0.01)
    assert cfg.trainer.objective == "dpo" and cfg.data.format == "preference" and cfg.data.packing
    assert cfg.data.seq_len == 4096 and cfg.dpo.reference == "precompute" and cfg.trainer.precision == "bf16"
    assert (cfg.parallel.dp_shard, cfg.launcher.gpus_per_node) == (-1, 8)
    monkeypatch.chdir(tmp_path)
    code, script, err = dry_run(capsys, monkeypatch, "+experiment=dpo_8gpu")
    assert code == 0, err
    assert "#SBATCH --gpus-per-node=8\n" in script and "  +experiment=dpo_8gpu \\\n" in script
    assert sorted(p.name for p in tmp_path.iterdir()) == []
