"""Our DPO, IPO, SimPO and ORPO losses and gradients equal TRL 1.16's on identical batches, to 1e-5.

TRL's loss code runs as is: ``DPOTrainer._compute_loss`` (sigmoid, IPO), ``CPOTrainer.cpo_loss`` (SimPO, and
conservative DPO's smoothed sigmoid), ``ORPOTrainer.odds_ratio_loss``, and their ``get_batch_logps``, each called
on a stand-in for the trainer that holds only the settings the function reads.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lightning_ft.preference.data import PreferencePair, collate_pairs, encode_pair
from lightning_ft.preference.losses import preference_loss
from lightning_ft.preference.module import sequence_logps, token_logps

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
trl_cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
trl_orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")

PAIRS = [
    PreferencePair(({"role": "user", "content": "What is 2 plus 2?"},), "It is 4.", "Five, I think, or maybe six.", "a"),
    PreferencePair(({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}),
                   "Paris.", "Lyon", "b"),
    PreferencePair(({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "Say yes"}), "Yes.", "No, I will not say it.", "c"),
]


@pytest.fixture(scope="module")
def setup(tiny_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import TINY_TOKENIZER_DIR

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig.from_pretrained(TINY_TOKENIZER_DIR)).double()
    batch = collate_pairs([encode_pair(p, tiny_tokenizer, 128) for p in PAIRS], tiny_tokenizer.pad_token_id or 0)
    return model, batch


def _ours(model, batch, name, ref, **settings):
    sums, counts = sequence_logps(token_logps(model, batch, chunk_size=7), batch["labels"])
    scores, ref_scores = sums, ref
    if name in ("ipo", "simpo", "orpo"):
        scores = sums / counts
        ref_scores = None if ref is None else ref / counts
    n = len(PAIRS)
    halves = (lambda t: (None, None) if t is None else (t[:n], t[n:]))
    loss = preference_loss(name, *halves(scores), *halves(ref_scores), **settings).losses.mean()
    if name == "orpo":
        loss = loss - sums[:n].sum() / counts[:n].sum()  # plus the chosen replies' token-mean NLL
    return loss


def _trl_dpo(model, batch, loss_type, beta, ref):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    per_token = torch.gather(logits[:, :-1].log_softmax(-1), 2, labels.clamp(min=0)[..., None]).squeeze(-1) * mask
    zeros = torch.zeros_like(per_token)
    outputs = SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())
    n = len(PAIRS)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta, use_weighting=False,
        label_smoothing=0.0, _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": (batch["labels"] != -100).long(), "ref_chosen_logps": ref[:n],
              "ref_rejected_logps": ref[n:]}
    return trl_dpo.DPOTrainer._compute_loss(trainer, lambda **_: outputs, inputs, False)


def _trl_reference_free(model, batch, name, beta, gamma=0.5, label_smoothing=0.0, ref=None):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    n = len(PAIRS)
    average = name != "cdpo"
    logps = trl_cpo.CPOTrainer.get_batch_logps(logits, batch["labels"], average_log_prob=average)
    device = SimpleNamespace(device=torch.device("cpu"))
    if name == "orpo":
        trainer = SimpleNamespace(beta=beta, accelerator=device)
        losses = trl_orpo.ORPOTrainer.odds_ratio_loss(trainer, logps[:n], logps[n:])[0]
        nll = F.cross_entropy(logits[:n, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:n, 1:].reshape(-1))
        return nll - losses.mean()
    if name == "cdpo":  # conservative DPO = CPO's smoothed sigmoid on the log-ratios
        logps = logps - ref
    trainer = SimpleNamespace(beta=beta, alpha=0.0, simpo_gamma=gamma, label_smoothing=label_smoothing,
                              loss_type="simpo" if name == "simpo" else "sigmoid", accelerator=device)
    return trl_cpo.CPOTrainer.cpo_loss(trainer, logps[:n], logps[n:])[0].mean()


CASES = {
    "dpo": (lambda m, b, ref: _ours(m, b, "dpo", ref, beta=0.3), lambda m, b, ref: _trl_dpo(m, b, "sigmoid", 0.3, ref)),
    "ipo": (lambda m, b, ref: _ours(m, b, "ipo", ref, beta=0.3), lambda m, b, ref: _trl_dpo(m, b, "ipo", 0.3, ref)),
    "conservative-dpo": (lambda m, b, ref: _ours(m, b, "dpo", ref, beta=0.3, label_smoothing=0.2),
                         lambda m, b, ref: _trl_reference_free(m, b, "cdpo", 0.3, label_smoothing=0.2, ref=ref)),
    "simpo": (lambda m, b, ref: _ours(m, b, "simpo", None, beta=2.0, simpo_gamma=0.7, label_smoothing=0.1),
              lambda m, b, ref: _trl_reference_free(m, b, "simpo", 2.0, gamma=0.7, label_smoothing=0.1)),
    "orpo": (lambda m, b, ref: _ours(m, b, "orpo", None, beta=0.25),
             lambda m, b, ref: _trl_reference_free(m, b, "orpo", 0.25)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_gradients_match_trl(setup, case):
    model, batch = setup
    ref = torch.tensor([-30.0, -12.5, -9.0, -35.0, -8.0, -40.0], dtype=torch.float64)
    ours_fn, trl_fn = CASES[case]
    params = [p for p in model.parameters() if p.requires_grad]
    ours = ours_fn(model, batch, ref)
    ours_grads = torch.autograd.grad(ours, params)
    theirs = trl_fn(model, batch, ref)
    theirs_grads = torch.autograd.grad(theirs, params)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)
    assert torch.isfinite(ours) and ours.item() != 0.0
    worst = max((a - b).abs().max().item() for a, b in zip(ours_grads, theirs_grads))
    assert worst < 1e-5
    assert max(g.abs().max().item() for g in ours_grads) > 1e-4  # the gradients compared are not all zero


def test_dpo_is_ln2_when_policy_equals_reference(setup):
    model, batch = setup
    with torch.no_grad():
        ref = sequence_logps(token_logps(model, batch, chunk_size=1024), batch["labels"])[0]
    assert _ours(model, batch, "dpo", ref, beta=0.1).item() == pytest.approx(math.log(2), abs=1e-12)
