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


def parser(doc: str, *, candidates: str, fit_prompts: int, eval_prompts: int,
           max_new_tokens: int | None = None) -> argparse.ArgumentParser:
    """The flags every direction check takes: ``--run``, ``--candidates``, ``--fit-prompts``, ``--eval-prompts``,
    ``--batch-size`` (and ``--max-new-tokens`` for those that generate)."""
    from pathlib import Path

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a run folder whose collect stage finished")
    ap.add_argument("--candidates", default=candidates, help="LAYER:POSITION,... (position < 0)")
    ap.add_argument("--fit-prompts", type=int, default=fit_prompts, help="discovery prompts per side for the means")
    ap.add_argument("--eval-prompts", type=int, default=eval_prompts, help="validation prompts per measure")
    if max_new_tokens is not None:
        ap.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    ap.add_argument("--batch-size", type=int, default=8)
    return ap


def parse(ap: argparse.ArgumentParser, argv) -> tuple[argparse.Namespace, RunFolder, list[tuple[int, int]]]:
    """``(args, run folder, candidates)``: the flags checked (a bad one refused through ``ap``, naming what is
    allowed), nothing downloaded from here on, logging to the console."""
    import logging
    import os

    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # an entry point: nothing is downloaded
    run = RunFolder(args.run)
    check_run(ap, run)
    counts = {f"--{k.replace('_', '-')}": v for k, v in vars(args).items()
              if k in ("fit_prompts", "eval_prompts", "max_new_tokens", "batch_size")}
    if min(counts.values()) < 1:
        ap.error(f"{', '.join(counts)} must be integers >= 1")
    picks = parse_candidates(args.candidates)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return args, run, picks


def check_positions(picks: list[tuple[int, int]], n_post: int) -> None:
    """Refuse candidate positions before the template's first post-instruction token."""
    if far := [pos for _, pos in picks if pos < -n_post]:
        raise SystemExit(f"--candidates positions {far}: this template has {n_post} post-instruction positions "
                         f"(allowed: -{n_post}..-1)")
