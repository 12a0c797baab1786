"""Rank files as Megatron-LM's own save_checkpoint writes them (`--ckpt-format torch`).

megatron/training/checkpointing.py (generate_state_dict, save_checkpoint, get_rng_state) pickles, per rank:
args (with megatron-core's AttnBackend, CudaGraphScope, ModelType and signal.Signals in it), checkpoint_version,
iteration, model (or model0, model1, ... with virtual pipeline stages), optimizer, opt_param_scheduler,
rng_state (python, numpy and torch generator states) and num_floating_point_operations_so_far. The files here
hold the real objects, made with the installed megatron-core (0.16.1); megatron-to-hf must read them exactly
(against the HF model they came from), without megatron installed, keep the real vocabulary, and refuse
anything else in a file, naming it, without running it.
"""

from __future__ import annotations

import argparse
import io
import json
import pathlib
import pickle
import pickletools
import random
import signal
import subprocess
import sys
import types
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoint_convert.cli import main as convert_cli
from checkpoint_convert.megatron import hf_to_megatron, megatron_to_hf
from checkpoint_convert.megatron_format import rank_dir
from checkpoint_convert.megatron_format import (ALLOWED_NAMES, load_rank_file, megatron_safe_globals,
                                                refusal_message)
from tests.tiny_hf import SHAPE, randomized
from tests.unit.test_hf_parity import _inputs, _read_safetensors_dir
from trainer.errors import ConfigError, DamagedFileError

transformers = pytest.importorskip("transformers")
with warnings.catch_warnings():  # megatron-core warns about missing Transformer Engine / Apex on import
    warnings.simplefilter("ignore")
    pytest.importorskip("megatron.core")
    from megatron.core import enums as core_enums
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.rerun_state_machine import RerunDiagnostic, RerunMode, RerunState
    from megatron.core.transformer import enums as transformer_enums
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

ITERATION = 10


def _save_llama(path: Path, vocab: int = 96, tied: bool = False):
    """A Llama without rope scaling: everything about it is in Megatron-LM's own args."""
    model = randomized(transformers.LlamaForCausalLM,
                       transformers.LlamaConfig(**{**SHAPE, "vocab_size": vocab}, tie_word_embeddings=tied))
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "llama"
    return path, _save_llama(path)


def _load_ours(path: Path) -> dict:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _megatron_lm_args(ours: argparse.Namespace, **changes) -> argparse.Namespace:
    """The args Megatron-LM 0.16 pickles: the model's arguments (meshtron's own keys dropped, vocab_size unset
    as with an HF tokenizer) and the typed values its argument parser makes."""
    args = {k: v for k, v in vars(ours).items() if not k.startswith("meshtron_")}
    args.update(vocab_size=None, tokenizer_type="HuggingFaceTokenizer", tokenizer_model="/models/llama",
                attention_backend=transformer_enums.AttnBackend.auto, exit_signal=signal.SIGTERM,
                exit_signal_handler=False, cuda_graph_scope=[transformer_enums.CudaGraphScope.attn],
                model_type=core_enums.ModelType.encoder_or_decoder, ckpt_format="torch", rank=0,
                data_parallel_size=1, save="/checkpoints/llama", lr=3e-4, min_lr=3e-5, train_iters=ITERATION)
    args.update(changes)
    return argparse.Namespace(**args)


def _megatron_lm_state(args: argparse.Namespace, model: dict) -> dict:
    """One rank file's dict as generate_state_dict and save_checkpoint build it (fp32, so FP32Optimizer:
    its state_dict is torch's; param groups carry Megatron's extra keys)."""
    params = [torch.nn.Parameter(t.clone()) for k, t in model.items() if isinstance(t, torch.Tensor)]
    group = {"params": params, "wd_mult": 1.0, "lr_mult": 1.0, "is_expert_parallel": False,
             "default_config": True, "max_lr": args.lr, "min_lr": args.min_lr}
    adam = torch.optim.Adam([group], lr=args.lr)
    for p in params:
        p.grad = torch.ones_like(p)
    adam.step()
    scheduler = OptimizerParamScheduler(adam, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr, lr_warmup_steps=2,
                                        lr_decay_steps=ITERATION, lr_decay_style="cosine", start_wd=0.01,
                                        end_wd=0.01, wd_incr_steps=ITERATION, wd_incr_style="constant")
    rng = {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
           "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.get_rng_state(),  # CPU here
           "rng_tracker_states": {"model-parallel-rng": torch.get_rng_state()}}
    return {"args": args, "checkpoint_version": 3.0, "iteration": ITERATION, **model,
            "optimizer": adam.state_dict(), "opt_param_scheduler": scheduler.state_dict(), "rng_state": [rng],
            "num_floating_point_operations_so_far": 1.25e15}


