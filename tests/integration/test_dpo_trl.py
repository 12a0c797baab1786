"""trainer.objective=dpo against its reference, TRL: the same tiny HF model, the same pairs, the same reference
and the same AdamW give TRL DPOTrainer's first-step loss and rewards (1e-5, fp32) and its weights after 3
steps (1e-5), for sigmoid, hinge and ipo (and RPO's sft term); SimPO's and ORPO's per-pair losses equal TRL's
CPOTrainer.cpo_loss and ORPOTrainer.odds_ratio_loss on the same log-probs, and 3 steps of each equal a plain
torch loop whose loss is TRL's function (TRL's CPO/ORPO trainers tokenize differently from DPOTrainer). At step 1 the sigmoid loss is ln 2
(policy = reference)."""

from __future__ import annotations

import json
import math
import types

import numpy as np
import pytest
import torch

from trainer.dpo import pair_losses
from trainer.dpo_config import DpoConfig

trl = pytest.importorskip("trl")
pytestmark = pytest.mark.filterwarnings("ignore")

# A ChatML template that ends a message right after <|im_end|>: TRL's completion is every token after the
# rendered prompt (here the answer and <|im_end|>), ours the answer and its end-of-turn token; with the bundled
# template's newline after <|im_end|> TRL would also train on that newline.
TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
            "'<|im_end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
PAIRS = [
    ("What does len() return?", "The number of items in a container.", "A random number."),
    ("How do I open a file?", "Call open(path) and use it in a with block.", "You cannot."),
    ("What is a tuple?", "An immutable sequence.", "A kind of fish that lives in lists and dicts."),
    ("Name a loop statement.", "for", "The if statement, which repeats nothing."),
    ("What does str.upper do?", "It returns an upper-case copy of the string.", "It deletes the string."),
]
OPTIM = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-6, grad_clip=1.0)
STEPS = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import transformers as T

    from tests.tiny_hf import SHAPE, randomized
    from trainer.assets import BUNDLED_TOKENIZER

    root = tmp_path_factory.mktemp("dpo_trl")
    tok = T.AutoTokenizer.from_pretrained(BUNDLED_TOKENIZER)
    model = randomized(T.LlamaForCausalLM, T.LlamaConfig(**{**SHAPE, "vocab_size": len(tok)}))
    model.save_pretrained(root / "hf")
    (root / "template.jinja").write_text(TEMPLATE)
    rows = [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for p, c, r in PAIRS]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, rows


