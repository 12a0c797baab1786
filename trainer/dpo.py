"""trainer.objective=dpo: preference losses over (chosen, rejected) pairs, TRL's definitions and metric names.

A pair is documents 2i (chosen) and 2i + 1 (rejected) of a preference corpus (trainer/data/preference.py),
packed into one row, so the global batch's sample ids name its pairs and every rank knows them from the host
batch. A sequence's log-prob is the sum of its completion tokens' log-probs (-cross-entropy, the per-token
losses the model already returns); SimPO and ORPO divide it by the completion's token count.

Where each reduction happens, and why the gradient is one process':

* Tensor parallelism: the per-token losses come out of the vocabulary-parallel cross-entropy replicated on
  every tp rank (trainer/loss.py), so every tp rank computes the same pair losses, as for the token loss.
* Context parallelism: a row's tokens are split over the cp ranks, so each holds a part of each sequence's
  sum. The parts are all-reduced over cp with autograd *before* the nonlinearity (parallel.collectives.
  sum_of_parts: forward a sum, backward the gradient unchanged), so every cp rank evaluates the loss on whole
  sums and backpropagates dL/ds into its own tokens only; summing the ranks' gradients (the FSDP/DDP reduction,
  divide factor 1) gives dL/ds * ds/dtheta.
* Data parallelism and micro-batches: a pair never spans rows, so each pair lives in one micro-batch of one
  data-parallel rank. Each micro-batch contributes sum over its pairs of loss / P, P the pairs of the whole
  global batch (counted on the host, like the token normalizer), and the gradient sum over micro-batches and
  ranks is the gradient of the global mean: not a mean of micro-batch means.
* Pipeline parallelism: the last stage sees a micro-batch's whole rows and computes the same micro-batch loss.

The logged loss and metrics are computed on the host from the step's per-document log-prob sums and token
counts (DocumentLoss, reduced in the step's one collective), in float64.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from trainer.dpo_config import DpoConfig
from trainer.loss import IGNORE_INDEX

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (Maechler, 2012), as TRL's ORPO computes it."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _smoothed_sigmoid(z: torch.Tensor, eps: float) -> torch.Tensor:
    """-log sigmoid(z), with label smoothing eps: the conservative DPO of Mitchell (2023), as TRL's CPO writes it."""
    loss = -F.logsigmoid(z)
    return loss if eps == 0.0 else (1 - eps) * loss - eps * F.logsigmoid(-z)


def nll_weight(cfg: DpoConfig) -> float:
    """Weight of the chosen completions' mean token NLL in the loss: ORPO's own term, else RPO's sft_weight."""
    return 1.0 if cfg.loss_type == "orpo" else cfg.sft_weight


def pair_losses(cfg: DpoConfig, logp_c: torch.Tensor, logp_r: torch.Tensor, ref_c: torch.Tensor,
                ref_r: torch.Tensor, n_c: torch.Tensor, n_r: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair: (loss, chosen reward, rejected reward, chosen logp, rejected logp as logged), from the summed
    completion log-probs of the policy (logp_*) and the reference (ref_*; unused by reference-free losses) and
    the completions' token counts (n_*). The loss excludes the NLL term (nll_weight)."""
    beta, kind = cfg.beta, cfg.loss_type
    if kind in ("simpo", "orpo"):
        # Length-normalised log-probs (SimPO eq. 4; ORPO's odds use the mean token probability).
        avg_c, avg_r = logp_c / n_c.clamp(min=1), logp_r / n_r.clamp(min=1)
        if kind == "simpo":  # TRL CPO: logits = (avg_c - avg_r) - gamma / beta, scaled by beta
            loss = _smoothed_sigmoid(beta * (avg_c - avg_r) - cfg.simpo_gamma, cfg.label_smoothing)
        else:  # ORPO eqs. 4 and 7: the log odds ratio through a log-sigmoid, weighted by beta (TRL's lambda)
            log_odds = (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r))
            loss = -beta * F.logsigmoid(log_odds)
        return loss, beta * avg_c, beta * avg_r, avg_c, avg_r
    ratio_c, ratio_r = logp_c - ref_c, logp_r - ref_r
    if kind == "sigmoid":
        loss = _smoothed_sigmoid(beta * (ratio_c - ratio_r), cfg.label_smoothing)
    elif kind == "hinge":
        loss = torch.relu(1 - beta * (ratio_c - ratio_r))
    else:  # ipo, eq. 17, per completion token as TRL normalises it (confirmed with the IPO authors, TRL says)
        loss = (ratio_c / n_c.clamp(min=1) - ratio_r / n_r.clamp(min=1) - 1 / (2 * beta)) ** 2
    return loss, beta * ratio_c, beta * ratio_r, logp_c, logp_r


def check_pairs(keys: np.ndarray) -> None:
    """The sorted distinct sample ids of a batch are whole pairs: 2i followed by 2i + 1."""
    if len(keys) % 2 or not (np.all(keys[0::2] % 2 == 0) and np.all(keys[1::2] == keys[0::2] + 1)):
        raise RuntimeError("a batch holds part of a preference pair (sample ids "
                           f"{keys[:8].tolist()}...): pairs must never be split across rows; this is a bug")


