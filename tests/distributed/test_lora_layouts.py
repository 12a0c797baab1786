"""LoRA under every layout: `torchrun -m trainer` with model.lora.rank > 0 trains the same adapters as one process
(3 steps, fp32: losses within 1e-5 relative, every exported adapter tensor within 1e-5), from the same initial
weights. Under tp2 with sequence parallelism the replicated factors (A of the column-parallel bases, B of the
row-parallel ones) get their gradient only through the reduction over tp that DTensor's placements give
(trainer/lora.py): without it those tensors, and the losses after step 1, differ. Also: a same-layout resume is
bitwise, and a run saved at tp2 resumes at fsdp2. On an MoE model (all-linear: attention, every expert's adapter
and the router's) expert parallelism keeps each expert's adapter with its expert and trains the same."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from tests.distributed.test_mesh_matrix import MODEL, MOE, RUN, TIED, _losses, _run, reference  # noqa: F401

LORA = ["model.lora.rank=4", "model.lora.alpha=8", "trainer.checkpoint.save_before_export=false"]
CASES = [
    ("fsdp2", 2, ["parallel=fsdp"], []),
    ("hsdp2x2", 4, ["parallel=hsdp"], TIED),
    ("tp2_sp", 2, ["parallel=tp2"], []),
    ("tp2_no_sp_tied", 2, ["parallel=tp2", "parallel.sequence_parallel=false"], TIED),
    ("pp2_1f1b", 2, ["parallel=fsdp", "parallel.dp_shard=1", "parallel.pp=2", "parallel.pp_schedule=1f1b"], TIED),
    ("cp2", 2, ["parallel=fsdp", "parallel.dp_shard=1", "parallel.cp=2"], []),
    ("fsdp2_tp2", 4, ["parallel=tp2"], TIED),
    pytest.param("4d_16ranks", 16, ["parallel=4d_16ranks"], TIED, marks=pytest.mark.slow),
    # 8 experts over 2 ranks, each rank's 4 experts' adapters sharded with them (Shard(0) over ep).
    ("ep2_moe", 2, ["parallel=fsdp", "parallel.ep=2"], MOE),
]


def _adapters(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "hf_adapter" / "adapter_model.safetensors"))


@pytest.mark.distributed
@pytest.mark.parametrize("name,nproc,parallel,variant", CASES)
def test_lora_layout_matches_one_process(reference, name, nproc, parallel, variant):
    ref, tmp = reference([*LORA, *variant])
    run = _run(tmp, name, nproc, [*MODEL, *RUN, *LORA, *variant, *parallel])
    for step, (a, b) in enumerate(zip(_losses(run), _losses(ref)), start=1):
        assert a == pytest.approx(b, rel=1e-5), f"{name}: step {step} loss {a} vs one process {b}"
    ours, theirs = _adapters(run), _adapters(ref)
    # Per layer 14 PEFT tensors: dense q, k, v, o, gate, up, down; MoE q, k, v, o, gate_up, down (experts), router.
    assert ours.keys() == theirs.keys() and len(ours) == 14 * 4
    assert ("mlp.experts.base_layer.lora_A.weight" in " ".join(ours)) == (variant == MOE)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"{name}: {k}: {m}")
        if "lora_B" in k:
            assert torch.count_nonzero(ours[k]), k  # trained
    assert "LoRA rank 4: trainable" in (run / "console.log").read_text()


@pytest.mark.distributed
def test_resume_is_bitwise_and_reshards(tmp_path):
    """Straight 3 steps at tp2 vs 2 steps + resume; and the step-2 checkpoint of the tp2 run resumed at fsdp2."""
    # A constant LR: the 2-step run's schedule is then the 3-step run's first two steps.
    ckpt = ["trainer.checkpoint.every_steps=2", "optim.decay=constant"]
    straight = _run(tmp_path, "straight", 2, [*MODEL, *RUN, *LORA, *ckpt, "parallel=tp2"])
    part = _run(tmp_path, "part", 2, [*MODEL, *[r for r in RUN if "max_steps" not in r], "trainer.max_steps=2",
                                      *LORA, *ckpt, "parallel=tp2", "trainer.export_hf=false"])
    saved = part / "checkpoints" / "step_2"
    assert (saved / "COMPLETE").is_file()
    # What it trains only: the adapters (no base tensor), their optimizer state, the run files.
    meta = dcp.FileSystemReader(str(saved)).read_metadata().state_dict_metadata
    assert {k for k in meta if k.startswith("model.")} == {f"model.{k}" for k in _our_adapter_names()}
    assert json.loads((saved / "COMPLETE").read_text())["files"]
    resumed = _run(tmp_path, "part", 2, [*MODEL, *RUN, *LORA, *ckpt, "parallel=tp2"])
    assert _losses(resumed) == _losses(straight)
    a, b = _adapters(resumed), _adapters(straight)
    assert all(torch.equal(a[k], b[k]) for k in b)
    elsewhere = _run(tmp_path, "elsewhere", 2, [*MODEL, *RUN, *LORA, "optim.decay=constant", "parallel=fsdp",
                                                f"trainer.checkpoint.load_from={saved}"])
    assert f"resumed from {saved} at step 2" in (elsewhere / "console.log").read_text()
    assert _losses(elsewhere)[-1] == pytest.approx(_losses(straight)[-1], rel=1e-5)
    c = _adapters(elsewhere)
    for k in b:
        torch.testing.assert_close(c[k], b[k], rtol=1e-5, atol=1e-5)


def _our_adapter_names() -> set[str]:
    layers, names = 4, set()
    for i in range(layers):
        p = f"decoder.layers.{i}"
        for part in "qkv":
            names |= {f"{p}.self_attention.linear_qkv.lora_A_{part}", f"{p}.self_attention.linear_qkv.lora_B_{part}"}
        for m in ("self_attention.linear_proj", "mlp.linear_fc1_gate", "mlp.linear_fc1_up", "mlp.linear_fc2"):
            names |= {f"{p}.{m}.lora_A", f"{p}.{m}.lora_B"}
    return names
