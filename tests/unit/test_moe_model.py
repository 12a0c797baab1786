"""The MoE block on one device: config checks, names and init, routing against a per-token reference, the
grouped-GEMM path against the loop, capacity, the auxiliary losses and their gradients, the step's router
numbers (one transfer per step), layout refusals, FLOPs and the presets."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from trainer.config import ModelConfig
from trainer.errors import ConfigError
from trainer.model import GPTModel
from trainer.model import moe as moe_mod
from trainer.model.init import normal_like
from trainer.model.moe import MoELayer, RouterStats, router_metrics, switch_aux_rows
from trainer.moe_config import MoEConfig

E, K = 4, 2
MOE = MoEConfig(num_moe_experts=E, moe_router_topk=K, moe_ffn_hidden_size=16, moe_layer_freq=[0, 1, 1])
TINY = ModelConfig(vocab_size=64, hidden_size=32, ffn_hidden_size=48, num_layers=3, num_attention_heads=4,
                   num_query_groups=2, make_vocab_size_divisible_by=8, moe=MOE)


def _cfg(**moe) -> ModelConfig:
    return dataclasses.replace(TINY, moe=dataclasses.replace(MOE, **moe))


def _random_(model: torch.nn.Module) -> torch.nn.Module:
    """Router weights large enough that routing is uneven (the drawn init routes almost uniformly)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("moe, message", [
    ({"moe_router_topk": 5}, r"moe_router_topk=5 must be in \[1, model.moe.num_moe_experts=4\]"),
    ({"moe_layer_freq": [1, 1]}, r"moe_layer_freq has 2 entries but model.num_layers=3"),
    ({"moe_layer_freq": [0, 2, 1]}, r"may hold only 0 \(dense\) and 1 \(MoE\)"),
    ({"moe_layer_freq": [0, 0, 0]}, r"has no MoE layer; set model.moe.num_moe_experts=null"),
    ({"moe_shared_expert_gate": True}, r"moe_shared_expert_gate=true needs .*moe_shared_expert_intermediate_size"),
    ({"moe_expert_capacity_factor": 0.0}, r"moe_expert_capacity_factor=0.0 must be positive"),
    ({"moe_drop_policy": "random"}, r"moe_drop_policy='random' is not supported"),
    ({"moe_aux_loss_coeff": -1.0}, r"moe_aux_loss_coeff=-1.0 must be >= 0"),
])
def test_config_errors_name_the_values(moe, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(**moe).validate()


def test_no_moe_key_reads_as_a_secret():
    """config.yaml redacts secret-looking keys (trainer.config.is_secret_key): no MoE setting may look like one."""
    from trainer.config_io import is_secret_key

    assert [f.name for f in dataclasses.fields(MoEConfig) if is_secret_key(f.name)] == []


def test_names_shapes_and_layer_kinds():
    cfg = _cfg(moe_shared_expert_intermediate_size=24, moe_shared_expert_gate=True)
    shapes = {n: tuple(p.shape) for n, p in GPTModel(cfg).named_parameters()}
    assert "decoder.layers.0.mlp.linear_fc1_gate.weight" in shapes  # layer 0 is dense
    assert "decoder.layers.0.mlp.router.weight" not in shapes
    for i in (1, 2):
        layer = f"decoder.layers.{i}.mlp"
        assert shapes[f"{layer}.router.weight"] == (E, 32)
        assert shapes[f"{layer}.experts.linear_fc1_gate.weight"] == (E, 16, 32)
        assert shapes[f"{layer}.experts.linear_fc1_up.weight"] == (E, 16, 32)
        assert shapes[f"{layer}.experts.linear_fc2.weight"] == (E, 32, 16)
        assert shapes[f"{layer}.shared_experts.linear_fc1_gate.weight"] == (24, 32)
        assert shapes[f"{layer}.shared_experts.gate_weight"] == (1, 32)
        assert f"{layer}.linear_fc1_gate.weight" not in shapes
    assert [m.moe_index for m in GPTModel(cfg).modules() if isinstance(m, MoELayer)] == [0, 1]


def test_init_draws_each_stacked_tensor_whole_by_name():
    """An expert's slice is the slice of the tensor drawn whole: a layout that shards experts gets the same."""
    model = GPTModel(TINY, seed=11)
    name = "decoder.layers.1.mlp.experts.linear_fc1_gate.weight"
    assert torch.equal(dict(model.named_parameters())[name], normal_like((E, 16, 32), 0.02, 11, name, "cpu"))
    fc2 = "decoder.layers.2.mlp.experts.linear_fc2.weight"  # writes into the residual stream: scaled std
    assert torch.equal(dict(model.named_parameters())[fc2],
                       normal_like((E, 32, 16), 0.02 / math.sqrt(6), 11, fc2, "cpu"))


def _reference_moe(layer: MoELayer, x: torch.Tensor, capacity=None, policy="probs") -> torch.Tensor:
    """Token by token: softmax, top-k, renormalise, each chosen expert's SwiGLU weighted; capacity per row
    counted by plain Python loops."""
    B, S, H = x.shape
    logits = x @ layer.router.weight.T
    probs = torch.softmax(logits.float(), -1)
    top_p, top_i = probs.topk(layer.topk, -1)
    if not layer.router.pre_softmax:
        top_p = top_p / top_p.sum(-1, keepdim=True)
    keep = torch.ones_like(top_p, dtype=torch.bool)
    if capacity is not None:
        for b in range(B):
            for e in range(layer.num_experts):
                slots = [(s, j) for s in range(S) for j in range(layer.topk) if top_i[b, s, j] == e]
                if policy == "probs":
                    slots.sort(key=lambda sj: -float(top_p[b, sj[0], sj[1]]))
                for s, j in slots[capacity:]:
                    keep[b, s, j] = False
    ex = layer.experts
    out = torch.zeros_like(x)
    for b in range(B):
        for s in range(S):
            for j in range(layer.topk):
                e = int(top_i[b, s, j])
                h = F.silu(x[b, s] @ ex.linear_fc1_gate.weight[e].T) * (x[b, s] @ ex.linear_fc1_up.weight[e].T)
                out[b, s] += keep[b, s, j] * top_p[b, s, j] * (h @ ex.linear_fc2.weight[e].T)
    return out


@pytest.mark.parametrize("moe", [{}, {"moe_router_pre_softmax": True},
                                 {"moe_expert_capacity_factor": 0.5},
                                 {"moe_expert_capacity_factor": 0.5, "moe_drop_policy": "position"}])
def test_layer_matches_per_token_reference(moe):
    cfg = _cfg(**moe)
    layer = _random_(GPTModel(cfg, seed=1)).decoder.layers["1"].mlp
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = layer(x)
        ref = _reference_moe(layer, x, cfg.moe.capacity(6), cfg.moe.moe_drop_policy)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    if "moe_expert_capacity_factor" in moe:  # capacity ceil(0.5 * 6 * 2 / 4) = 2 per row and expert bites
        with torch.no_grad():
            assert not torch.allclose(ours, _reference_moe(layer, x))


def test_grouped_gemm_equals_the_expert_loop(monkeypatch):
    """Same forward and gradients on both paths; the grouped path does run torch._grouped_mm (and no loop)."""
    assert moe_mod.grouped_mm_usable(torch.device("cpu"), torch.float32, 32, 16)
    calls = []
    grouped_mm = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or grouped_mm(*a, **k))
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(4))
    results = {}
    for grouped in (True, False):
        model = _random_(GPTModel(_cfg(moe_grouped_gemm=grouped, moe_z_loss_coeff=0.1), seed=3))
        losses = model(ids, labels=ids.roll(-1, 1))
        losses.sum().backward()
        results[grouped] = (losses.detach(), {n: p.grad for n, p in model.named_parameters()}, len(calls))
    assert results[True][2] == 6 and results[False][2] == 6  # 3 GEMMs x 2 MoE layers, only on the grouped path
    torch.testing.assert_close(results[True][0], results[False][0], rtol=0, atol=1e-6)
    for name, g in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_aux_loss_equals_transformers_on_one_row_and_layer():
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    logits = torch.randn(1, 50, 8, generator=torch.Generator().manual_seed(5)) * 2
    probs = torch.softmax(logits, -1)
    counts = torch.zeros(1, 8).scatter_add_(1, probs.topk(3, -1).indices.view(1, -1), torch.ones(1, 150))
    ours = switch_aux_rows(probs, counts, 50)
    theirs = load_balancing_loss_func((logits[0],), 8, 3)
    torch.testing.assert_close(ours[0], theirs, rtol=1e-6, atol=0)
    assert ours[0] > 3.0  # uneven routing: above top_k, the balanced value


