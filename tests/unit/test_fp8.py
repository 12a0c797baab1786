"""trainer.precision=fp8 on one process, in-process: which layers torchao converts (and which it must not),
parameter names unchanged, the refusals that need a GPU or another torchao to happen (faked here), and the
styles tensor parallelism gets. The CLI's refusals and the training runs: tests/integration/test_fp8_cli.py."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from parallel.dims import ParallelDims
from parallel.float8 import check_fp8, tp_styles
from trainer.config import Config, Fp8Config, TrainerConfig
from trainer.errors import ConfigError
from trainer.model.shapes import linear_shapes

pytest.importorskip("torchao")


def _cfg(compose, *overrides: str) -> Config:
    return compose("trainer.precision=fp8", *overrides)


def _build(cfg: Config):
    from parallel.parallelize import build_parallel_model

    return build_parallel_model(cfg, ParallelDims.single(), None, torch.device("cpu"))


def test_the_decoder_linears_are_converted_and_nothing_else(compose):
    from torchao.float8.float8_linear import Float8Linear

    cfg = _cfg(compose)
    fp8, bf16 = _build(cfg), _build(dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer,
                                                                                          precision="bf16")))
    model = fp8.modules[0]
    converted = sorted(n for n, m in model.named_modules() if isinstance(m, Float8Linear))
    assert fp8.fp8_layers == len(converted) == 5 * cfg.model.num_layers
    assert all(n.startswith("decoder.layers.") for n in converted)
    assert type(model.output_layer) is torch.nn.Linear  # its matmul runs in the chunked loss, in bf16
    assert bf16.fp8_layers == 0
    # Float8Linear keeps nn.Linear's parameters: names, shapes and initial values are a bf16 model's.
    a, b = model.state_dict(), bf16.modules[0].state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_skip_keeps_the_named_layers_in_bf16(compose):
    from torchao.float8.float8_linear import Float8Linear

    pm = _build(_cfg(compose, "trainer.fp8.skip=[decoder.layers.0.*,*.linear_fc2]"))
    converted = {n for n, m in pm.modules[0].named_modules() if isinstance(m, Float8Linear)}
    layers = pm.modules[0].config.num_layers
    assert len(converted) == 4 * (layers - 1) and not any(".0." in n or "fc2" in n for n in converted)


def test_config_refusals(compose):
    with pytest.raises(ConfigError, match=r"trainer.fp8.recipe='blockwise' is not supported; expected one of "
                                          r"\['rowwise', 'tensorwise'\]"):
        Fp8Config(recipe="blockwise").validate()
    with pytest.raises(ConfigError, match=r"trainer.fp8.skip entry '' must be a non-empty pattern"):
        Fp8Config(skip=[""]).validate()
    with pytest.raises(ConfigError, match=r"trainer.precision='fp16' is not supported; expected one of "
                                          r"\['fp32', 'bf16', 'fp8'\]"):
        TrainerConfig(precision="fp16").validate()


def test_a_gpu_without_fp8_gemms_is_refused_naming_it_and_emulate(compose, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ConfigError, match=r"needs fp8 GEMMs \(compute capability 8.9\+, Ada or Hopper\); NVIDIA "
                                          r"A100-SXM4-80GB has 8.0: use trainer.precision=bf16, or "
                                          r"trainer.fp8.emulate=true"):
        check_fp8(_cfg(compose), 1, torch.device("cuda"))
    check_fp8(_cfg(compose, "trainer.fp8.emulate=true"), 1, torch.device("cuda"))  # emulation runs anywhere
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_fp8(_cfg(compose), 1, torch.device("cuda"))


def test_a_torchao_outside_the_supported_range_is_refused_naming_both_versions(compose, monkeypatch):
    import parallel.float8 as f8

    monkeypatch.setattr(f8, "torchao_version", lambda: "0.12.0")
    with pytest.raises(ConfigError, match=rf"torchao 0.12.0 with torch {re.escape(torch.__version__)} is not a "
                                          rf"combination meshtron supports; install torchao>=0.18,<0.19"):
        check_fp8(_cfg(compose), 1, torch.device("cpu"))
    monkeypatch.setattr(f8, "torchao_version", lambda: None)
    with pytest.raises(ConfigError, match=r"needs torchao, which is not installed: pip install 'meshtron\[fp8\]'"):
        check_fp8(_cfg(compose), 1, torch.device("cpu"))


def test_dimensions_are_checked_per_tensor_parallel_rank(compose):
    cfg = _cfg(compose, "model.ffn_hidden_size=352")  # 352 = 22 x 16, but 176 per rank at tp 2 is 11 x 16
    assert linear_shapes(cfg.model, 2)["mlp.linear_fc2"] == (cfg.model.hidden_size, 176)
    check_fp8(cfg, 2, torch.device("cpu"))
    cfg = _cfg(compose, "model.ffn_hidden_size=360")
    with pytest.raises(ConfigError, match=r"decoder.layers.0.mlp.linear_fc1_gate is 180 x 128 on each "
                                          r"tensor-parallel rank \(tp=2\); fp8 GEMMs need both dimensions divisible "
                                          r"by 16"):
        check_fp8(cfg, 2, torch.device("cpu"))
    check_fp8(_cfg(compose, "model.ffn_hidden_size=360", "trainer.fp8.skip=[*.mlp.*]"), 2, torch.device("cpu"))


def test_tensor_parallel_styles(compose):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    from torchao.float8.float8_tensor_parallel import Float8ColwiseParallel, Float8RowwiseParallel

    tensorwise = _cfg(compose, "trainer.fp8.recipe=tensorwise")
    assert tp_styles(tensorwise, "cuda") == (Float8ColwiseParallel, Float8RowwiseParallel)
    assert tp_styles(tensorwise, "cpu") == (ColwiseParallel, RowwiseParallel)  # gloo has no fp8 dtypes
    assert tp_styles(_cfg(compose), "cuda") == (ColwiseParallel, RowwiseParallel)  # rowwise
    assert tp_styles(compose(), "cuda") == (ColwiseParallel, RowwiseParallel)


# ------------------------------------------------------------------------------------------------ MoE experts

MOE = ("model=tiny_moe", "model.moe.moe_shared_expert_intermediate_size=64", "model.moe.moe_layer_freq=[1,0,1,1]")
SKIP_EXPERTS = "trainer.fp8.skip=[*.mlp.experts.*]"


def _meta_model(cfg: Config):
    from trainer.model import GPTModel

    with torch.device("meta"):
        return GPTModel(cfg.model, padded_vocab_size=cfg.model.vocab_size, seed=0)


def test_moe_conversion_takes_experts_shared_experts_and_dense_linears_not_the_router(compose):
    from torchao.float8.float8_linear import Float8Linear

    from parallel.float8 import Float8GroupedLinear, convert_to_float8
    from trainer.model.moe import GroupedLinear, TopKRouter

    cfg = _cfg(compose, *MOE)
    model, bf16 = _meta_model(cfg), _meta_model(cfg)
    n = convert_to_float8(model, cfg, "cuda", fsdp=False)
    kinds = {name: type(m) for name, m in model.named_modules()}
    experts = sorted(k for k, t in kinds.items() if t is Float8GroupedLinear)
    linears = sorted(k for k, t in kinds.items() if t is Float8Linear)
    assert experts == [f"decoder.layers.{i}.mlp.experts.{p}" for i in (0, 2, 3)
                       for p in ("linear_fc1_gate", "linear_fc1_up", "linear_fc2")]
    assert [k for k in linears if ".mlp." in k] == (
        [f"decoder.layers.0.mlp.shared_experts.{p}" for p in ("linear_fc1_gate", "linear_fc1_up", "linear_fc2")]
        + [f"decoder.layers.1.mlp.{p}" for p in ("linear_fc1_gate", "linear_fc1_up", "linear_fc2")]
        + [f"decoder.layers.{i}.mlp.shared_experts.{p}" for i in (2, 3)
           for p in ("linear_fc1_gate", "linear_fc1_up", "linear_fc2")])
    assert n == len(experts) + len(linears) == 9 + 2 * 4 + 12
    assert all(type(m.mlp.router) is TopKRouter for i, m in model.decoder.layers.items() if i != "1")
    assert type(model.output_layer) is torch.nn.Linear
    # The same parameters under the same names: checkpoints and converters cannot tell an fp8 model.
    assert {k: (v.shape, v.dtype) for k, v in model.state_dict().items()} == {
        k: (v.shape, v.dtype) for k, v in bf16.state_dict().items()}
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())

    skipping = _cfg(compose, *MOE, "trainer.fp8.skip=[*.mlp.experts.*,decoder.layers.1.*]")
    model = _meta_model(skipping)
    assert convert_to_float8(model, skipping, "cuda", fsdp=False) == 2 * 3 + 9
    assert not any(isinstance(m, Float8GroupedLinear) for m in model.modules())
    assert sum(type(m) is GroupedLinear for m in model.modules()) == 9


def _groups(sizes: list[int]):
    counts = torch.tensor(sizes)
    return counts.cumsum(0).to(torch.int32), int(counts.sum())


def test_float8_grouped_linear_pads_each_group_to_16_rows_and_loses_nothing(monkeypatch):
    """The padding around torchao's GEMM (which cannot run on CPU) with a plain grouped GEMM in its place: the
    padded groups are multiples of 16 (at least 16, empty ones too), and output and gradients equal the loop
    over experts' (a loop here too: torch._grouped_mm on CPU differs by torch release)."""
    import parallel.float8 as f8
    from trainer.model.moe import GroupedLinear

    seen = []

    def fake(a, b_t, ends):
        sizes = torch.diff(ends.long(), prepend=ends.new_zeros(1).long())
        seen.append(sizes)
        assert ends.dtype == torch.int32 and a.is_contiguous() and b_t.stride(-2) == 1
        starts = [0] + ends.tolist()
        parts = [a[s:e] @ b_t[g] for g, (s, e) in enumerate(zip(starts, starts[1:]))]
        return torch.cat(parts + [a.new_zeros(a.shape[0] - starts[-1], b_t.shape[-1])])

    monkeypatch.setattr(f8, "scaled_grouped_mm", fake)
    offsets, rows = _groups([5, 0, 16, 17, 1])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 32, generator=gen)
    weight = torch.randn(5, 48, 32, generator=gen)
    results = []
    for converted in (False, True):
        layer = GroupedLinear(5, 32, 48)
        layer.weight.data.copy_(weight)
        xi = x.clone().requires_grad_()
        if converted:
            layer.__class__ = f8.Float8GroupedLinear
            out = layer.grouped(xi, offsets, torch.float32)
        else:
            out = layer.looped(xi, offsets.tolist())
        out.square().sum().backward()
        results.append((out.detach(), xi.grad, layer.weight.grad))
    assert seen[0].tolist() == [16, 16, 16, 32, 16]
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    with pytest.raises(RuntimeError, match=r"has no fp8 path .* trainer.fp8.skip=\['\*.mlp.experts.\*'\]"):
        layer.looped(x, [5, 5, 21, 38, 39])