def _fill_padding(model: dict, rank: int, vocab: int) -> None:
    """Megatron trains the padding rows too (the output layer scores them): make them non-zero, the same in
    the embedding and the output layer (a tied last-stage copy is kept equal to the embedding)."""
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if name in model:
            padding = model[name][max(0, vocab - rank * model[name].shape[0]):]
            padding.copy_(torch.randn(padding.shape, generator=torch.Generator().manual_seed(rank)))


class MegatronLM:
    """Our release checkpoint rewritten as Megatron-LM writes iteration 10 of a run; `states` keeps what each
    rank file holds, so a test can change one and write it again without reading it back.
    `chunks`: {rank directory: {"model0": our rank file, ...}} for virtual pipeline stages."""

    def __init__(self, ours: Path, out: Path, vocab: int, chunks=None, **arg_changes):
        if chunks is None:
            chunks = {d.name: {"model": d / "model_optim_rng.pt"} for d in sorted((ours / "release").iterdir())}
        self.dir, self.states = out, {}
        for name, entries in chunks.items():
            loaded = {key: _load_ours(path) for key, path in entries.items()}
            args = _megatron_lm_args(next(iter(loaded.values()))["args"], **arg_changes)
            for ckpt in loaded.values():
                _fill_padding(ckpt["model"], int(name.split("_")[2]), vocab)
            self.states[name] = _megatron_lm_state(args, {key: ckpt["model"] for key, ckpt in loaded.items()})
            self.write(name)
        (out / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))

    def path(self, name: str) -> Path:
        return self.dir / f"iter_{ITERATION:07d}" / name / "model_optim_rng.pt"

    def write(self, name: str) -> None:
        self.path(name).parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.states[name], self.path(name))

    def rows(self, name: str, tp: int, pp: int, pp_rank: int = 0) -> torch.Tensor:
        """A vocabulary tensor as written, TP shards stacked: padding included."""
        return torch.cat([self.states[rank_dir(r, pp_rank, pp)]["model"][name] for r in range(tp)])


