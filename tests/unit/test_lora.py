"""LoRA on one process against its reference, PEFT: the same tiny HF model, the same initial adapters, the same
batches and the same AdamW give the same adapters after 3 steps (fp32, 1e-5); the exported adapter loads with
peft.PeftModel.from_pretrained and gives meshtron's logits; a PEFT-saved adapter loads into meshtron
(model.lora.init_from) and gives PEFT's logits. Dense and MoE families (Qwen3-MoE's experts through
torch._grouped_mm, Mixtral's through the loop; PEFT adapts transformers 5's fused experts and router with
target_parameters). Also: what is frozen, what trains, names, merging, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from parallel.collectives import clip_grad_norm_
from parallel.dims import ParallelDims
from parallel.parallelize import build_parallel_model
from tests.tiny_hf import save_tiny_hf
from trainer.errors import ConfigError
from trainer.lora import is_adapter, peft_targets, save_peft_adapter, to_peft, trainable_count
from trainer.optim import StageOptimizers
from trainer.step import forward_backward, local_batch

peft = pytest.importorskip("peft")

RANK, ALPHA, STEPS = 4, 8.0, 3
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Adam turns float noise in near-zero gradients into O(lr) updates with its default eps (as the layout matrix
# notes): a larger eps keeps the comparison about the adapters' math.
OPTIM = ["optim.lr=1e-3", "optim.warmup_steps=0", "optim.decay=constant", "optim.weight_decay=0.1",
         "optim.grad_clip=1.0", "optim.eps=1e-6"]


# MoE runs: HF's auxiliary loss is not part of the reference loop's loss (nor, here, ours).
NO_AUX = ["model.moe.moe_aux_loss_coeff=0"]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    made = {}

    def get(name: str):
        if name not in made:
            made[name] = tmp_path_factory.mktemp("lora") / name
            save_tiny_hf(name, made[name])
        return made[name]

    return get


@pytest.fixture(scope="module")
def hf_dir(hf_dirs):
    return hf_dirs("llama3.1")


def _ours(compose, hf_dir, *extra):
    cfg = compose(f"model.hf_path={hf_dir}", f"model.lora.rank={RANK}", f"model.lora.alpha={ALPHA}",
                  "trainer.precision=fp32", "trainer.max_steps=3", "parallel.microbatch_size=2",
                  "trainer.global_batch_size=2", *OPTIM, *extra)
    from trainer.loop import hf_weight_loader, resolve_model

    cfg = resolve_model(cfg)
    pm = build_parallel_model(cfg, ParallelDims.single(), None, torch.device("cpu"), hf_weight_loader(cfg))
    return cfg, pm


def _batches(vocab: int):
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS):
        tokens = torch.randint(0, vocab, (2, 17), generator=gen)
        out.append({"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()})
    return out


def _peft_model(hf_dir, adapters: dict, moe: bool = False):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").float()
    modules, params = peft_targets(adapters, moe)
    model = peft.get_peft_model(base, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=modules,
                                                      target_parameters=params or None, lora_dropout=0.0))
    result = peft.set_peft_model_state_dict(model, {k: t.clone() for k, t in to_peft(adapters).items()})
    assert not [k for k in result.unexpected_keys if "lora" in k]
    assert not [k for k in result.missing_keys if "lora" in k]
    return model


def _adapters(pm) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in pm.modules[0].named_parameters() if is_adapter(n)}


@pytest.mark.parametrize("family,extra", [
    ("llama3.1", []),
    ("qwen3-moe", NO_AUX),  # experts through torch._grouped_mm
    ("mixtral", [*NO_AUX, "model.moe.moe_grouped_gemm=false"]),  # experts through the loop
])
def test_three_steps_equal_peft(compose, hf_dirs, family, extra):
    hf_dir = hf_dirs(family)
    cfg, pm = _ours(compose, hf_dir, *extra)
    moe = cfg.model.moe.enabled
    initial = _adapters(pm)
    assert all(torch.count_nonzero(t) == 0 for n, t in initial.items() if ".lora_B" in n)
    assert all(torch.count_nonzero(t) > 0 for n, t in initial.items() if ".lora_A" in n)
    assert sum(t.numel() for t in initial.values()) == trainable_count(cfg.model, cfg.model.lora)
    if moe:  # all-linear: attention, every expert's adapter and the router's
        assert {n.split(".", 3)[3] for n in initial if ".mlp." in n} == {
            "mlp.router.lora_A", "mlp.router.lora_B", "mlp.experts.linear_fc1_gate.lora_A",
            "mlp.experts.linear_fc1_gate.lora_B", "mlp.experts.linear_fc1_up.lora_B",
            "mlp.experts.linear_fc2.lora_A", "mlp.experts.linear_fc2.lora_B"}
    reference = _peft_model(hf_dir, initial, moe)
    ref_params = [p for p in reference.parameters() if p.requires_grad]
    ref_opt = torch.optim.AdamW(ref_params, lr=1e-3, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
                                weight_decay=0.1)
    opt = StageOptimizers(pm.modules, cfg.optim, torch.device("cpu"), cfg.trainer.max_steps)
    for batch in _batches(96):
        n = batch["labels"].numel()
        forward_backward(pm, local_batch(batch, pm), n, cfg, torch.device("cpu"))
        clip_grad_norm_(pm.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

        logits = reference(input_ids=batch["input_ids"]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                               reduction="sum") / n
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref_params, 1.0)
        ref_opt.step()
        ref_opt.zero_grad()
    theirs = peft.get_peft_model_state_dict(reference)
    ours = _adapters(pm)
    assert all(torch.count_nonzero(t) > 0 for n, t in ours.items() if ".lora_B" in n)  # they trained
    ours = to_peft(ours)
    assert ours.keys() == theirs.keys() and len(ours) == (7 if not moe else 4 + 3) * 2 * cfg.model.num_layers
    for name, t in ours.items():
        torch.testing.assert_close(t, theirs[name], rtol=1e-5, atol=1e-5, msg=lambda m, k=name: f"{k}: {m}")


@pytest.mark.parametrize("family,target_parameters", [
    ("llama3.1", None),
    # Dense layers 0, 2, 3 and an MoE layer 1; the dense MLPs by parameter (peft_targets says why).
    ("qwen3-moe-mixed", ["down_proj.weight", "gate_proj.weight", "mlp.experts.down_proj", "mlp.experts.gate_up_proj",
                         "mlp.gate.weight", "up_proj.weight"]),
    # A shared expert (mlp.shared_expert.*_proj) beside the routed ones.
    ("qwen2-moe-shared", ["down_proj.weight", "gate_proj.weight", "mlp.experts.down_proj",
                          "mlp.experts.gate_up_proj", "mlp.gate.weight", "up_proj.weight"]),
])
def test_exported_adapter_loads_in_peft_and_a_peft_adapter_loads_here(compose, hf_dirs, tmp_path, family,
                                                                      target_parameters):
    from transformers import AutoModelForCausalLM

    hf_dir = hf_dirs(family)
    cfg, pm = _ours(compose, hf_dir)
    moe = cfg.model.moe.enabled
    with torch.no_grad():  # non-zero B: the adapter changes the logits
        for n, p in pm.modules[0].named_parameters():
            if ".lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    save_peft_adapter(_adapters(pm), cfg.model.lora, str(hf_dir), tmp_path / "adapter", moe=moe)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    modules = ["k_proj", "o_proj", "q_proj", "v_proj"] if moe else sorted(PEFT_TARGETS)
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (RANK, ALPHA, modules)
    assert config["target_parameters"] == target_parameters
    ids = _batches(96)[0]["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").float()
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        ours = pm.modules[0](ids)[..., :96]
        theirs = loaded(input_ids=ids).logits
        loaded.disable_adapter_layers()
        assert (loaded(input_ids=ids).logits - theirs).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)

    # The other way: PEFT saves an adapter (its own random B), meshtron continues from it.
    reference = _peft_model(hf_dir, _adapters(pm), moe)
    with torch.no_grad():
        for n, p in reference.named_parameters():
            if "lora_A" in n:
                p.mul_(1.5)
    reference.save_pretrained(tmp_path / "peft")
    _, again = _ours(compose, hf_dir, f"model.lora.init_from={tmp_path / 'peft'}")
    with torch.no_grad():
        torch.testing.assert_close(again.modules[0](ids)[..., :96], reference.eval()(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_only_the_adapters_train_and_names_are_the_base_model_s(compose, hf_dir):
    cfg, pm = _ours(compose, hf_dir)
    model = pm.modules[0]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(is_adapter(n) for n in trainable)
    assert sum(model.get_parameter(n).numel() for n in trainable) == trainable_count(cfg.model, cfg.model.lora)
    base = {n for n, _ in model.named_parameters()} - trainable
    _, full = _ours(compose, hf_dir, "model.lora.rank=0")
    assert base == {n for n, _ in full.modules[0].named_parameters()}
    opt = StageOptimizers(pm.modules, cfg.optim, torch.device("cpu"), 3)
    assert sum(len(g["params"]) for g in opt.optimizers[0].param_groups) == len(trainable)


@pytest.mark.parametrize("overrides,needle", [
    (["model.lora.target_modules=[q_proj]"], "model.lora.target_modules has 'q_proj'; expected any of"),
    (["model.lora.init=pissa"], "model.lora.init='pissa' is not supported"),
    (["model.lora.dropout=1.0"], "model.lora.dropout=1.0 must be in [0, 1)"),
])
def test_config_refusals(compose, overrides, needle):
    from trainer.config import validate_config

    with pytest.raises(ConfigError) as err:
        validate_config(compose("model.lora.rank=4", *overrides))
    assert needle in str(err.value)


@pytest.mark.parametrize("overrides,needle", [
    (["model.lora.target_modules=[experts]"], "model.lora.target_modules has 'experts' but the model is dense"),
    (["model=tiny_moe", "model.lora.dropout=0.1"], "model.lora.dropout=0.1 with an MoE model and target linear_fc1: "
                                                  "PEFT adapts an MoE model's experts, router and MLPs as parameters"),
    (["model=tiny_moe", "trainer.precision=bf16", "model.lora.base_dtype=bf16", "model.lora.base_quant=nf4"],
     "model.lora.base_quant=nf4 with an MoE model (model.moe.num_moe_experts=8)"),
    (["model=tiny_moe", "model.lora.target_modules=[linear_fc1]"],
     "model.lora.target_modules=['linear_fc1'] adapts nothing in this model"),
])
def test_moe_refusals(compose, overrides, needle):
    from trainer.lora import check_lora

    with pytest.raises(ConfigError) as err:
        check_lora(compose("model.lora.rank=4", *overrides), ParallelDims.single())
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_moe_attention_only_with_dropout_is_fine(compose):
    from trainer.lora import check_lora

    check_lora(compose("model=tiny_moe", "model.lora.rank=4", "model.lora.dropout=0.1",
                       "model.lora.target_modules=[linear_qkv,linear_proj]"), ParallelDims.single())


def test_expert_adapters_grouped_equal_looped_and_merge_exactly(compose, hf_dirs):
    """Rank 3: torch._grouped_mm needs 16-byte rows, so the adapters' rank is zero-padded to 4 there; the loop
    gives the same logits and gradients. Merged into the base (experts, router, shared experts: merge_weight,
    as trainer.export_merged and merge-lora do), the plain model gives the adapted model's logits."""
    from trainer.lora import merge_weight

    hf = hf_dirs("qwen2-moe-shared")
    ids = _batches(96)[0]["input_ids"]
    runs = {}
    for grouped in ("true", "false"):
        cfg, pm = _ours(compose, hf, "model.lora.rank=3", f"model.moe.moe_grouped_gemm={grouped}")
        model = pm.modules[0]
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".lora_B" in n:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
        logits = model(ids)
        logits.square().mean().backward()
        runs[grouped] = (logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    (a, grads_a), (b, grads_b) = runs["true"], runs["false"]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert grads_a.keys() == grads_b.keys() and any(".mlp.experts." in n for n in grads_a)
    for n in grads_a:
        torch.testing.assert_close(grads_a[n], grads_b[n], rtol=1e-5, atol=1e-6, msg=lambda m, k=n: f"{k}: {m}")

    adapters = _adapters(pm)
    _, plain = _ours(compose, hf, "model.lora.rank=0")
    base = plain.modules[0]
    merged = {n: merge_weight(n, t, adapters, cfg.model.lora, cfg.model) for n, t in base.state_dict().items()}
    # Per layer: qkv, proj, the shared expert's 3, the routed experts' 3, the router.
    assert sum(not torch.equal(merged[n], t) for n, t in base.state_dict().items()) == 2 * 9
    base.load_state_dict(merged)
    with torch.no_grad():
        torch.testing.assert_close(base(ids), b, rtol=1e-5, atol=1e-5)


def test_hf_to_megatron_refuses_an_moe_adapter_in_one_line(compose, hf_dirs, tmp_path):
    from checkpoint_convert.lora import PeftMerge

    hf = hf_dirs("qwen3-moe")
    cfg, pm = _ours(compose, hf, *NO_AUX)
    save_peft_adapter(_adapters(pm), cfg.model.lora, str(hf), tmp_path / "adapter", moe=True)
    with pytest.raises(ConfigError) as err:
        PeftMerge(tmp_path / "adapter", set())
    assert "which hf-to-megatron does not merge" in str(err.value) and "\n" not in str(err.value)


def test_a_peft_adapter_of_another_shape_is_refused_naming_both(compose, hf_dir, tmp_path):
    from trainer.lora import read_peft_config

    cfg, pm = _ours(compose, hf_dir)
    save_peft_adapter(_adapters(pm), cfg.model.lora, str(hf_dir), tmp_path / "adapter")
    read_peft_config(tmp_path / "adapter", cfg.model.lora, cfg.model)
    other = compose("model.lora.rank=8", "model.lora.target_modules=[linear_qkv]").model.lora
    with pytest.raises(ConfigError, match=r"rank: adapter 4 vs model.lora 8.*target_modules: adapter \[.*'down_proj'"
                                          r".*\] vs model.lora \['k_proj', 'q_proj', 'v_proj'\]"):
        read_peft_config(tmp_path / "adapter", other, cfg.model)


def test_flops_count_only_the_matmuls_that_run(compose):
    import numpy as np

    from trainer.flops import attention_flops, document_lengths, matmul_params_per_token, step_flops

    full = compose().model
    lora = compose("model.lora.rank=8").model
    ids = np.zeros((2, 64), np.int64)
    tokens, weights = 128, matmul_params_per_token(full)
    attention = attention_flops(full, document_lengths(ids))
    assert step_flops(full, ids) == 6 * weights * tokens + attention
    # Frozen weights: forward and input gradient only; the adapters: all three matmuls.
    assert step_flops(lora, ids) == (4 * weights + 6 * trainable_count(lora, lora.lora)) * tokens + attention
    head = full.hidden_size * full.vocab_size  # 40 labelled tokens run the (frozen) output layer
    assert (step_flops(lora, ids, labelled=40) ==
            (4 * (weights - head) + 6 * trainable_count(lora, lora.lora)) * tokens + 4 * head * 40 + attention)


def test_a_bf16_base_is_stored_in_bf16_and_trains_like_the_fp32_base(compose, hf_dir):
    """model.lora.base_dtype=bf16: every base parameter bf16 (half the memory), the adapters fp32 with their
    optimizer state. Against the fp32 base under the same bf16 autocast, 3 steps' losses stay within 1e-2
    (relative): the base's weights are rounded to bf16 once, which autocast does anyway before every matmul; the
    norms and embeddings (not matmuls) are the difference, measured at most 3.9e-4."""
    losses = {}
    for base in ("fp32", "bf16"):
        cfg, pm = _ours(compose, hf_dir, "trainer.precision=bf16", f"model.lora.base_dtype={base}")
        model = pm.modules[0]
        want = torch.bfloat16 if base == "bf16" else torch.float32
        assert all(p.dtype == (torch.float32 if is_adapter(n) else want) for n, p in model.named_parameters())
        opt = StageOptimizers(pm.modules, cfg.optim, torch.device("cpu"), 3)
        losses[base] = []
        for batch in _batches(96):
            n = batch["labels"].numel()
            losses[base].append(float(forward_backward(pm, local_batch(batch, pm), n, cfg, torch.device("cpu"))) / n)
            opt.step()
            opt.zero_grad()
        assert all(len(s["exp_avg"].shape) == 2 for s in opt.optimizers[0].state.values())
    for a, b in zip(losses["bf16"], losses["fp32"]):
        assert a == pytest.approx(b, rel=1e-2)


def test_a_bf16_base_needs_bf16_precision(compose):
    from trainer.lora import check_lora

    with pytest.raises(ConfigError, match=r"model.lora.base_dtype=bf16 needs trainer.precision=bf16 \(got fp32\)"):
        check_lora(compose("model.lora.rank=4", "model.lora.base_dtype=bf16"), ParallelDims.single())


def test_nf4_base_is_quantized_and_trains_like_the_bf16_base(compose):
    """QLoRA (model.lora.base_quant=nf4): the decoder's linear weights are torchao NF4 tensors after loading, the
    rest of the base bf16, the adapters fp32; 3 steps on the same batches track the bf16-base run within 2e-2
    (relative loss): NF4 keeps 4 bits per weight (16 levels per block of 64, one absmax scale each), an error of
    a few percent per weight that the matmuls' sums average down; on these 32-token batches of random tokens at
    initialisation, measured at most 6.7e-3 (on the bundled corpus, 16 x 256 tokens a step: 4e-4 over 10 steps).
    A quantization gone wrong moves the loss by whole units."""
    pytest.importorskip("torchao")
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor

    losses = {}
    for quant in ("null", "nf4"):
        cfg = compose("model.lora.rank=8", "trainer.precision=bf16", "model.lora.base_dtype=bf16",
                      f"model.lora.base_quant={quant}", "model.ffn_hidden_size=384", "trainer.global_batch_size=2",
                      "parallel.microbatch_size=2", *OPTIM)
        pm = build_parallel_model(cfg, ParallelDims.single(), None, torch.device("cpu"))
        weights = {n: p for n, p in pm.modules[0].named_parameters() if n.startswith("decoder.layers.")
                   and n.endswith(("linear_qkv.weight", "linear_proj.weight", "linear_fc2.weight",
                                   "linear_fc1_gate.weight", "linear_fc1_up.weight"))}
        assert len(weights) == 5 * cfg.model.num_layers
        assert all(isinstance(p, NF4Tensor) == (quant == "nf4") and not p.requires_grad for p in weights.values())
        opt = StageOptimizers(pm.modules, cfg.optim, torch.device("cpu"), 3)
        losses[quant] = []
        for batch in _batches(cfg.model.vocab_size):
            n = batch["labels"].numel()
            losses[quant].append(float(forward_backward(pm, local_batch(batch, pm), n, cfg, torch.device("cpu"))) / n)
            opt.step()
            opt.zero_grad()
    for a, b in zip(losses["nf4"], losses["null"]):
        assert a == pytest.approx(b, rel=2e-2)
    assert losses["nf4"] != losses["null"]  # quantized, not the same weights


@pytest.mark.parametrize("overrides,needle", [
    (["parallel=tp2"], "model.lora.base_quant=nf4 with parallel.tp=2: an NF4 weight is blocks of 64"),
    # FSDP2 shards rows: 128 x 128 over 2 ranks is 8192 values a rank, half a scale block.
    (["parallel=fsdp"], "model.lora.base_quant=nf4 with FSDP over 2 ranks (dp_shard x cp): "
                        "decoder.layers.*.self_attention.linear_proj is 128 x 128, and FSDP shards its rows; each "
                        "rank's 128 / 2 rows must be whole and hold a multiple of 16384 values"),
    (["parallel=fsdp", "parallel.dp_shard=1", "parallel.cp=2"], "with FSDP over 2 ranks (dp_shard x cp)"),
    (["parallel.compile=true"], "model.lora.base_quant=nf4 with parallel.compile=true is not supported"),
    (["model.lora.base_dtype=fp32"], "needs model.lora.base_dtype=bf16 (got fp32)"),
    (["model.ffn_hidden_size=352"], "decoder.layers.*.mlp.linear_fc1_gate is 352 x 128 = 45056 values, not a "
                                    "multiple of 64 x 256"),
])
def test_nf4_refusals(compose, overrides, needle):
    from trainer.loop import prepare
    from trainer.lora import check_lora

    cfg = compose("model.lora.rank=8", "trainer.precision=bf16", "model.lora.base_dtype=bf16",
                  "model.lora.base_quant=nf4", "model.ffn_hidden_size=384", *overrides)
    cfg, dims = prepare(cfg, 2 if any(o.startswith("parallel=") for o in overrides) else 1)
    with pytest.raises(ConfigError) as err:
        check_lora(cfg, dims)
    assert needle in str(err.value)


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_hf_to_megatron_merges_a_peft_adapter(compose, hf_dir, tmp_path, fmt):
    """hf-to-megatron --lora: the Megatron checkpoint holds the merged weights; converted back, its logits are
    PEFT's model's with the adapter on the base."""
    import shutil

    from transformers import AutoModelForCausalLM

    from checkpoint_convert.cli import main as convert

    _, pm = _ours(compose, hf_dir)
    adapters = {n: (torch.randn(t.shape, generator=torch.Generator().manual_seed(i)) * 0.05)
                for i, (n, t) in enumerate(_adapters(pm).items())}
    reference = _peft_model(hf_dir, adapters)
    reference.save_pretrained(tmp_path / "adapter")
    src = tmp_path / "hf"
    shutil.copytree(hf_dir, src)
    layout = ["--tp", "2", "--pp", "1"] if fmt == "torch" else []
    assert convert(["hf-to-megatron", "--hf", str(src), "--out", str(tmp_path / "meg"), "--format", fmt,
                    "--lora", str(tmp_path / "adapter"), "--no-progress", *layout]) == 0
    assert convert(["megatron-to-hf", "--megatron", str(tmp_path / "meg"), "--out", str(tmp_path / "back"),
                    "--no-progress"]) == 0
    ids = _batches(96)[0]["input_ids"]
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager").eval()
        torch.testing.assert_close(merged(input_ids=ids).logits, reference.eval()(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "adapter", other)
    from safetensors.torch import load_file, save_file

    state = load_file(str(other / "adapter_model.safetensors"))
    state = {k.replace("layers.0.", "layers.9."): v for k, v in state.items()}
    save_file(state, str(other / "adapter_model.safetensors"))
    assert convert(["hf-to-megatron", "--hf", str(src), "--out", str(tmp_path / "none"), "--lora", str(other),
                    "--no-progress"]) == 2
    assert not (tmp_path / "none").exists()