def _trl(root, rows, loss_type: str, sft_weight: float, adapters=None):
    import datasets
    import transformers as T
    from trl import DPOConfig, DPOTrainer

    from trainer.assets import BUNDLED_TOKENIZER

    tok = T.AutoTokenizer.from_pretrained(BUNDLED_TOKENIZER)
    tok.chat_template = TEMPLATE
    model = T.AutoModelForCausalLM.from_pretrained(root / "hf", attn_implementation="eager").float()
    if adapters is not None:  # LoRA: PEFT's model holding meshtron's initial adapters
        import peft

        from trainer.lora import peft_targets, to_peft

        modules, _ = peft_targets(adapters, False)
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8.0, target_modules=modules,
                                                           lora_dropout=0.0))
        peft.set_peft_model_state_dict(model, {k: t.clone() for k, t in to_peft(adapters).items()})
    losses, weights = [loss_type], [1.0]
    if sft_weight:
        losses, weights = [loss_type, "sft"], [1.0, sft_weight]
    args = DPOConfig(output_dir=str(root / f"trl_{loss_type}_{sft_weight}"), per_device_train_batch_size=len(rows),
                     max_steps=STEPS, learning_rate=OPTIM["lr"], lr_scheduler_type="constant", warmup_steps=0,
                     weight_decay=0.0, adam_beta1=OPTIM["beta1"], adam_beta2=OPTIM["beta2"],
                     adam_epsilon=OPTIM["eps"], max_grad_norm=OPTIM["grad_clip"], beta=0.1, loss_type=losses,
                     loss_weights=weights, max_length=None, precompute_ref_log_probs=True, report_to=[],
                     save_strategy="no", logging_steps=1, use_cpu=True, seed=0, dataloader_drop_last=False,
                     gradient_checkpointing=False, bf16=False, fp16=False)
    trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tok)
    seen = []
    compute = trainer._compute_loss

    def recording(model, inputs, return_outputs):
        loss = compute(model, inputs, return_outputs)
        seen.append((float(loss), {k: v[-1] for k, v in trainer._metrics["train"].items() if v}))
        return loss

    trainer._compute_loss = recording
    trainer.train()
    if adapters is not None:
        import peft

        return seen, {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(model).items()}
    return seen, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _cfg(root, rows, loss_type: str, sft_weight: float, compose, *extra: str):
    out = root / f"ours_{loss_type}_{sft_weight}_{len(extra)}"
    return out, compose(
        "model=tiny", f"model.hf_path={root / 'hf'}", "data=preference", f"data.path={root / 'pairs.jsonl'}",
        f"data.chat_template={root / 'template.jinja'}", "data.packing=false", "data.seq_len=96",
        f"data.cache_dir={root / 'cache'}", "trainer.objective=dpo", f"dpo.loss_type={loss_type}", "dpo.beta=0.1",
        f"dpo.sft_weight={sft_weight}", "trainer.precision=fp32", f"trainer.max_steps={STEPS}",
        f"trainer.global_batch_size={len(rows)}", "parallel.microbatch_size=1", "trainer.eval_every=0",
        f"trainer.output_dir={out}", f"optim.lr={OPTIM['lr']}", "optim.warmup_steps=0", "optim.decay=constant",
        "optim.weight_decay=0", f"optim.beta1={OPTIM['beta1']}", f"optim.beta2={OPTIM['beta2']}",
        f"optim.eps={OPTIM['eps']}", f"optim.grad_clip={OPTIM['grad_clip']}",
        "trainer.checkpoint.save_before_export=false", "trainer.device=cpu", *extra)


def _ours(root, rows, loss_type: str, sft_weight: float, compose, *extra: str):
    from safetensors.torch import load_file

    from trainer.distributed import RankInfo
    from trainer.loop import train

    out, cfg = _cfg(root, rows, loss_type, sft_weight, compose, *extra)
    train(cfg, RankInfo(0, 1, 0))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    weights = out / "hf_adapter" / "adapter_model.safetensors"
    return records, load_file(weights if weights.is_file() else out / "hf" / "model.safetensors")