class PairBatch:
    """One global batch's pairs, built on the host before its step: the sorted sample ids (keys, every rank the
    same list), the pair and chosen-token counts that normalise the loss, and the reference log-probs."""

    def __init__(self, cfg: DpoConfig, batch: dict[str, torch.Tensor], device: torch.device,
                 reference: Optional[Callable[[np.ndarray], np.ndarray]] = None):
        self.cfg = cfg
        sample = batch["sample_ids"].numpy()
        keys = np.unique(sample[sample >= 0])
        check_pairs(keys)
        self.pairs = len(keys) // 2
        labelled = batch["labels"].numpy() != IGNORE_INDEX
        self.chosen_tokens = int(np.count_nonzero(labelled & (sample >= 0) & (sample % 2 == 0)))
        self.host_keys = keys
        self.host_ref = (np.asarray(reference(keys), dtype=np.float64) if reference is not None and
                         cfg.needs_reference else np.zeros(len(keys)))
        self.keys = torch.from_numpy(keys).to(device, non_blocking=True)
        self.ref = torch.from_numpy(self.host_ref).float().to(device, non_blocking=True)

    def micro_loss(self, token_losses: torch.Tensor, labels: torch.Tensor, sample_ids: torch.Tensor,
                   cp_group=None, ref: Optional[torch.Tensor] = None) -> torch.Tensor:
        """This micro-batch's part of the step's loss: sum over its pairs of the pair loss, over the step's pairs
        (plus the NLL term over the step's chosen tokens). ``token_losses`` are the per-token cross-entropies of
        its rows (of this rank's cp chunks with ``cp_group``); ``ref`` overrides the reference's per-key
        log-probs (the online reference)."""
        from parallel.collectives import sum_of_parts

        k = len(self.host_keys)
        if k == 0:
            return token_losses.sum() * 0.0
        valid = (labels != IGNORE_INDEX).flatten()
        idx = torch.searchsorted(self.keys, sample_ids.flatten().to(self.keys.device).contiguous()).clamp_(max=k - 1)
        logp = torch.where(valid, -token_losses.flatten().float(), torch.zeros((), device=token_losses.device))
        sums = logp.new_zeros(k).index_add(0, idx, logp)
        with torch.no_grad():
            counts = logp.new_zeros(k).index_add(0, idx, valid.float())
            if cp_group is not None:
                torch.distributed.all_reduce(counts, group=cp_group)
        sums = sum_of_parts(sums, cp_group).view(-1, 2)
        counts = counts.view(-1, 2)
        present = counts[:, 0] > 0  # the pair's rows are in this micro-batch
        # Pairs of other micro-batches get a harmless stand-in (a log-prob of -1 over one token), so that no
        # inf/NaN of log1mexp(0) leaks into the gradient through torch.where.
        safe = torch.where(present.unsqueeze(1), sums, -torch.ones_like(sums))
        n = counts.clamp(min=1)
        ref = (self.ref if ref is None else ref).view(-1, 2)
        losses = pair_losses(self.cfg, safe[:, 0], safe[:, 1], ref[:, 0], ref[:, 1], n[:, 0], n[:, 1])[0]
        loss = torch.where(present, losses, torch.zeros_like(losses)).sum() / self.pairs
        w = nll_weight(self.cfg)
        if w:
            loss = loss - w * torch.where(present, sums[:, 0], torch.zeros_like(losses)).sum() / max(self.chosen_tokens, 1)
        return loss

    def metrics(self, doc_totals: torch.Tensor, ref_sums: Optional[torch.Tensor] = None) -> dict[str, float]:
        """The step's loss and TRL's metrics (means over the step's pairs) from the per-document cross-entropy
        sums and label counts of every rank (StepTotals.doc_totals, [2, keys]) and, for the online reference,
        its per-document log-prob sums over every rank (StepTotals.ref_sums)."""
        totals = doc_totals.double()
        ref = torch.from_numpy(self.host_ref) if ref_sums is None else ref_sums.double()
        return pair_metrics(self.cfg, -totals[0], totals[1], ref, self.chosen_tokens)


def pair_metrics(cfg: DpoConfig, logps: torch.Tensor, counts: torch.Tensor, ref: torch.Tensor,
                 chosen_tokens: int) -> dict[str, float]:
    """Loss and metrics of whole pairs from per-document (chosen, rejected interleaved) log-prob sums, label
    counts and reference log-probs, in float64."""
    s, n, r = logps.view(-1, 2), counts.view(-1, 2), ref.double().view(-1, 2)
    if len(s) == 0:
        return {"loss": float("nan"), "pairs": 0}
    loss, reward_c, reward_r, shown_c, shown_r = pair_losses(cfg, s[:, 0], s[:, 1], r[:, 0], r[:, 1], n[:, 0], n[:, 1])
    total = loss.mean()
    w = nll_weight(cfg)
    if w:
        total = total - w * s[:, 0].sum() / max(chosen_tokens, 1)
    return {"loss": float(total), "rewards/chosen": float(reward_c.mean()), "rewards/rejected": float(reward_r.mean()),
            "rewards/accuracies": float((reward_c > reward_r).double().mean()),
            "rewards/margins": float((reward_c - reward_r).mean()), "logps/chosen": float(shown_c.mean()),
            "logps/rejected": float(shown_r.mean()), "pairs": int(len(s))}
