"""What the direction checks share: their ``--candidates`` syntax, opening a finished run (its config, collection,
model), the last-position KL of an edit and the judged refusal rate under it."""

from __future__ import annotations

import argparse

from refusal_lens.core.metrics import kl_divergence
from refusal_lens.run.folder import RunFolder


def parse_candidates(text: str) -> list[tuple[int, int]]:
    """``"8:-3,16:-1"`` -> ``[(8, -3), (16, -1)]`` (layer, position relative to the prompt's end)."""
    out = []
    for item in text.split(","):
        layer, _, pos = item.partition(":")
        try:
            out.append((int(layer), int(pos)))
        except ValueError:
            raise SystemExit(f"--candidates {text!r}: {item!r} is not LAYER:POSITION (e.g. 16:-1)") from None
    return out


def check_run(ap: argparse.ArgumentParser, run: RunFolder) -> None:
    """Refuse (through ``ap``) a folder whose collect stage never started, naming what is allowed."""
    if not run.paths.activations.config.is_file():
        ap.error(f"--run {run.root}: no activations/config.yaml; allowed: results/<run_name> after `refusal-lens "
                 "collect`")


def open_run(ap: argparse.ArgumentParser, run: RunFolder, picks: list[tuple[int, int]], batch_size: int):
    """``(config, collection, loaded model, Intervener)`` of a run whose collect stage finished; candidates outside
    the model's layers (or at a position >= 0) are refused through ``ap`` naming the allowed values."""
    from refusal_lens.core.intervene import Intervener
    from refusal_lens.models.loading import load_model

    cfg = run.config()
    data = run.collected()
    n_layers = int(data.manifest["n_layers"])
    bad = [(layer, pos) for layer, pos in picks if not (0 <= layer < n_layers and pos < 0)]
    if bad:
        ap.error(f"--candidates {bad}: allowed: layers 0..{n_layers - 1}, positions < 0")
    loaded = load_model(cfg.model)
    return cfg, data, loaded, Intervener(loaded, batch_size, model=loaded.hf_model)


def last_position_kl(iv, prompts, edits) -> float:
    """Mean KL(clean || edited) of the prompts' last-position next-token distributions."""
    clean = iv.last_logits(prompts).float().log_softmax(-1)
    edited = iv.last_logits(prompts, edits).float().log_softmax(-1)
    return float(kl_divergence(clean, edited).mean())


def judged_refusal_rate(iv, tokenizer, prompts, max_new_tokens: int, edits=None) -> float:
    """Share of ``prompts`` whose greedy response (``max_new_tokens``, under ``edits``) the judge calls refused."""
    from refusal_lens.core.judge import judge

    outs = iv.generate(prompts, max_new_tokens, edits)
    return sum(judge(tokenizer.decode(ids, skip_special_tokens=True)).refused for ids in outs) / len(outs)
