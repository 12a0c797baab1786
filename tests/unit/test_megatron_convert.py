"""HF <-> Megatron-LM legacy checkpoints: bitwise round trips at every TP x PP, the on-disk layout checked
against megatron-core's own sharding rules, TE names, logits against transformers, and refusals that write
nothing. (A real megatron-core GPTModel loading the shards: tests/distributed/test_megatron_core_load.py.)"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from checkpoint_convert.hf import read_hf_config
from checkpoint_convert.megatron import hf_to_megatron, load_megatron_as_meshtron, megatron_to_hf
from checkpoint_convert.megatron_format import megatron_config
from tests.tiny_hf import VARIANTS, save_tiny_hf
from tests.unit.test_hf_parity import _inputs, _read_safetensors_dir
from trainer.errors import ConfigError
from trainer.model import GPTModel

transformers = pytest.importorskip("transformers")

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """One saved tiny HF checkpoint per family variant, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("hf")
    return {name: (root / name, save_tiny_hf(name, root / name)) for name in VARIANTS}


def _load_rank(path: Path) -> dict:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _same_config(a: Path, b: Path) -> None:
    ca, cb = read_hf_config(a), read_hf_config(b)
    assert dataclasses.replace(ca, name="", hf_path=None) == dataclasses.replace(cb, name="", hf_path=None)


def _nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*")), "temporary directory left behind"


# ---------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}pp{p}" for t, p in LAYOUTS])
@pytest.mark.parametrize("name,spec", [(n, "local") for n in VARIANTS] + [("llama3.2-tied", "te"),
                                                                          ("qwen3-head-dim", "te")])
def test_round_trip_is_bitwise(hf_dirs, tmp_path, name, spec, tp, pp):
    src, _ = hf_dirs[name]
    meg = hf_to_megatron(src, tmp_path / "meg", tp=tp, pp=pp, spec=spec, progress=False)
    assert (meg / "latest_checkpointed_iteration.txt").read_text() == "release"
    dirs = sorted(p.name for p in (meg / "release").iterdir())
    assert dirs == sorted(f"mp_rank_{t:02d}" + (f"_{s:03d}" if pp > 1 else "") for t in range(tp) for s in range(pp))

    back = megatron_to_hf(meg, tmp_path / "back", progress=False)
    original, returned = _read_safetensors_dir(src), _read_safetensors_dir(back)
    assert returned.keys() == original.keys()
    for key, tensor in original.items():
        assert returned[key].dtype == tensor.dtype and torch.equal(returned[key], tensor), key
    _same_config(src, back)
    assert (back / "generation_config.json").exists()
    assert not list(tmp_path.glob(".*")), "temporary directory left behind"


def test_bf16_round_trip_keeps_dtype_and_args(tmp_path, capfd):
    src = tmp_path / "hf"
    save_tiny_hf("qwen2-tied-bias", src, dtype=torch.bfloat16)
    meg = hf_to_megatron(src, tmp_path / "meg", tp=2, pp=2, progress=False)
    args = _load_rank(meg / "release/mp_rank_00_000/model_optim_rng.pt")["args"]
    assert args.params_dtype == torch.bfloat16 and args.bf16 and not args.fp16
    back = megatron_to_hf(meg, tmp_path / "back", progress=False)
    assert ("vocabulary: 96 of the checkpoint's 256 rows (vocab_size=96 that meshtron's hf-to-megatron recorded "
            "from the HF config)") in capfd.readouterr().err
    original, returned = _read_safetensors_dir(src), _read_safetensors_dir(back)
    assert all(returned[k].dtype == torch.bfloat16 and torch.equal(returned[k], t) for k, t in original.items())
    assert json.loads((back / "config.json").read_text())["dtype"] == "bfloat16"


# --------------------------------------------------------------------------- layout, independently


def _group_rows(q, k, v, groups, d):
    """Megatron's fused QKV rows for the given query groups, written out group by group."""
    hpg = q.shape[0] // d // 2  # 4 heads, 2 groups in these tests
    rows = []
    for g in groups:
        rows += [q[g * hpg * d:(g + 1) * hpg * d], k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]]
    return torch.cat(rows)