def _captured_router_logits(model: GPTModel) -> list:
    logits = []
    for m in model.modules():
        if isinstance(m, moe_mod.TopKRouter):
            m.register_forward_hook(lambda mod, inp, out: logits.append(out[0]))
    return logits


def _reference_objective(logits: list[torch.Tensor], B: int, S: int, aux_c: float, z_c: float, rows: int):
    """coeff x the mean over rows and MoE layers of the per-row switch loss, plus the z-loss, by hand."""
    total = 0.0
    for layer_logits in logits:
        lg = layer_logits.view(B, S, -1).float()
        p = torch.softmax(lg, -1)
        for b in range(B):
            f = torch.zeros(E).index_add_(0, p[b].topk(K, -1).indices.flatten(), torch.ones(S * K)) / S
            total = total + aux_c * E * (f * p[b].mean(0)).sum() + z_c * torch.logsumexp(lg[b], -1).square().mean()
    return total / (len(logits) * rows)


@pytest.mark.parametrize("rows_per_step", [None, 8])
def test_aux_and_z_gradients_reach_the_router_as_the_objective_says(rows_per_step):
    B, S, ids = 2, 9, torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(6))
    labels = ids.roll(-1, 1)

    def grads(aux_c, z_c):
        model = _random_(GPTModel(_cfg(moe_aux_loss_coeff=aux_c, moe_z_loss_coeff=z_c), seed=8))
        model.moe_rows_per_step = rows_per_step
        logits = _captured_router_logits(model)
        model(ids, labels=labels).sum().backward(retain_graph=True)  # the reference differentiates it again
        return model, logits, {n: p.grad.clone() for n, p in model.named_parameters()}

    # The reference differentiates the plain model's graph: one with the losses attached would hand them their
    # gradient again on any path through a MoE layer's output.
    model, logits, plain = grads(0.0, 0.0)
    _, _, with_aux = grads(0.3, 0.05)
    ref = _reference_objective(logits, B, S, 0.3, 0.05, rows_per_step or B)
    params = dict(model.named_parameters())
    expected = dict(zip(params, torch.autograd.grad(ref, list(params.values()), allow_unused=True)))
    router = "decoder.layers.1.mlp.router.weight"
    assert (with_aux[router] - plain[router]).abs().max() > 1e-4  # the losses do move the router
    for name, g in expected.items():
        # Parameters after the last router (its experts, the output layer) feel no auxiliary loss.
        g = torch.zeros_like(plain[name]) if g is None else g
        # The difference of two gradients carries their rounding: atol in units of the plain gradient's size.
        atol = 1e-6 * max(1.0, float(plain[name].abs().max()))
        torch.testing.assert_close(with_aux[name] - plain[name], g, rtol=1e-4, atol=atol, msg=name)


