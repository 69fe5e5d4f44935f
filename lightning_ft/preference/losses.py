"""Preference objectives as pure functions of per-sequence log-probabilities.

Every function takes the policy's (and, for DPO and IPO, the reference model's) log-probabilities of the
chosen and rejected replies, one value per pair, and returns :class:`PreferenceLoss`: the per-pair losses and
the implicit rewards that are logged. Which log-probability goes in is part of each objective's definition:

====== ================================ ===================================================================
loss   log-probabilities                loss per pair (``d``: chosen minus rejected)
====== ================================ ===================================================================
dpo    summed over reply tokens         ``-(1-ε)·logσ(β·d) - ε·logσ(-β·d)``, ``d`` = policy - reference
ipo    mean per reply token             ``(d - 1/(2β))²``, ``d`` = policy - reference
simpo  mean per reply token             ``-(1-ε)·logσ(β·d - γ) - ε·logσ(-(β·d - γ))``, no reference
orpo   mean per reply token             ``-β·logσ(log odds(chosen) - log odds(rejected))``, no reference;
                                        the NLL of the chosen reply is added by the caller
====== ================================ ===================================================================

``ε`` is the label smoothing (conservative DPO: the share of pairs assumed to be mislabelled).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

LossName = Literal["dpo", "ipo", "simpo", "orpo"]
LOSSES: tuple[str, ...] = ("dpo", "ipo", "simpo", "orpo")
#: Objectives that compare with a reference model (the others are reference-free).
NEEDS_REFERENCE = frozenset({"dpo", "ipo"})
#: Objectives that score replies by their mean log-probability per token rather than the sum.
LENGTH_NORMALISED = frozenset({"ipo", "simpo", "orpo"})


@dataclass(frozen=True)
class PreferenceLoss:
    """Per-pair losses and implicit rewards (rewards are detached: they are for logging).

    Attributes:
        losses: ``(pairs,)`` loss of each pair; the training loss is their mean.
        chosen_rewards: ``(pairs,)`` reward of each chosen reply (``β`` times its log-ratio or log-prob).
        rejected_rewards: ``(pairs,)`` reward of each rejected reply.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def _smoothed_sigmoid(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float = 0.1, label_smoothing: float = 0.0) -> PreferenceLoss:
    """DPO's sigmoid loss on summed log-probabilities; ``label_smoothing > 0`` is conservative DPO."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    losses = _smoothed_sigmoid(beta * (chosen_ratio - rejected_ratio), label_smoothing)
    return PreferenceLoss(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def ipo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float = 0.1) -> PreferenceLoss:
    """IPO's squared loss on mean per-token log-probabilities: the log-ratio gap regresses to ``1/(2β)``."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    losses = (chosen_ratio - rejected_ratio - 1 / (2 * beta)) ** 2
    return PreferenceLoss(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def simpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float = 2.0, gamma: float = 0.5,
               label_smoothing: float = 0.0) -> PreferenceLoss:
    """SimPO: reference-free, on mean per-token log-probabilities, with a target reward margin ``gamma``."""
    losses = _smoothed_sigmoid(beta * (chosen - rejected) - gamma, label_smoothing)
    return PreferenceLoss(losses, beta * chosen.detach(), beta * rejected.detach())


def _log1mexp(logp: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(logp))`` for ``logp < 0``, accurate at both ends (Mächler's switch at ``-log 2``)."""
    return torch.where(logp > -0.6931471805599453, torch.log(-torch.expm1(logp)), torch.log1p(-torch.exp(logp)))


def orpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float = 0.1) -> PreferenceLoss:
    """ORPO's odds-ratio term on mean per-token log-probabilities (the chosen reply's NLL is added separately)."""
    chosen, rejected = chosen.float(), rejected.float()
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    losses = -beta * F.logsigmoid(log_odds)
    return PreferenceLoss(losses, beta * chosen.detach(), beta * rejected.detach())


def preference_loss(name: LossName, chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor | None,
                    ref_rejected: torch.Tensor | None, beta: float, label_smoothing: float = 0.0,
                    simpo_gamma: float = 0.5) -> PreferenceLoss:
    """Dispatch to the objective ``name`` (log-probabilities already summed or averaged as it expects)."""
    if name in NEEDS_REFERENCE and (ref_chosen is None or ref_rejected is None):
        raise ValueError(f"loss={name!r} needs the reference model's log-probabilities")
    if name == "dpo":
        return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, label_smoothing)
    if name == "ipo":
        return ipo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)
    if name == "simpo":
        return simpo_loss(chosen, rejected, beta, simpo_gamma, label_smoothing)
    if name == "orpo":
        return orpo_loss(chosen, rejected, beta)
    raise ValueError(f"loss={name!r} is not one of: {', '.join(LOSSES)}")
