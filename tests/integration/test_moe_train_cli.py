"""`python -m trainer model.hf_path=<tiny Qwen3-MoE>` on CPU: trains 3 steps with the router metrics in
metrics.jsonl, keeps a command-line MoE setting next to the checkpoint's, and exports per-expert HF names that
transformers loads."""

from __future__ import annotations

import math

import pytest
import yaml

from tests.integration.test_train_cli import FAST, read_metrics, run_trainer


def test_moe_trains_from_hf_and_exports(tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch
    from safetensors import safe_open

    from trainer.assets import BUNDLED_TOKENIZER

    hf_dir = tmp_path / "hf_qwen3_moe"
    torch.manual_seed(0)
    # Layer 0 dense, layer 1 MoE; the bundled tokenizer's vocabulary of 2048.
    config = transformers.Qwen3MoeConfig(vocab_size=2048, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=16, max_position_embeddings=256, num_experts=4,
                                         num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[0],
                                         norm_topk_prob=True, router_aux_loss_coef=0.01)
    transformers.Qwen3MoeForCausalLM(config).save_pretrained(hf_dir)
    transformers.AutoTokenizer.from_pretrained(BUNDLED_TOKENIZER).save_pretrained(hf_dir)

    run_trainer(tmp_path, *[a for a in FAST if a != "trainer.export_hf=false"], "trainer.max_steps=3",
                f"model.hf_path={hf_dir}", "optim.warmup_steps=0", "model.moe.moe_z_loss_coeff=0.001")
    run = tmp_path / "run"
    assert "<redacted>" not in (run / "config.yaml").read_text()  # no MoE key reads as a secret
    saved = yaml.safe_load((run / "config.yaml").read_text())["model"]
    assert saved["family"] == "qwen3_moe" and saved["moe"]["moe_layer_freq"] == [0, 1]
    assert saved["moe"]["moe_aux_loss_coeff"] == 0.01 and saved["moe"]["moe_z_loss_coeff"] == 0.001

    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["loss"] < rows[0]["loss"]
    for r in rows:
        assert r["moe_imbalance_layer"] == 1 and r["moe_load_imbalance"] >= 1.0
        assert r["moe_aux_loss"] > 0 and r["moe_z_loss"] > 0

    with safe_open(str(run / "hf" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    experts = {f"model.layers.1.mlp.experts.{e}.{p}.weight" for e in range(4) for p in ("gate_proj", "up_proj",
                                                                                      "down_proj")}
    assert experts <= names
    assert "model.layers.1.mlp.gate.weight" in names and "model.layers.0.mlp.gate_proj.weight" in names
    model = transformers.AutoModelForCausalLM.from_pretrained(run / "hf").eval()
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 2048, (1, 16))).logits).all()


def test_the_tiny_moe_preset_trains_as_the_readme_says(tmp_path):
    """`python -m trainer model=tiny_moe`: the runnable MoE example of the README, on the bundled corpus."""
    run_trainer(tmp_path, *FAST, "model=tiny_moe", "trainer.max_steps=4", "optim.warmup_steps=0")
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] < rows[0]["loss"]
    assert all(r["moe_aux_loss"] > 0 and r["moe_load_imbalance"] >= 1.0 for r in rows)