def test_pad_groups_places_rows_in_order_inside_their_padded_group():
    from parallel.float8 import pad_groups

    offsets, rows = _groups([3, 0, 18])
    where, ends, allocated = pad_groups(offsets, rows, 16)
    assert where.tolist() == [0, 1, 2] + list(range(32, 50)) and ends.tolist() == [16, 32, 64]
    assert allocated == 21 + 3 * 16 >= int(ends[-1])


def _fake_gpu(monkeypatch, capability, name="NVIDIA H100 80GB HBM3", grouped=True):
    import parallel.float8 as f8

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(f8, "grouped_mm_usable", lambda *a: grouped)


KEEP = r"keep the routed experts in bf16 with trainer.fp8.skip=\['\*.mlp.experts.\*'\]"


@pytest.mark.parametrize("device,capability,overrides,grouped,message", [
    ("cpu", None, [], True, r"\(decoder.layers.0.mlp.experts.linear_fc1_gate, ...\) on CPU: torchao 0.18.\S+'s "
                            r"grouped-expert float8 has no emulation .* CUDA compute capability 9.x or 10.x only\); "
                            r"run on such a GPU with trainer.fp8.emulate unset, or " + KEEP),
    ("cuda", (9, 0), ["trainer.fp8.emulate=true"], True, r"with trainer.fp8.emulate=true: torchao \S+'s "
                                                         r"grouped-expert float8 has no emulation"),
    ("cuda", (8, 9), [], True, r"runs on compute capability 9.x or 10.x only \(Hopper, Blackwell B100/B200\); "
                               r"NVIDIA L4 has 8.9: " + KEEP),
    ("cuda", (12, 0), [], True, r"NVIDIA L4 has 12.0"),
    ("cuda", (9, 0), [], False, r"torch._grouped_mm does not run on NVIDIA L4 .* the loop over experts, which has no "
                                r"fp8 path"),
    ("cuda", (9, 0), ["trainer.fp8.recipe=tensorwise"], True,
     r"grouped-expert float8 has the rowwise recipe only \(Float8TrainingRecipe.FP8_ROWWISE\), not "
     r"trainer.fp8.recipe=tensorwise: use trainer.fp8.recipe=rowwise, or " + KEEP),
    ("cuda", (9, 0), ["model.moe.moe_grouped_gemm=false"], True,
     r"the loop over experts \(model.moe.moe_grouped_gemm=false\) has no fp8 path"),
    ("cpu", None, ["model.moe.moe_ffn_hidden_size=88"], True,
     r"decoder.layers.0.mlp.experts.linear_fc1_gate is 8 experts x 88 x 128; fp8 grouped GEMMs need both dimensions "
     r"of each expert divisible by 16"),
    ("cpu", None, ["model.moe.moe_shared_expert_intermediate_size=72", SKIP_EXPERTS],
     True, r"decoder.layers.0.mlp.shared_experts.linear_fc1_gate is 72 x 128 on each tensor-parallel rank"),
], ids=["cpu", "emulated-on-cuda", "ada", "sm120", "no-grouped-mm", "tensorwise", "looped", "not-16", "shared-not-16"])
def test_moe_refusals(compose, monkeypatch, device, capability, overrides, grouped, message):
    if capability is not None:
        _fake_gpu(monkeypatch, capability, "NVIDIA L4", grouped)
    with pytest.raises(ConfigError, match=r"trainer.precision=fp8.* " + message):
        check_fp8(_cfg(compose, "model=tiny_moe", *overrides), 1, torch.device(device))


