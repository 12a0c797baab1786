"""Numerical check of a conversion: an HF directory against a Megatron-LM or meshtron checkpoint.

Both are loaded on CPU in fp32: the HF side with transformers' AutoModelForCausalLM (its own modelling code,
not ours), the other side as meshtron's GPTModel. A few fixed prompts go through both and the largest
absolute logit difference is reported per prompt and overall. A scrambled QKV, a dropped tied output layer
or a wrong rope setting shows up as differences of order 1; a correct conversion gives float noise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Union

import torch

from trainer.config import ModelConfig
from trainer.errors import ConfigError

# Exit codes of `verify` (documented in the CLI help and README).
OK, MISMATCH = 0, 1

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n",
    "Once upon a time, in a land far away, there lived a",
)
# Without a tokenizer: fixed pseudo-random ids of these lengths (seeded, so every run checks the same input).
ID_LENGTHS = (7, 16, 33)


def prompts(hf_dir: Path, vocab_size: int) -> list[tuple[str, torch.Tensor]]:
    """(label, token ids [1, S]) pairs: the text prompts through the HF directory's tokenizer when it has one
    whose ids fit the vocabulary, else fixed ids."""
    if any((hf_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
        encoded = [torch.tensor([tok(p).input_ids]) for p in PROMPTS]
        if all(0 < e.shape[1] and int(e.max()) < vocab_size for e in encoded):
            return [(repr(p if len(p) <= 24 else p[:21] + "..."), e) for p, e in zip(PROMPTS, encoded)]
    gen = torch.Generator().manual_seed(0)
    return [(f"{n} fixed ids", torch.randint(0, vocab_size, (1, n), generator=gen)) for n in ID_LENGTHS]


def meshtron_model(cfg: ModelConfig, state: dict[str, torch.Tensor]):
    """GPTModel holding `state` (fp32). The vocabulary may be padded (meshtron checkpoints) or not."""
    from trainer.model import GPTModel

    padded = state["embedding.word_embeddings.weight"].shape[0]
    with torch.device("meta"):  # no random init: every weight comes from `state`
        model = GPTModel(cfg, padded_vocab_size=padded)
    model.to_empty(device="cpu")
    fp32 = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(fp32, strict=True, assign=True)
    model.rotary_pos_emb.reset_parameters()  # a non-persistent buffer: not in any checkpoint
    return model.eval()


def _hf_model(hf_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, local_files_only=True).eval()


@torch.no_grad()
def logit_diffs(hf_dir: Path, cfg: ModelConfig, state: dict[str, torch.Tensor]) -> list[tuple[str, float]]:
    """(prompt label, max |logit difference|) for each prompt."""
    hf = _hf_model(hf_dir)
    ours = meshtron_model(cfg, state)
    if hf.config.vocab_size != cfg.vocab_size:
        raise _Mismatch(f"vocabulary sizes differ: HF {hf.config.vocab_size}, the other checkpoint {cfg.vocab_size}")
    rows = []
    for label, ids in prompts(hf_dir, cfg.vocab_size):
        theirs = hf(ids).logits.float()
        mine = ours(ids)[..., :cfg.vocab_size].float()
        if theirs.shape != mine.shape:
            raise _Mismatch(f"logit shapes differ: HF {list(theirs.shape)}, meshtron {list(mine.shape)}")
        rows.append((label, float((theirs - mine).abs().max())))
    return rows


class _Mismatch(Exception):
    """The two models cannot even be compared (different shapes): a failed check, not a usage error."""


def load_other(megatron: Optional[Union[str, Path]], checkpoint: Optional[Union[str, Path]],
               iteration: Optional[int] = None) -> tuple[ModelConfig, dict[str, torch.Tensor], str]:
    if megatron is not None:
        from checkpoint_convert.detect import MEGATRON_TORCH_DIST, detect

        if detect(megatron).name == MEGATRON_TORCH_DIST:
            from checkpoint_convert.megatron_dist_read import load_megatron_dist_as_meshtron as load
        else:
            from checkpoint_convert.megatron import load_megatron_as_meshtron as load
        cfg, state = load(megatron, iteration=iteration)
        return cfg, state, f"Megatron checkpoint {megatron}"
    from checkpoint_convert.meshtron import load_meshtron_checkpoint, resolve_checkpoint

    cfg, state = load_meshtron_checkpoint(checkpoint)
    return cfg, state, f"meshtron checkpoint {resolve_checkpoint(checkpoint)}"


def verify(hf_dir: Union[str, Path], megatron: Optional[Union[str, Path]] = None,
           checkpoint: Optional[Union[str, Path]] = None, iteration: Optional[int] = None,
           tolerance: float = 1e-4, out: Callable[[str], None] = print) -> int:
    """Compare and report; returns OK (0) within `tolerance`, MISMATCH (1) above it or when shapes differ.
    Unusable inputs raise ConfigError / FileNotFoundError (the CLI's exit 2)."""
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise ConfigError(f"--hf {hf_dir}: not an HF checkpoint directory (no config.json)")
    if (megatron is None) == (checkpoint is None):
        raise ConfigError("verify needs exactly one of --megatron DIR or --checkpoint DIR")
    cfg, state, what = load_other(megatron, checkpoint, iteration)
    out(f"verify: HF {hf_dir} vs {what} ({cfg.family}, {cfg.num_layers} layers, hidden {cfg.hidden_size}), "
        f"fp32 on CPU")
    try:
        rows = logit_diffs(hf_dir, cfg, state)
    except (_Mismatch, RuntimeError) as e:  # load_state_dict's size mismatches are RuntimeErrors
        out(f"verify: FAILED: the models differ: {str(e).splitlines()[0]}")
        return MISMATCH
    for label, diff in rows:
        out(f"  {label:<30} max |logit diff| {diff:.3e}")
    worst = max(d for _, d in rows)
    ok = worst <= tolerance  # NaN compares False: fails
    out(f"verify: {'OK' if ok else 'FAILED'}: max |logit diff| {worst:.3e} "
        f"({'<=' if ok else 'above'} tolerance {tolerance:g})")
    return OK if ok else MISMATCH