def test_router_totals_count_training_forwards_and_give_the_metrics():
    model = _random_(GPTModel(_cfg(moe_expert_capacity_factor=0.5), seed=9))
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.eval()
        model(ids)
        assert model.router_totals is None  # evaluation forwards are not the step's
        model.train()
        model(ids)
        model(ids)
    totals = model.router_totals
    assert totals.shape == (2, E + 3)
    assert torch.equal(totals[:, :E].sum(1), torch.full((2,), 2 * 2 * 8 * K, dtype=torch.float64))
    metrics = router_metrics(totals.flatten(), model.config, rows_per_step=4)
    imbalance = totals[:, :E].max(1).values / totals[:, :E].mean(1)
    assert metrics["moe_load_imbalance"] == pytest.approx(float(imbalance.max()))
    assert metrics["moe_imbalance_layer"] == [1, 2][int(imbalance.argmax())]
    assert metrics["moe_aux_loss"] == pytest.approx(float(totals[:, E].sum()) / (2 * 4))
    assert 0 < metrics["moe_dropped_frac"] < 1  # capacity 2 per row and expert, 16 assignments per row
    stats = RouterStats(2, 2, grouped=True)
    with torch.no_grad():
        model.decoder.layers["2"].mlp(torch.randn(2, 8, 32), stats)
    assert list(stats.records) == [1]


