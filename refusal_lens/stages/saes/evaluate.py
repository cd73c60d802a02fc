"""Held-out evaluation of one SAE: reconstruction on stored activations, and the SAE spliced into the model.

Reconstruction (activations of held-out prompts, never used in training):
``explained_variance = 1 - sum |x - x_hat|^2 / sum |x - mean(x)|^2``, ``mse`` (per token, summed over
d_in), ``l0`` (active features per token), ``dead_fraction`` (features that never fire on held-out
tokens), ``dense_fraction`` (features firing on more than :data:`DENSE_THRESHOLD` of tokens).

Splice (chat prompts of one split + their responses, teacher-forced): the hook's activation is replaced by
SAE-Lens's ``sae(x)`` inside a forward hook, at the positions the SAE was trained on (not the chat
template's opening). ``ce_clean``, ``ce_sae`` (reconstruction), ``ce_increase = ce_sae - ce_clean`` (nats
per token), ``ce_mean`` (the activation mean-ablated: replaced by its mean over the training sites, the
reference a useless SAE reaches; zero ablation is far worse and made every SAE look good),
``ce_loss_recovered = (ce_mean - ce_sae) / (ce_mean - ce_clean)``, ``kl_sae`` and ``kl_mean``
(KL(clean || spliced) per token), and, when asked (tests), ``ce_with_error_term``: with SAE-Lens's
``use_error_term`` the spliced output equals the input, so this must equal ``ce_clean`` (a check of the
splice itself).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from refusal_lens.activations.store import HookActivations
from refusal_lens.core.chat import left_pad
from refusal_lens.core.metrics import kl_divergence
from refusal_lens.infra.memory_plan import SPLICE_BATCH

DENSE_THRESHOLD = 0.1


@torch.no_grad()
def mean_activation(acts: HookActivations, rows: np.ndarray, chunk: int = 8192) -> torch.Tensor:
    """The mean activation of ``rows`` (float64 accumulation), the mean-ablation reference."""
    total = torch.zeros(acts.width, dtype=torch.float64)
    for start in range(0, len(rows), chunk):
        total += acts.take(rows[start : start + chunk]).double().sum(0)
    return (total / max(len(rows), 1)).float()


@torch.no_grad()
def reconstruction_metrics(sae, acts: HookActivations, rows: np.ndarray, chunk: int = 4096) -> dict:
    d_sae = sae.cfg.d_sae
    fired = torch.zeros(d_sae)
    n, sse, l0 = 0, 0.0, 0.0
    s1 = torch.zeros(acts.width, dtype=torch.float64)
    s2 = 0.0
    for start in range(0, len(rows), chunk):
        x = acts.take(rows[start : start + chunk]).to(sae.device)
        feats = sae.encode(x)
        x_hat = sae.decode(feats)
        sse += float(((x - x_hat) ** 2).sum())
        s1 += x.double().sum(0).cpu()
        s2 += float((x.double() ** 2).sum())
        active = (feats != 0).float()
        l0 += float(active.sum())
        fired += active.sum(0).cpu()
        n += len(x)
    if n == 0:
        raise ValueError(f"{acts.folder}: no held-out rows to evaluate on")
    sst = s2 - float((s1**2).sum()) / n
    freq = fired / n
    return {
        "tokens": n,
        "explained_variance": 1 - sse / sst if sst > 0 else float("nan"),
        "mse": sse / n,
        "l0": l0 / n,
        "dead_fraction": float((fired == 0).float().mean()),
        "dense_fraction": float((freq > DENSE_THRESHOLD).float().mean()),
    }


def _ce_and_logprobs(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    logprobs = logits[:, :-1].float().log_softmax(-1)
    target_mask = (mask[:, :-1] * mask[:, 1:]).bool()
    nll = -logprobs.gather(-1, ids[:, 1:, None])[..., 0]
    return float(nll[target_mask].sum()), logprobs, target_mask


@torch.no_grad()
def splice_metrics(
    model,
    sae,
    hook: str,
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = SPLICE_BATCH,
    splice_from: int = 0,
    skip_token_ids: Sequence[int] = (),
    mean: torch.Tensor | None = None,
    check_error_term: bool = False,
    clean: dict | None = None,
) -> dict:
    """CE loss recovered and KL with ``sae`` spliced at ``hook``; see the module docstring. ``mean`` is the
    mean-ablation reference (default: zero, which only a test should use).

    ``clean``: a dict the caller shares between calls on the same model and sequences (every hook of one split): the
    clean pass of a batch (its CE, log-probs and target mask, which no hook changes) is kept there the first time and
    read the next, so it runs once per split instead of once per hook; the same batch, the same numbers.

    The SAE (and the mean ablation) replace the activation only at the positions it was trained on:
    from position ``splice_from`` of each sequence on (after the template's fixed opening), and not at
    ``skip_token_ids`` (special tokens); elsewhere the model keeps its own activation.
    """
    device = next(model.parameters()).device
    skip = torch.tensor(sorted(set(skip_token_ids)), dtype=torch.long, device=device)
    where: dict[str, torch.Tensor] = {}

    def replace(use_error_term: bool):
        def fn(act, hook):  # noqa: ARG001 (TransformerLens passes the hook point)
            sae.use_error_term = use_error_term
            return torch.where(where["mask"], sae(act.to(sae.dtype)).to(act.dtype), act)

        return fn

    reference = torch.zeros(sae.cfg.d_in) if mean is None else mean

    def mean_ablate(act, hook):  # noqa: ARG001
        return torch.where(where["mask"], reference.to(act.device, act.dtype).expand_as(act), act)

    totals = {"ce_clean": 0.0, "ce_sae": 0.0, "ce_mean": 0.0, "kl_sae": 0.0, "kl_mean": 0.0}
    runs = [("ce_sae", replace(False)), ("ce_mean", mean_ablate)]
    if check_error_term:  # the splice itself: with the error term it must give the clean CE (one more pass)
        totals["ce_with_error_term"] = 0.0
        runs.append(("ce_with_error_term", replace(True)))
    n_tokens = 0
    for start in range(0, len(sequences), batch_size):
        ids, mask = left_pad(sequences[start : start + batch_size], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        # position within each unpadded sequence (left padding)
        pos = mask.cumsum(-1) - 1
        spliced = mask.bool() & (pos >= splice_from)
        if len(skip):
            spliced &= ~torch.isin(ids, skip)
        where["mask"] = spliced[..., None]
        # [batch, seq, d_vocab] float32 each: the logits are dropped as soon as their log-softmax exists
        key = tuple(map(tuple, sequences[start : start + batch_size]))  # the batch's own tokens: its clean pass
        if clean is not None and key in clean:
            ce_clean, lp_clean, tmask = clean[key]
        else:
            ce_clean, lp_clean, tmask = _ce_and_logprobs(model(ids, attention_mask=mask), ids, mask)
            if clean is not None:
                clean[key] = (ce_clean, lp_clean, tmask)
        totals["ce_clean"] += ce_clean
        for name, fn in runs:
            ce, lp, _ = _ce_and_logprobs(model.run_with_hooks(ids, attention_mask=mask, fwd_hooks=[(hook, fn)]),
                                         ids, mask)
            totals[name] += ce
            if name in ("ce_sae", "ce_mean"):
                totals["kl_" + name[3:]] += float(kl_divergence(lp_clean, lp)[tmask].sum())
            del lp
        n_tokens += int(tmask.sum())
    sae.use_error_term = False
    out = {k: v / max(n_tokens, 1) for k, v in totals.items()}
    denom = out["ce_mean"] - out["ce_clean"]
    out["ce_loss_recovered"] = (out["ce_mean"] - out["ce_sae"]) / denom if denom != 0 else float("nan")
    out["ce_increase"] = out["ce_sae"] - out["ce_clean"]
    out["scored_tokens"] = n_tokens
    return out
