"""Preference training settings (``dpo.*``), named as TRL names them; the objective itself is trainer/dpo.py.
Kept apart from trainer/config.py like lora_config.py."""

from __future__ import annotations

from dataclasses import dataclass

from trainer.errors import one_of, require

OBJECTIVES = ("lm", "dpo")
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "simpo", "orpo")
# Losses of the policy alone: SimPO (Meng et al., 2024) and ORPO (Hong et al., 2024) need no reference model.
REFERENCE_FREE = ("simpo", "orpo")
REFERENCES = ("precompute", "online", "none")


@dataclass
class DpoConfig:
    """trainer.objective=dpo: a loss over (chosen, rejected) pairs of data.format=preference."""

    # sigmoid (DPO, Rafailov et al., 2023), ipo (Azar et al., 2023; TRL's per-token normalised form), hinge
    # (SLiC), simpo and orpo (reference-free; SimPO and ORPO use length-normalised log-probs, the others sums).
    loss_type: str = "sigmoid"
    beta: float = 0.1
    # Conservative DPO (sigmoid) and SimPO: the probability that a pair's labels are flipped.
    label_smoothing: float = 0.0
    # RPO (Pang et al., 2024): plus this times the NLL of the chosen completions (mean over their tokens).
    sft_weight: float = 0.0
    # SimPO's target reward margin (gamma).
    simpo_gamma: float = 0.5
    # The reference model's log-probs: precompute (one forward-only pass before the first step, cached beside
    # the token cache), online (a frozen copy of the initial model run in the same micro-batch), or none
    # (reference-free losses only).
    reference: str = "precompute"

    def validate(self) -> None:
        one_of("dpo.loss_type", self.loss_type, LOSS_TYPES)
        one_of("dpo.reference", self.reference, REFERENCES)
        require(self.beta > 0, f"dpo.beta={self.beta} must be positive")
        require(0.0 <= self.label_smoothing < 0.5, f"dpo.label_smoothing={self.label_smoothing} must be in [0, 0.5)")
        require(self.label_smoothing == 0.0 or self.loss_type in ("sigmoid", "simpo"),
                f"dpo.label_smoothing={self.label_smoothing} applies to loss_type sigmoid or simpo, not "
                f"{self.loss_type!r}")
        require(self.sft_weight >= 0.0, f"dpo.sft_weight={self.sft_weight} must be >= 0")
        require(self.sft_weight == 0.0 or self.loss_type != "orpo",
                f"dpo.sft_weight={self.sft_weight} with loss_type='orpo': ORPO's loss already holds the chosen "
                f"completions' NLL (weight 1); leave dpo.sft_weight at 0")
        if self.loss_type in REFERENCE_FREE:
            require(self.reference == "none", f"dpo.loss_type={self.loss_type!r} is reference-free but "
                                              f"dpo.reference={self.reference!r}; set dpo.reference=none")
        else:
            require(self.reference != "none", f"dpo.reference=none with dpo.loss_type={self.loss_type!r}: only "
                                              f"{list(REFERENCE_FREE)} train without a reference model; use "
                                              f"dpo.reference=precompute or online")

    @property
    def needs_reference(self) -> bool:
        return self.reference != "none"