def test_one_transfer_per_step_and_moe_metrics(tmp_path, compose):
    """The grouped path reads nothing back inside the step; the loop path reads its group sizes once per MoE
    layer and micro-batch (the documented cost where _grouped_mm cannot run)."""
    from tests.sync_counter import counted_train

    base = ["model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_layers=2", "model.num_attention_heads=4",
            "model.num_query_groups=2", "model.family=mixtral", "model.moe.num_moe_experts=4", "model.moe.moe_ffn_hidden_size=32",
            "model.moe.moe_z_loss_coeff=0.001", "data.seq_len=32", "trainer.global_batch_size=4",
            "parallel.microbatch_size=2", "trainer.max_steps=2", "trainer.eval_every=0", "logging.wandb=false",
            "trainer.export_hf=false", "trainer.device=cpu", f"data.cache_dir={tmp_path / 'cache'}"]
    transfers = counted_train(compose(*base, f"trainer.output_dir={tmp_path / 'grouped'}"))
    assert [t.what for t in transfers] == ["Tensor.cpu"] * 2, [(t.what, t.stack[-4:]) for t in transfers]
    looped = counted_train(compose(*base, "model.moe.moe_grouped_gemm=false",
                                   f"trainer.output_dir={tmp_path / 'loop'}"))
    # 2 steps x 2 micro-batches x 2 MoE layers read their group sizes, besides step_totals' one read per step.
    assert sorted(t.what for t in looped) == ["Tensor.cpu"] * 2 + ["Tensor.tolist"] * 8
    import json
    rows = [json.loads(line) for line in (tmp_path / "grouped" / "metrics.jsonl").read_text().splitlines()]
    assert {"moe_aux_loss", "moe_z_loss", "moe_load_imbalance", "moe_imbalance_layer"} <= rows[0].keys()
    assert rows[0]["moe_aux_loss"] > 0 and rows[0]["moe_load_imbalance"] >= 1
    assert rows[0]["moe_imbalance_layer"] in (0, 1)


@pytest.mark.parametrize("overrides, world, message", [
    (["parallel.tp=2", "parallel.sequence_parallel=false"], 2, r"need parallel.sequence_parallel=true"),
    (["parallel.cp=2", "model.moe.moe_expert_capacity_factor=1.0"], 2,
     r"moe_expert_capacity_factor=1.0 ranks each row's assignments on one rank; with parallel.cp=2 and tp=1"),
    (["parallel.ep=3", "parallel.dp_shard=3"], 3, r"num_moe_experts=4 is not divisible by parallel.ep=3"),
    (["parallel.ep=2", "parallel.dp_shard=1", "parallel.cp=2"], 2, None),
    (["parallel.ep=4", "parallel.dp_shard=1", "parallel.cp=2"], 2,
     r"parallel.ep=4 must be a multiple of parallel.cp=2 and divide dp_shard x cp = 1 x 2 = 2"),
    (["parallel.ep=2", "parallel.dp_shard=2", "parallel.cp=2"], 4, None),
    (["parallel.ep=4", "parallel.dp_shard=1", "parallel.cp=4", "data.seq_len=32"], 4, None),
    (["parallel.ep=2", "parallel.dp_shard=1", "parallel.tp=2"], 2,
     r"parallel.ep=2 must be a multiple of parallel.cp=1 and divide dp_shard x cp = 1 x 1 = 1"),
    (["parallel.ep=2", "parallel.dp_shard=2", "parallel.compile=true", "trainer.precision=bf16"], 2,
     r"parallel.compile=true with an MoE model runs without ep, tp and cp for now \(got ep=2, tp=1, cp=1\)"),
    (["parallel.compile=true"], 1, r"parallel.compile=true with an MoE model needs trainer.precision=bf16 \(got fp32\)"),
    (["parallel.ep=2", "parallel.dp_shard=2", "parallel.activation_checkpoint=selective"], 2,
     r"activation_checkpoint=selective does not run with parallel.ep=2 yet; use parallel.activation_checkpoint=full"),
    (["parallel.ep=2", "parallel.dp_shard=2", "parallel.activation_checkpoint=full"], 2, None),
])
def test_moe_layouts_are_checked_before_any_process_group(compose, overrides, world, message):
    from parallel.dims import ParallelDims, validate_layout

    cfg = compose("model.moe.num_moe_experts=4", "model.num_layers=2", "trainer.global_batch_size=4",
                  "parallel.microbatch_size=1", *overrides)
    if message is None:
        validate_layout(cfg, ParallelDims.from_config(cfg.parallel, world))
        return
    with pytest.raises(ConfigError, match=message):
        validate_layout(cfg, ParallelDims.from_config(cfg.parallel, world))