@pytest.mark.parametrize("loss_type,sft_weight", [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("sigmoid", 0.5)])
def test_three_steps_equal_trl(setup, compose, loss_type, sft_weight):
    root, rows = setup
    theirs, their_weights = _trl(root, rows, loss_type, sft_weight)
    ours, our_weights = _ours(root, rows, loss_type, sft_weight, compose)
    first_loss, first = theirs[0]
    if loss_type == "sigmoid" and not sft_weight:
        assert math.isclose(ours[0]["loss"], math.log(2), abs_tol=1e-6)  # policy = reference at step 1
    assert ours[0]["loss"] == pytest.approx(first_loss, abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected"):
        assert ours[0][key] == pytest.approx(first[key], abs=1e-5, rel=1e-5), key
    assert ours[1]["loss"] == pytest.approx(theirs[1][0], abs=1e-5)  # the update moved both alike
    assert ours[0]["pairs"] == len(rows)
    assert set(our_weights) <= set(their_weights)
    for name, tensor in our_weights.items():
        torch.testing.assert_close(tensor, their_weights[name], atol=1e-5, rtol=0, msg=name)


def _logps(n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 40, (2, n), generator=gen).double()
    # Mean token log-probs in (-3, -0.01): ORPO's log(1 - p) needs p < 1.
    means = -(torch.rand((2, n), generator=gen, dtype=torch.float64) * 3 + 0.01)
    return means[0] * counts[0], means[1] * counts[1], counts[0], counts[1]


@pytest.mark.parametrize("smoothing,gamma", [(0.0, 0.5), (0.2, 1.0)])
def test_simpo_equals_trl_cpo(smoothing, gamma):
    from trl.experimental.cpo import CPOTrainer

    sc, sr, nc, nr = _logps(16)
    cfg = DpoConfig(loss_type="simpo", beta=2.0, simpo_gamma=gamma, label_smoothing=smoothing, reference="none")
    ours, rc, rr, _, _ = pair_losses(cfg, sc, sr, None, None, nc, nr)
    me = types.SimpleNamespace(loss_type="simpo", beta=2.0, simpo_gamma=gamma, label_smoothing=smoothing, alpha=0.0,
                               accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    theirs, tc, tr = CPOTrainer.cpo_loss(me, sc / nc, sr / nr)  # CPO's simpo takes length-normalised log-probs
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(rc, tc)
    torch.testing.assert_close(rr, tr)


def test_orpo_equals_trl():
    from trl.experimental.orpo import ORPOTrainer

    sc, sr, nc, nr = _logps(16, seed=1)
    cfg = DpoConfig(loss_type="orpo", beta=0.3, reference="none")
    ours, rc, rr, _, _ = pair_losses(cfg, sc, sr, None, None, nc, nr)
    me = types.SimpleNamespace(beta=0.3, accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    ratio_terms, tc, tr, _, _ = ORPOTrainer.odds_ratio_loss(me, sc / nc, sr / nr)
    # TRL's loss is nll - mean(beta * log sigmoid(log odds)): its per-pair terms are ours negated.
    torch.testing.assert_close(ours, -ratio_terms.double(), atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(rc, tc.double())
    torch.testing.assert_close(rr, tr.double())


def test_reference_free_losses_do_not_read_the_reference():
    sc, sr, nc, nr = _logps(4)
    for kind in ("simpo", "orpo"):
        cfg = DpoConfig(loss_type=kind, reference="none")
        a = pair_losses(cfg, sc, sr, torch.zeros(4), torch.zeros(4), nc, nr)[0]
        b = pair_losses(cfg, sc, sr, torch.full((4,), 7.0), torch.full((4,), -3.0), nc, nr)[0]
        torch.testing.assert_close(a, b)
    assert np.isfinite(pair_losses(DpoConfig(), sc, sr, sc, sr, nc, nr)[0].numpy()).all()


def _sequences(root):
    """The pairs as meshtron tokenized them: (ids, targets) of chosen and rejected, per pair."""
    from transformers import AutoTokenizer

    from trainer.assets import BUNDLED_TOKENIZER
    from trainer.config import DataConfig, DataSource
    from trainer.data.preference import load_preference_corpus

    data = DataConfig(format="preference", seq_len=96, chat_template=str(root / "template.jinja"))
    c = load_preference_corpus(DataSource(path=str(root / "pairs.jsonl"), format="preference"),
                               AutoTokenizer.from_pretrained(BUNDLED_TOKENIZER), data, root / "seq_cache")
    docs = [(torch.from_numpy(c.doc(i).astype("int64")), torch.from_numpy(c.doc_targets(i).copy()))
            for i in range(c.num_docs)]
    return list(zip(docs[0::2], docs[1::2]))


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
def test_reference_free_three_steps_equal_a_loop_with_trls_losses(setup, compose, loss_type):
    """SimPO and ORPO: meshtron's 3 steps equal a plain torch loop over the same HF model and tokens whose loss is
    TRL's own (CPOTrainer.cpo_loss with loss_type simpo, ORPOTrainer.odds_ratio_loss plus the chosen NLL)."""
    import torch.nn.functional as F
    import transformers as T
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    root, rows = setup
    ours, our_weights = _ours(root, rows, loss_type, 0.0, compose, "dpo.reference=none")
    model = T.AutoModelForCausalLM.from_pretrained(root / "hf", attn_implementation="eager").float()
    opt = torch.optim.AdamW(model.parameters(), lr=OPTIM["lr"], betas=(OPTIM["beta1"], OPTIM["beta2"]),
                            eps=OPTIM["eps"], weight_decay=0.0)
    cpu = types.SimpleNamespace(device=torch.device("cpu"))
    me = types.SimpleNamespace(loss_type="simpo", beta=0.1, simpo_gamma=0.5, label_smoothing=0.0, alpha=0.0,
                               accelerator=cpu)
    pairs = _sequences(root)
    losses = []
    for _ in range(STEPS):
        sums, counts = [], []
        for pair in pairs:
            for ids, targets in pair:
                logits = model(ids[None]).logits[0, :-1].float()
                logp = torch.gather(F.log_softmax(logits, -1), 1, ids[1:, None])[:, 0]
                mask = targets[1:].float()
                sums.append((logp * mask).sum())
                counts.append(mask.sum())
        s, n = torch.stack(sums).view(-1, 2), torch.stack(counts).view(-1, 2)
        avg = s / n
        if loss_type == "simpo":
            loss = CPOTrainer.cpo_loss(me, avg[:, 0], avg[:, 1])[0].mean()
        else:
            nll = -s[:, 0].sum() / n[:, 0].sum()  # TRL ORPO: cross-entropy over the chosen completions' tokens
            loss = nll - ORPOTrainer.odds_ratio_loss(me, avg[:, 0], avg[:, 1])[0].mean()
        losses.append(float(loss))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM["grad_clip"])
        opt.step()
        opt.zero_grad()
    for step, (a, b) in enumerate(zip(ours, losses), start=1):
        assert a["loss"] == pytest.approx(b, abs=1e-5), f"step {step}"
    theirs = model.state_dict()
    for name, tensor in our_weights.items():
        torch.testing.assert_close(tensor, theirs[name], atol=1e-5, rtol=0, msg=name)


def test_lora_dpo_equals_trl_with_peft(setup, compose):
    """DPO of LoRA adapters: TRL's DPOTrainer on a PEFT model that starts from meshtron's initial adapters (its
    reference: the model as it starts, B = 0, i.e. the base) trains the same adapters in 3 steps (1e-5)."""
    pytest.importorskip("peft")
    from parallel.dims import ParallelDims
    from parallel.parallelize import build_parallel_model
    from trainer.lora import is_adapter, to_peft
    from trainer.loop import hf_weight_loader, resolve_model

    root, rows = setup
    lora = ["model.lora.rank=4", "model.lora.alpha=8"]
    _, cfg = _cfg(root, rows, "sigmoid", 0.0, compose, *lora)
    cfg = resolve_model(cfg)
    pm = build_parallel_model(cfg, ParallelDims.single(), None, torch.device("cpu"), hf_weight_loader(cfg))
    initial = {n: p.detach().clone() for n, p in pm.modules[0].named_parameters() if is_adapter(n)}
    theirs, their_adapters = _trl(root, rows, "sigmoid", 0.0, adapters=initial)
    ours, our_adapters = _ours(root, rows, "sigmoid", 0.0, compose, *lora)
    assert ours[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and theirs[0][0] == pytest.approx(math.log(2), abs=1e-6)
    assert ours[1]["loss"] == pytest.approx(theirs[1][0], abs=1e-5)
    assert our_adapters.keys() == their_adapters.keys() == to_peft(initial).keys()
    for name, t in our_adapters.items():
        assert torch.count_nonzero(t), name  # trained (B moved away from zero)
        torch.testing.assert_close(t, their_adapters[name], atol=1e-5, rtol=1e-5, msg=name)