def test_tp2_pp2_files_follow_megatron_core_sharding(hf_dirs, tmp_path):
    """Each rank file against the HF tensors, sliced here by hand the way megatron-core shards them."""
    src, _ = hf_dirs["qwen2-tied-bias"]  # tied + qkv bias: the trickiest placement
    hf = _read_safetensors_dir(src)
    meg = hf_to_megatron(src, tmp_path / "meg", tp=2, pp=2, progress=False)
    d, padded = 16, 256  # head_dim; vocab 96 padded to a multiple of 128 x tp
    for s in range(2):
        for r in range(2):
            ckpt = _load_rank(meg / f"release/mp_rank_{r:02d}_{s:03d}/model_optim_rng.pt")
            assert ckpt["checkpoint_version"] == 3.0 and ckpt["iteration"] == 0
            model = ckpt["model"]
            args = ckpt["args"]
            assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (2, 2)
            assert args.padded_vocab_size == padded and args.vocab_size == 96
            assert not args.untie_embeddings_and_output_weights and args.add_qkv_bias and args.swiglu
            assert args.num_query_groups == 2 and args.group_query_attention and args.kv_channels == d
            layers = {int(k.split(".")[2]) for k in model if k.startswith("decoder.layers.")}
            assert layers == {0, 1}  # numbered locally on each stage
            vocab_rows = slice(r * padded // 2, (r + 1) * padded // 2)
            emb = torch.cat([hf["model.embed_tokens.weight"], torch.zeros(padded - 96, 64)])[vocab_rows]
            if s == 0:
                assert torch.equal(model["embedding.word_embeddings.weight"], emb)
                assert "decoder.final_layernorm.weight" not in model and "output_layer.weight" not in model
            else:
                # Tied at PP>1: megatron-core's last stage holds its own copy of the (padded) embedding.
                assert "embedding.word_embeddings.weight" not in model
                assert torch.equal(model["output_layer.weight"], emb)
                assert torch.equal(model["decoder.final_layernorm.weight"], hf["model.norm.weight"])
                assert "output_layer._extra_state" in model
            for local in range(2):
                pre, hf_pre = f"decoder.layers.{local}.", f"model.layers.{2 * s + local}."
                attn = {p: hf[f"{hf_pre}self_attn.{p}_proj.weight"] for p in "qkv"}
                bias = {p: hf[f"{hf_pre}self_attn.{p}_proj.bias"] for p in "qkv"}
                assert torch.equal(model[pre + "self_attention.linear_qkv.weight"],
                                   _group_rows(attn["q"], attn["k"], attn["v"], [r], d))
                assert torch.equal(model[pre + "self_attention.linear_qkv.bias"],
                                   _group_rows(bias["q"], bias["k"], bias["v"], [r], d))
                o = hf[f"{hf_pre}self_attn.o_proj.weight"]
                assert torch.equal(model[pre + "self_attention.linear_proj.weight"], o[:, r * 32:(r + 1) * 32])
                gate, up = hf[f"{hf_pre}mlp.gate_proj.weight"], hf[f"{hf_pre}mlp.up_proj.weight"]
                half = slice(r * 56, (r + 1) * 56)
                assert torch.equal(model[pre + "mlp.linear_fc1.weight"], torch.cat([gate[half], up[half]]))
                down = hf[f"{hf_pre}mlp.down_proj.weight"]
                assert torch.equal(model[pre + "mlp.linear_fc2.weight"], down[:, half])
                assert torch.equal(model[pre + "input_layernorm.weight"], hf[f"{hf_pre}input_layernorm.weight"])
                assert torch.equal(model[pre + "pre_mlp_layernorm.weight"],
                                   hf[f"{hf_pre}post_attention_layernorm.weight"])
                assert model[pre + "mlp.linear_fc1._extra_state"] is None


# Per-layer state dict keys of megatron-core 0.16.1's get_gpt_layer_with_transformer_engine_spec
# (megatron/core/models/gpt/gpt_layer_specs.py): input_layernorm and pre_mlp_layernorm are IdentityOp,
# linear_qkv and linear_fc1 are TELayerNormColumnParallelLinear (norm weight `layer_norm_weight`, bias only
# with add_qkv_bias), q/k_layernorm are TENorm (`weight`), linear_proj/linear_fc2 TERowParallelLinear.
# Every TE linear carries `_extra_state`. The decoder's final norm is TENorm: `decoder.final_layernorm.weight`.
TE_LAYER_KEYS = {
    "self_attention.linear_qkv.layer_norm_weight", "self_attention.linear_qkv.weight",
    "self_attention.linear_qkv._extra_state", "self_attention.linear_proj.weight",
    "self_attention.linear_proj._extra_state", "mlp.linear_fc1.layer_norm_weight", "mlp.linear_fc1.weight",
    "mlp.linear_fc1._extra_state", "mlp.linear_fc2.weight", "mlp.linear_fc2._extra_state",
}
TE_QKV_BIAS = {"self_attention.linear_qkv.bias"}
TE_QK_NORM = {"self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"}


@pytest.mark.parametrize("name,extra", [("llama3.1", set()), ("qwen2-tied-bias", TE_QKV_BIAS),
                                        ("qwen3-head-dim", TE_QK_NORM)])
def test_te_spec_names_match_megatron_core_te_layer_spec(hf_dirs, tmp_path, name, extra):
    src, _ = hf_dirs[name]
    meg = hf_to_megatron(src, tmp_path / "meg", tp=1, pp=1, spec="te", progress=False)
    ckpt = _load_rank(meg / "release/mp_rank_00/model_optim_rng.pt")
    assert ckpt["args"].transformer_impl == "transformer_engine"
    model = ckpt["model"]
    for layer in range(4):
        pre = f"decoder.layers.{layer}."
        assert {k[len(pre):] for k in model if k.startswith(pre)} == TE_LAYER_KEYS | extra
    outside = {k for k in model if not k.startswith("decoder.layers.")}
    assert outside == {"embedding.word_embeddings.weight", "decoder.final_layernorm.weight",
                       "output_layer._extra_state"} | ({"output_layer.weight"} if "tied" not in name else set())


# ----------------------------------------------------------------------------------------- logits


@pytest.mark.parametrize("name", list(VARIANTS))
def test_meshtron_from_megatron_tp2_pp2_matches_transformers(hf_dirs, tmp_path, name):
    src, hf_model = hf_dirs[name]
    meg = hf_to_megatron(src, tmp_path / "meg", tp=2, pp=2, progress=False)
    cfg, state = load_megatron_as_meshtron(meg)
    assert dataclasses.replace(cfg, name="", hf_path=None) == dataclasses.replace(read_hf_config(src), name="",
                                                                                    hf_path=None)
    assert megatron_config(meg) == cfg
    model = GPTModel(cfg).eval()
    model.load_state_dict(state, strict=True)
    ids, pos = _inputs(cfg.vocab_size)
    with torch.no_grad():
        for position_ids in (None, pos):
            ref = hf_model(input_ids=ids, position_ids=position_ids).logits
            assert (model(ids, position_ids) - ref).abs().max().item() <= 1e-4


# --------------------------------------------------------------------------- reading other layouts


def test_iteration_directories_hf_config_tokenizer_and_sharded_output(hf_dirs, tmp_path, capfd):
    src, hf_model = tmp_path / "src", hf_dirs["llama3.1"][1]
    shutil.copytree(hf_dirs["llama3.1"][0], src)
    (src / "tokenizer_config.json").write_text('{"model_max_length": 256}\n')
    meg = hf_to_megatron(src, tmp_path / "meg", tp=2, pp=1, spec="te", progress=True)
    assert "B/s" in capfd.readouterr().err  # tqdm's byte rate
    (meg / "release").rename(meg / "iter_0000100")
    (meg / "latest_checkpointed_iteration.txt").write_text("100\n")

    back = megatron_to_hf(meg, tmp_path / "back", hf_config_dir=src, progress=False, max_shard_bytes=60_000)
    assert (back / "model.safetensors.index.json").exists() and len(list(back.glob("*.safetensors"))) > 1
    assert (back / "config.json").read_bytes() == (src / "config.json").read_bytes()
    assert (back / "tokenizer_config.json").read_bytes() == (src / "tokenizer_config.json").read_bytes()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(back, attn_implementation="eager").eval()
    ids, _ = _inputs(96)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, hf_model(input_ids=ids).logits, rtol=0, atol=0)

    (meg / "latest_checkpointed_iteration.txt").write_text("release")
    with pytest.raises(FileNotFoundError, match="release"):
        megatron_to_hf(meg, tmp_path / "none", progress=False)
    _nothing_written(tmp_path / "none")
    assert megatron_config(meg, iteration=100).num_layers == 4
    with pytest.raises(FileNotFoundError, match=r"iter_0000007 does not exist \(--iteration 7\)"):
        megatron_config(meg, iteration=7)
    (meg / "latest_checkpointed_iteration.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"or pass --iteration N for its iter_NNNNNNN directory"):
        megatron_config(meg)
    again = megatron_to_hf(meg, tmp_path / "again", iteration=100, progress=False)
    assert _read_safetensors_dir(again).keys() == _read_safetensors_dir(src).keys()


# ------------------------------------------------------------------------------------------ refusals


@pytest.fixture
def llama_src(hf_dirs, tmp_path):
    """A private copy of the untied llama checkpoint that a test may edit."""
    src = tmp_path / "src"
    shutil.copytree(hf_dirs["llama3.1"][0], src)
    return src


@pytest.mark.parametrize("kwargs,error", [
    (dict(tp=4, pp=1), r"num_query_groups=2 is not divisible by tp=4"),
    (dict(tp=1, pp=3), r"pp=3 does not divide num_layers=4"),
    (dict(tp=1, pp=1, spec="nemo"), r"spec='nemo' is not supported; expected one of \['local', 'te'\]"),
    (dict(tp=0, pp=1), r"tp=0 must be a positive integer"),
])
def test_layouts_that_do_not_fit_are_refused_before_writing(llama_src, tmp_path, kwargs, error):
    with pytest.raises(ConfigError, match=error):
        hf_to_megatron(llama_src, tmp_path / "out", progress=False, **kwargs)
    _nothing_written(tmp_path / "out")


def _edit_hf(src: Path, tensors=None, config=None) -> None:
    if tensors:
        t = _read_safetensors_dir(src)
        tensors(t)
        save_file(t, str(src / "model.safetensors"), metadata={"format": "pt"})
    if config:
        c = json.loads((src / "config.json").read_text())
        config(c)
        (src / "config.json").write_text(json.dumps(c))


@pytest.mark.parametrize("edit,error,match", [
    (dict(tensors=lambda t: t.pop("lm_head.weight")), KeyError, "lm_head.weight is missing.*tie_word_embeddings=false"),
    (dict(config=lambda c: c.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])), ConfigError,
     "model_type='gpt2' is not supported"),
    (dict(config=lambda c: c.update(intermediate_size=120)), ValueError,
     r"gate_proj.weight \[112, 64\] gives .*linear_fc1_gate.weight of shape \[112, 64\].*\[120, 64\]"),
    (dict(tensors=lambda t: t.update({"model.layers.0.extra.weight": torch.ones(2)})), KeyError,
     "no place for.*model.layers.0.extra.weight"),
])
def test_bad_hf_checkpoints_are_refused_before_writing(llama_src, tmp_path, edit, error, match):
    _edit_hf(llama_src, **edit)
    with pytest.raises(error, match=match):
        hf_to_megatron(llama_src, tmp_path / "out", tp=2, pp=2, progress=False)
    _nothing_written(tmp_path / "out")