def test_ep_needs_an_moe_model(compose):
    from parallel.dims import ParallelDims, validate_layout

    cfg = compose("parallel.ep=2", "parallel.dp_shard=2", "trainer.global_batch_size=4")
    with pytest.raises(ConfigError, match=r"parallel.ep=2 needs an MoE model"):
        validate_layout(cfg, ParallelDims.from_config(cfg.parallel, 2))


def test_ep_splits_dp_shard_without_moving_ranks():
    """ep carves dp_shard_in_ep x cp out of dp_shard x cp; the ranks keep their places (row-major)."""
    from parallel.dims import EP_FLAT_VIEWS, ParallelDims

    dims = ParallelDims(dp_replicate=1, dp_shard=4, tp=2, pp=1, cp=2, world_size=16, ep=4)
    sizes, views = dims.mesh_axes()
    assert sizes == {"pp": 1, "dp_replicate": 1, "dp_shard_mod_ep": 2, "dp_shard_in_ep": 2, "cp": 2, "tp": 2}
    assert views is EP_FLAT_VIEWS and views["ep"] == ("dp_shard_in_ep", "cp")
    assert dims.expert_shard == 2
    import math

    assert math.prod(sizes.values()) == 16
    assert ParallelDims.single().mesh_axes()[0] == ParallelDims.single().degrees()


def test_flops_count_active_parameters():
    from trainer.flops import matmul_params_per_token

    cfg = _cfg(moe_shared_expert_intermediate_size=8, moe_shared_expert_gate=True)
    attn = 32 * (4 + 2 * 2) * 8 + 4 * 8 * 32  # qkv + proj per layer
    dense = 3 * 32 * 48
    moe = 32 * E + 3 * 32 * (K * 16 + 8) + 32  # router, k experts + shared, shared gate
    assert matmul_params_per_token(cfg) == 3 * attn + dense + 2 * moe + 32 * 64


@pytest.mark.parametrize("preset, total, active", [("qwen3_30b_a3b", 30.53e9, 3.04e9),
                                                   ("mixtral_8x7b", 46.70e9, 12.75e9)])
def test_presets_have_the_published_sizes_and_round_trip_through_hf_config(compose, preset, total, active):
    from checkpoint_convert.hf import hf_config_dict, model_config_from_hf
    from trainer.flops import matmul_params_per_token

    cfg = compose(f"model={preset}", "data.seq_len=1024").model
    with torch.device("meta"):
        count = sum(p.numel() for p in GPTModel(cfg).parameters())
    assert count == pytest.approx(total, rel=1e-3)
    assert matmul_params_per_token(cfg) == pytest.approx(active, rel=1e-3)
    assert model_config_from_hf(hf_config_dict(cfg), dataclasses.replace(cfg, moe=MoEConfig())) == cfg


def test_a_family_the_hf_config_cannot_express_is_refused_before_training(compose):
    """Checkpoints write an HF config.json at every save: a mismatch is refused by prepare, not at step N."""
    from trainer.loop import prepare

    cfg = compose("model.family=qwen3_moe", "model.moe.num_moe_experts=4", "model.num_layers=2")
    with pytest.raises(ConfigError, match=r"qk_layernorm=False do not match HF family 'qwen3_moe'"):
        prepare(cfg, 1)
