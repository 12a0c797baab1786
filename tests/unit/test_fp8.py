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