def test_moe_fp8_runs_where_torchao_can(compose, monkeypatch):
    import importlib.util

    import parallel.float8 as f8

    _fake_gpu(monkeypatch, (9, 0))
    check_fp8(_cfg(compose, *MOE), 1, torch.device("cuda"))  # Hopper, fp8 GEMMs
    _fake_gpu(monkeypatch, (10, 0))
    check_fp8(_cfg(compose, *MOE), 1, torch.device("cuda"))  # Blackwell
    # With the experts in bf16 anything goes that the dense linears allow: emulated on CPU, tensorwise, an MoE
    # layer's absent dense MLP not divisible by 16 (ffn_hidden_size 360 only sizes the dense layer 1: skipped).
    check_fp8(_cfg(compose, *MOE, SKIP_EXPERTS, "trainer.fp8.recipe=tensorwise"), 1, torch.device("cpu"))
    check_fp8(_cfg(compose, "model=tiny_moe", "model.ffn_hidden_size=360", SKIP_EXPERTS), 1, torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"decoder.layers.1.mlp.linear_fc1_gate is 360 x 128"):
        check_fp8(_cfg(compose, *MOE, "model.ffn_hidden_size=360", SKIP_EXPERTS), 1, torch.device("cpu"))
    # A torchao without the grouped-expert prototype is refused naming its version.
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torchao.prototype.moe_training" else find(name, *a))
    monkeypatch.setattr(f8, "torchao_version", lambda: "0.18.1")
    with pytest.raises(ConfigError, match=r"torchao 0.18.1 has no grouped-expert float8 "
                                          r"\(torchao.prototype.moe_training\); install torchao>=0.18,<0.19, or "
                                          + KEEP):
        check_fp8(_cfg(compose, *MOE), 1, torch.device("cuda"))


def test_moe_fp8_with_the_experts_skipped_trains_on_cpu(compose):
    """Emulated fp8 on the attention and shared-expert linears, the routed experts bf16: one step runs, the
    experts' GEMMs are the bf16 ones (their module unchanged) and the loss differs from bf16's (the casts ran)."""
    cfg = _cfg(compose, *MOE, SKIP_EXPERTS)
    losses = []
    for c in (cfg, dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, precision="bf16"))):
        model = _build(c).modules[0]
        ids = torch.randint(0, c.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        losses.append(loss.item())
    assert losses[0] != losses[1] and abs(losses[0] - losses[1]) < 1e-2 * losses[1]