def test_existing_output_is_refused_unless_overwrite(hf_dirs, tmp_path):
    src, _ = hf_dirs["qwen3-head-dim"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        hf_to_megatron(src, out, tp=1, pp=1, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not list(tmp_path.glob(".out*"))
    hf_to_megatron(src, out, tp=1, pp=2, progress=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["hf", "latest_checkpointed_iteration.txt", "release"]
    with pytest.raises(FileExistsError, match="not an empty directory"):
        megatron_to_hf(out, src, progress=False)


def test_broken_megatron_checkpoints_are_refused_before_writing(hf_dirs, tmp_path):
    src, _ = hf_dirs["llama3.1"]
    meg = hf_to_megatron(src, tmp_path / "meg", tp=2, pp=2, progress=False)
    out = tmp_path / "out"
    other = tmp_path / "other"
    other.mkdir()
    shutil.copyfile(src / "config.json", other / "config.json")
    _edit_hf(other, config=lambda c: c.update(num_hidden_layers=2))
    with pytest.raises(ConfigError, match="describes another model.*num_layers: config.json 2 vs checkpoint 4"):
        megatron_to_hf(meg, out, hf_config_dir=other, progress=False)
    _nothing_written(out)

    for rank in (1, 0):
        last = meg / f"release/mp_rank_{rank:02d}_001/model_optim_rng.pt"
        ckpt = _load_rank(last)
        ckpt["model"].pop("output_layer.weight")
        torch.save(ckpt, last)
        if rank == 1:
            with pytest.raises(KeyError, match="TP ranks of pipeline stage 1 hold different tensor names"):
                megatron_to_hf(meg, out, progress=False)
    with pytest.raises(KeyError, match="output_layer.weight is missing.*untie_embeddings_and_output_weights=True"):
        megatron_to_hf(meg, out, progress=False)
    _nothing_written(out)

    last.unlink()
    with pytest.raises(FileNotFoundError, match=r"TP=2 x PP=2 but rank files \['mp_rank_00_001"):
        megatron_to_hf(meg, out, progress=False)
    _nothing_written(out)
    (meg / "latest_checkpointed_iteration.txt").unlink()
    with pytest.raises(FileNotFoundError, match="latest_checkpointed_iteration.txt"):
        load_megatron_as_meshtron(meg)