def _pickled_globals(path: Path) -> set[str]:
    """Every global the file's pickle names, read statically (pickletools: nothing is rebuilt)."""
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    return {arg.replace(" ", ".") for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


def _outside_torch(names: set[str]) -> set[str]:
    """The globals torch itself does not provide (tensors, dtypes, OrderedDict, bytes)."""
    return {n for n in names if not n.startswith(("torch.", "collections.", "_codecs."))}


def _logits(path: Path, vocab: int) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(input_ids=_inputs(vocab)[0]).logits


# ----------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (2, 2)], ids=["tp1", "tp2", "tp2pp2"])
def test_megatron_lm_rank_files_convert_exactly(llama, tmp_path, capfd, tp, pp):
    src, hf_model = llama
    ours = hf_to_megatron(src, tmp_path / "ours", tp=tp, pp=pp, progress=False)
    files = MegatronLM(ours, tmp_path / "meg", vocab=96)
    meg = files.dir
    held = _pickled_globals(files.path(rank_dir(0, 0, pp)))
    # What the Megatron-LM files held and torch refuses by default:
    assert {"megatron.core.transformer.enums.AttnBackend", "signal.Signals", "numpy.ndarray", "numpy.dtype"} <= held
    assert any(n.endswith("multiarray._reconstruct") for n in held) and _outside_torch(held) <= ALLOWED_NAMES

    back = megatron_to_hf(meg, tmp_path / "back", hf_config_dir=src, progress=False)
    padded = 128 * tp
    err = capfd.readouterr().err
    assert f"vocabulary: 96 of the checkpoint's {padded} rows (vocab_size of {src}/config.json)" in err
    original, returned = _read_safetensors_dir(src), _read_safetensors_dir(back)
    assert returned.keys() == original.keys()
    assert all(torch.equal(returned[k], t) for k, t in original.items())
    with torch.no_grad():
        ref = hf_model(input_ids=_inputs(96)[0]).logits
    torch.testing.assert_close(_logits(back, 96), ref, rtol=0, atol=0)

    # Without an HF config the args (HuggingFaceTokenizer) do not say the vocabulary: every row is kept, said so.
    whole = megatron_to_hf(meg, tmp_path / "whole", progress=False)
    err = capfd.readouterr().err
    assert f"warning: vocabulary: keeping all {padded} rows" in err and "--hf-config" in err
    emb = _read_safetensors_dir(whole)["model.embed_tokens.weight"]
    assert torch.equal(emb, files.rows("embedding.word_embeddings.weight", tp, pp))
    assert json.loads((whole / "config.json").read_text())["vocab_size"] == padded
    torch.testing.assert_close(_logits(whole, 96)[..., :96], ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("tp", [1, 2])
def test_null_tokenizer_keeps_its_eod_row(tmp_path, capfd, tp):
    """NullTokenizer(vocab_size=256) has 257 tokens (EOD = 256), padded to 384 (TP 1) or 512 (TP 2)."""
    src = tmp_path / "src"
    hf_model = _save_llama(src, vocab=257)
    ours = hf_to_megatron(src, tmp_path / "ours", tp=tp, pp=1, progress=False)
    files = MegatronLM(ours, tmp_path / "meg", vocab=257, tokenizer_type="NullTokenizer", vocab_size=256)
    meg = files.dir
    padded = 384 if tp == 1 else 512  # Megatron's rule: a multiple of make_vocab_size_divisible_by (128) x TP
    assert files.states["mp_rank_00"]["args"].padded_vocab_size == padded

    back = megatron_to_hf(meg, tmp_path / "back", progress=False)
    assert (f"vocabulary: 257 of the checkpoint's {padded} rows (tokenizer_type=NullTokenizer: vocab_size=256 + 1 "
            f"EOD token)") in capfd.readouterr().err
    tensors = _read_safetensors_dir(back)
    for hf_name, meg_name in (("model.embed_tokens.weight", "embedding.word_embeddings.weight"),
                              ("lm_head.weight", "output_layer.weight")):
        rows = files.rows(meg_name, tp, 1)
        assert tensors[hf_name].shape[0] == 257
        assert torch.equal(tensors[hf_name][256], rows[256])  # the EOD row, bitwise
        assert torch.equal(tensors[hf_name], rows[:257])
    assert json.loads((back / "config.json").read_text())["vocab_size"] == 257
    with torch.no_grad():
        torch.testing.assert_close(_logits(back, 257), hf_model(input_ids=_inputs(257)[0]).logits, rtol=0, atol=0)


def test_virtual_pipeline_chunks_model0_model1(tmp_path):
    """PP 2 x 2 virtual stages: each rank file holds model0 and model1, placed by megatron-core's own offsets."""
    src = tmp_path / "src"
    _save_llama(src, tied=True)  # the tied output layer lives on the last chunk of the last stage
    ours = hf_to_megatron(src, tmp_path / "ours", tp=2, pp=4, progress=False)  # one layer per file
    with warnings.catch_warnings():  # its defaults warn about CUDA graph scopes
        warnings.simplefilter("ignore")
        core = TransformerConfig(num_layers=4, hidden_size=64, num_attention_heads=4, pipeline_model_parallel_size=2,
                                 virtual_pipeline_model_parallel_size=2, pipeline_dtype=torch.float32)
    chunks = {rank_dir(r, s, 2): {f"model{c}": ours / "release" / rank_dir(r, get_transformer_layer_offset(
        core, vp_stage=c, pp_rank=s), 4) / "model_optim_rng.pt" for c in range(2)} for s in range(2) for r in range(2)}
    files = MegatronLM(ours, tmp_path / "meg", vocab=96, chunks=chunks, pipeline_model_parallel_size=2,
                       virtual_pipeline_model_parallel_size=2)
    meg = files.dir
    back = megatron_to_hf(meg, tmp_path / "back", hf_config_dir=src, progress=False)
    original, returned = _read_safetensors_dir(src), _read_safetensors_dir(back)
    assert returned.keys() == original.keys() and all(torch.equal(returned[k], t) for k, t in original.items())

    files.states[rank_dir(1, 1, 2)].pop("model1")
    files.write(rank_dir(1, 1, 2))
    with pytest.raises(KeyError, match=r"holds model entries \['model0'\].*virtual_pipeline_model_parallel_size=2"):
        megatron_to_hf(meg, tmp_path / "none", hf_config_dir=src, progress=False)


# --------------------------------------------------------------------------------- the allow-list


def test_every_type_megatron_allows_loads_as_an_inert_stand_in(tmp_path, monkeypatch):
    """One object of each type on Megatron's allow-list (0.14-0.19), pickled from the real classes; 0.18's
    CudaGraphModule and InferenceCudaGraphScope (not in the installed 0.16.1) from look-alikes of their names."""
    import enum

    for name, members in (("CudaGraphModule", "attn mlp"), ("InferenceCudaGraphScope", "none layer block")):
        fake = enum.Enum(name, members, module=transformer_enums.__name__)
        monkeypatch.setattr(transformer_enums, name, fake, raising=False)
    objects = dict(
        attn=transformer_enums.AttnBackend.flash, scope=transformer_enums.CudaGraphScope.moe_router,
        module=transformer_enums.CudaGraphModule.mlp, inference=transformer_enums.InferenceCudaGraphScope.block,
        model_type=core_enums.ModelType.encoder_or_decoder, optimizer_config=OptimizerConfig(lr=1e-3),
        diagnostic=RerunDiagnostic.TRANSIENT_ERROR, mode=RerunMode.VALIDATE_RESULTS, state=RerunState.INITIAL_RUN,
        signal=signal.SIGUSR1, path=pathlib.PosixPath("/data/run"), blob=io.BytesIO(b"te extra state"),
        bag=types.SimpleNamespace(a=1), generator=torch.Generator(), uint32=np.dtypes.UInt32DType,
        array=np.arange(4, dtype=np.uint32))
    path = tmp_path / "model_optim_rng.pt"
    torch.save({"args": argparse.Namespace(**objects), "model": {"w": torch.ones(2)}, "iteration": 3}, path)
    held = _pickled_globals(path)
    assert _outside_torch(held) <= ALLOWED_NAMES and len(held & ALLOWED_NAMES) == 19, sorted(held)

    before = set(torch.serialization.get_safe_globals())  # megatron.core registered its own on import
    args = load_rank_file(path)["args"]
    assert set(torch.serialization.get_safe_globals()) == before  # the allow-list lived for that load only
    expect = dict(attn=("flash", 1), scope=("moe_router", 5), module=("mlp", 2), inference=("block", 3),
                  model_type=("encoder_or_decoder", 1), diagnostic=("TRANSIENT_ERROR", "transient_error"),
                  mode=("VALIDATE_RESULTS", "validate_results"), state=("INITIAL_RUN", 1),
                  signal=("SIGUSR1", signal.SIGUSR1.value))
    for key, (name, value) in expect.items():
        got = getattr(args, key)
        assert not isinstance(got, enum.Enum) and (got.name, got.value) == (name, value), key
    assert args.path == pathlib.PurePosixPath("/data/run") and args.bag == types.SimpleNamespace(a=1)
    for key in ("optimizer_config", "blob", "generator", "array"):  # kept inert, never rebuilt
        assert type(getattr(args, key)).__module__ == "checkpoint_convert.megatron_format", key
    assert args.optimizer_config.state["lr"] == 1e-3


def test_megatron_lm_files_load_without_megatron_installed(llama, tmp_path):
    src, _ = llama
    meg = MegatronLM(hf_to_megatron(src, tmp_path / "ours", tp=2, pp=1, progress=False), tmp_path / "meg",
                     vocab=96).dir
    script = (
        "import sys; sys.modules['megatron'] = None  # import megatron -> ImportError\n"
        "from checkpoint_convert.megatron import megatron_to_hf\n"
        "from checkpoint_convert.megatron_format import load_rank_file\n"
        f"args = load_rank_file(__import__('pathlib').Path({str(meg)!r}) / 'iter_0000010/mp_rank_00/"
        "model_optim_rng.pt')['args']\n"
        "print(repr(args.attention_backend), repr(args.exit_signal), repr(args.model_type))\n"
        f"megatron_to_hf({str(meg)!r}, {str(tmp_path / 'back')!r}, hf_config_dir={str(src)!r}, progress=False)\n"
        "print('megatron' in sys.modules and sys.modules['megatron'] is not None)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["AttnBackend.auto Signals.SIGTERM ModelType.encoder_or_decoder", "False"]
    original, returned = _read_safetensors_dir(src), _read_safetensors_dir(tmp_path / "back")
    assert returned.keys() == original.keys() and all(torch.equal(returned[k], t) for k, t in original.items())


# ------------------------------------------------------------------------------------------ refusals


class _RunsCode:
    def __init__(self, call, marker: Path):
        self.call, self.marker = call, marker

    def __reduce__(self):
        return self.call, ((["touch", str(self.marker)],) if self.call is subprocess.check_call
                           else (f"touch {self.marker}",))


# The names as the pickles spell them: os.system is posix.system (a module torch blocks outright); protocol 2
# writes subprocess.check_call under its Python 2 name, commands.check_call (a global torch does not know).
@pytest.mark.parametrize("call,name", [(__import__("os").system, "posix.system"),
                                       (subprocess.check_call, "commands.check_call")])
def test_a_global_megatron_does_not_allow_is_refused_naming_it(llama, tmp_path, capsys, call, name):
    src, _ = llama
    files = MegatronLM(hf_to_megatron(src, tmp_path / "ours", tp=1, pp=1, progress=False), tmp_path / "meg",
                       vocab=96)
    meg, marker = files.dir, tmp_path / "ran"
    files.states["mp_rank_00"]["args"].hook = _RunsCode(call, marker)
    files.write("mp_rank_00")

    with pytest.raises(ConfigError, match=rf"refusing to unpickle {name}: not among the types Megatron-LM "
                                          rf"itself allows .*megatron/core/safe_globals.py"):
        megatron_to_hf(meg, tmp_path / "out", progress=False)
    # Only the CLI's own output: building megatron-core's scheduler above logs, and in the full suite a logging
    # handler an earlier test left behind may complain about its closed stream.
    capsys.readouterr()
    code = convert_cli(["megatron-to-hf", "--megatron", str(meg), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and name in err[0] and "nothing was run" in err[0]

    buffer = io.BytesIO(files.path("mp_rank_00").read_bytes())  # the same from bytes (torch_dist's common state)
    with megatron_safe_globals(), pytest.raises(pickle.UnpicklingError) as refused:
        torch.load(buffer, weights_only=True)
    with megatron_safe_globals():
        message = refusal_message(buffer, str(refused.value), where="common.pt")
    assert message.startswith(f"common.pt: refusing to unpickle {name}: not among")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_damaged_rank_files_are_named(llama, tmp_path):
    src, _ = llama
    meg = hf_to_megatron(src, tmp_path / "meg", tp=1, pp=1, progress=False)
    path = meg / "release/mp_rank_00/model_optim_rng.pt"
    data = path.read_bytes()
    for content, match in ((data[:len(data) // 2], "is truncated or corrupt"),
                           (b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n", "Git LFS pointer"),
                           (b"", "is truncated or corrupt \\(0 bytes")):
        path.write_bytes(content)
        with pytest.raises(DamagedFileError, match=match):
            megatron_to_hf(meg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
