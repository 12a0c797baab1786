"""A LoRA run through the CLI: the first line counts what trains, the outputs are the adapters (hf_adapter/, a
checkpoint of the adapters only), and a resume against another base, or as a full fine-tune, is refused naming
both (exit 2, one line)."""

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
