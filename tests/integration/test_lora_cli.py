"""A LoRA run through the CLI: the first line counts what trains, the outputs are the adapters (hf_adapter/, a
checkpoint of the adapters only), and a resume against another base, or as a full fine-tune, is refused naming
both (exit 2, one line). The merged export and the converters, on a dense and on an MoE model."""

from __future__ import annotations

import json

import pytest

from tests.integration.test_checkpoint import cli

LORA = ["model.lora.rank=4", "trainer.max_steps=2", "trainer.checkpoint.every_steps=2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora_cli")
    done = cli(tmp, "run", *LORA, "trainer.export_hf=true")
    return tmp, tmp / "run", done


def _check_merged_equals_the_adapter(peft, run, base) -> None:
    """The merged export's logits equal the base + hf_adapter/ in PEFT's, and differ from the base's."""
    import torch
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 2000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(run / "hf").eval()(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base).eval()
        before = plain(input_ids=ids).logits
        with_adapter = peft.PeftModel.from_pretrained(plain, run / "hf_adapter").eval()(input_ids=ids).logits
    assert (merged - before).abs().max() > 1e-3  # the adapters trained and were merged
    torch.testing.assert_close(merged, with_adapter, rtol=1e-4, atol=1e-4)


def test_outputs_are_the_adapters(run):
    tmp, out, done = run
    # 2 layers x (qkv 3x4x64 + 4x128, proj 2x4x64, gate+up 2x(4x64 + 4x128), down 4x128 + 4x64) = 8192
    assert "LoRA rank 4: trainable 8.2K of 344.4K, 2.38%" in done.stdout, done.stdout
    config = json.loads((out / "hf_adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and not (out / "hf").exists()
    assert "hf_adapter/ (PEFT adapter)" in done.stdout


@pytest.mark.parametrize("change,needle", [
    (["trainer.seed=7"], "holds LoRA adapters trained on initialised from trainer.seed=1234 (hash "),
    (["model.lora.rank=0"], "is a LoRA run's (adapters only); this run trains every parameter"),
])
def test_a_resume_on_another_base_is_refused(run, change, needle):
    tmp, out, _ = run
    done = cli(tmp, "run", *LORA[:1], "trainer.max_steps=3", *change, check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in done.stderr, done.stderr[-2000:]


def test_merged_export_and_the_converters(tmp_path):
    """On an HF base (a short full run's export): hf/ (trainer.export_merged) gives the logits of PEFT's model
    with hf_adapter/ on the base; merge-lora and lora-to-peft rebuild the same two from the checkpoint; and
    meshtron-to-hf refuses the adapters-only checkpoint in one line."""
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    peft = pytest.importorskip("peft")
    cli(tmp_path, "base", "trainer.max_steps=2", "trainer.export_hf=true")
    base = tmp_path / "base" / "hf"
    cli(tmp_path, "lora", f"model.hf_path={base}", *LORA, "trainer.export_hf=true", "trainer.export_merged=true",
        "optim.lr=3e-2")
    run = tmp_path / "lora"
    _check_merged_equals_the_adapter(peft, run, base)

    def convert(*argv):
        return subprocess.run([sys.executable, "-m", "checkpoint_convert", *argv], capture_output=True, text=True,
                              timeout=300)

    assert convert("lora-to-peft", "--checkpoint", str(run / "checkpoints"), "--out", str(tmp_path / "peft")
                   ).returncode == 0
    a, b = load_file(str(tmp_path / "peft" / "adapter_model.safetensors")), load_file(
        str(run / "hf_adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    done = convert("merge-lora", "--checkpoint", str(run / "checkpoints"), "--out", str(tmp_path / "merged"))
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = load_file(str(tmp_path / "merged" / "model.safetensors")), load_file(str(run / "hf" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    refused = convert("meshtron-to-hf", "--checkpoint", str(run / "checkpoints"), "--out", str(tmp_path / "x"))
    assert refused.returncode == 2 and "use lora-to-peft for a PEFT adapter or merge-lora" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def _convert(*argv):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "checkpoint_convert", *argv], capture_output=True, text=True,
                          timeout=300)


def test_moe_adapters_merge_and_load_in_peft(tmp_path):
    """An MoE model (tiny_moe: every layer 8 experts; all-linear adapts attention, every expert and the router):
    hf_adapter/ names the fused experts and the router as PEFT's target_parameters and, loaded by PEFT on the base,
    gives the logits of the merged export (trainer.export_merged); merge-lora and lora-to-peft rebuild both."""
    import torch
    from safetensors.torch import load_file

    peft = pytest.importorskip("peft")
    moe = ["model=tiny_moe", "model.moe.moe_ffn_hidden_size=32"]
    cli(tmp_path, "base", *moe, "trainer.max_steps=1", "trainer.export_hf=true")
    base = tmp_path / "base" / "hf"
    done = cli(tmp_path, "lora", *moe, f"model.hf_path={base}", *LORA, "trainer.export_hf=true",
               "trainer.export_merged=true", "optim.lr=3e-2")
    assert "LoRA rank 4: trainable" in done.stdout
    run = tmp_path / "lora"
    config = json.loads((run / "hf_adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert config["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj", "mlp.gate.weight"]
    _check_merged_equals_the_adapter(peft, run, base)

    assert _convert("lora-to-peft", "--checkpoint", str(run / "checkpoints"), "--out", str(tmp_path / "peft")
                    ).returncode == 0
    a, b = load_file(str(tmp_path / "peft" / "adapter_model.safetensors")), load_file(
        str(run / "hf_adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["target_parameters"] == \
        config["target_parameters"]
    done = _convert("merge-lora", "--checkpoint", str(run / "checkpoints"), "--out", str(tmp_path / "merged"))
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = load_file(str(tmp_path / "merged" / "model.safetensors")), load_file(str(run / "hf" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


def test_an_moe_refusal_is_one_line_exit_2(tmp_path):
    done = cli(tmp_path, "refused", "model=tiny_moe", "model.lora.rank=4", "model.lora.dropout=0.1", check=False)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "model.lora.dropout=0.1 with an MoE model and target linear_fc1" in lines[0]


def test_an_nf4_refusal_is_one_line_exit_2(tmp_path):
    pytest.importorskip("torchao")
    done = cli(tmp_path, "refused", "model.lora.rank=4", "trainer.precision=bf16", "model.lora.base_dtype=bf16",
               "model.lora.base_quant=nf4", "parallel.compile=true", check=False)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "model.lora.base_quant=nf4 with parallel.compile=true is not supported" in lines[0]
