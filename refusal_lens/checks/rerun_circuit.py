"""Re-run the headline circuit's ablation and the direction's ablation from a run's files, independently.

The discover stage reports the headline circuit's refusal rate on refused toxic test prompts and its share of
the refusal direction's effect (``circuits/validation/behaviour.json``). This script checks that number
without the project's intervention code (no ``Intervener``, no ``Edit``, no shared-opening cache): it reads
only the files a reader of the run has, ``circuits/validation/behaviour.json`` (the headline's features,
intervention and positions), ``saes/<hook>/`` (loaded with ``sae_lens.SAE.load_from_disk``),
``direction/direction.{json,safetensors}``, and applies them with plain PyTorch hooks on the Hugging Face
model, generating with ``model.generate`` (greedy) in the run's intervention dtype:

* **circuit**: at each hook ``blocks.L.hook_resid_post`` (the output of decoder layer ``L``;
  ``hook_resid_pre`` = its input) the SAE encodes the activation; the listed features, where active
  (``f > 0``), become ``0`` (``zero``) or ``-c f`` (``scale``); ``decode(f') - decode(f)`` is added (the SAE's
  error term is kept); at every position (the template's opening and generated tokens included) or, with
  ``after_opening``, at every position after the template's opening;
* **direction**: the unit direction is projected out of every residual write (the embeddings, every
  attention output, every MLP output) at every position.

Prompts: ``--prompts other`` (default) takes toxic prompts of the embedded large OR-Bench-shaped set
(``embedded:large``) that the run never saw, generates them clean, keeps those the model refuses (the project's
judge) and measures both ablations on them; ``--prompts test`` re-runs the headline's own test prompts (the
responses must then equal the stage's, prompt by prompt, up to floating-point ties). The result: refusal rates
with Wilson intervals, ``fraction_of_direction = (clean - circuit) / (clean - direction)`` with the stage's own
paired bootstrap interval over prompts (:func:`refusal_lens.core.behaviour.fraction_interval`, so that the two
intervals are the same statistic), and the run's own numbers next to them, in ``<run>/rerun_circuit[-test].json``.

Usage: .venv/bin/python -m refusal_lens.checks.rerun_circuit --run results/default [--prompts other|test] [--n 96]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from refusal_lens.core.metrics import rate  # the project's statistics: only the intervention is re-implemented here
from refusal_lens.run.folder import CircuitFiles, RunFolder

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ the run's files


def read_headline(run: RunFolder) -> dict:
    b = run.behaviour()
    h, chosen = b["headline"], b["selection"]["chosen"]
    feats: dict[str, list[int]] = {}
    for fid in h["features"]:
        hook, j = fid.rsplit("/", 1)
        feats.setdefault(hook, []).append(int(j))
    return {"features": feats, "mode": chosen["mode"], "c": float(chosen["c"]), "positions": chosen["positions"],
            "condition": CircuitFiles.curve_condition(h["method"], h["intervention"], h["k"]), "behaviour": b,
            "max_new_tokens": int(b["max_new_tokens"])}


def read_direction(run: RunFolder) -> torch.Tensor:
    return run.direction().unit.float()


def load_saes(run: RunFolder, hooks) -> dict:
    return {h: sae.to(torch.float32) for h, sae in run.saes(hooks, "cpu").items()}


# ------------------------------------------------------------------ hooks on the HF model


def layers_of(model):
    inner = getattr(model, "model", model)
    return inner.layers, inner.embed_tokens


def _out(output):
    return output[0] if isinstance(output, tuple) else output


def _replace(output, new):
    return (new, *output[1:]) if isinstance(output, tuple) else new


@contextmanager
def hooked(handles):
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def circuit_hooks(model, saes: dict, features: dict, mode: str, c: float, opening: torch.Tensor | None):
    """Forward (pre-)hooks editing the listed features; ``opening[b]`` = tokens of row b's opening to leave
    alone (``after_opening``), else every position."""
    layers, _ = layers_of(model)
    state = {"step": 0}
    handles = []

    def edit(x: torch.Tensor, hook: str) -> torch.Tensor:
        sae = saes[hook]
        f = sae.encode(x.float())
        mask = torch.zeros(f.shape[-1], dtype=torch.bool)
        mask[features[hook]] = True
        sel = mask[None, None] & (f > 0)
        if opening is not None and state["step"] == 0:  # the prompt pass: positions of each row's opening
            width = x.shape[1]
            pos = torch.arange(width)[None]
            sel &= (pos >= opening[:, None])[..., None]
        new = torch.where(sel, torch.zeros_like(f) if mode == "zero" else -c * f, f)
        return (x.float() + sae.decode(new) - sae.decode(f)).to(x.dtype)

    for hook in features:
        layer, kind = int(hook.split(".")[1]), hook.split(".")[2]
        if kind == "hook_resid_post":
            handles.append(layers[layer].register_forward_hook(
                lambda mod, args, out, hook=hook: _replace(out, edit(_out(out), hook))))
        elif kind == "hook_resid_pre":
            handles.append(layers[layer].register_forward_pre_hook(
                lambda mod, args, kwargs, hook=hook: ((edit(args[0], hook), *args[1:]), kwargs) if args else
                (args, {**kwargs, "hidden_states": edit(kwargs["hidden_states"], hook)}), with_kwargs=True))
        else:
            raise SystemExit(f"{hook}: only resid_pre / resid_post hooks are re-run by this script")
    if opening is not None:  # count the generation steps: only the first pass holds the prompt
        handles.append(layers[len(layers) - 1].register_forward_hook(
            lambda mod, args, out: state.__setitem__("step", state["step"] + 1)))
    return handles


def direction_hooks(model, r: torch.Tensor):
    layers, embed = layers_of(model)

    def project(out):
        x = _out(out)
        u = r.to(x.device, x.dtype)
        return _replace(out, x - (x @ u)[..., None] * u)

    handles = [embed.register_forward_hook(lambda mod, args, out: project(out))]
    for layer in layers:
        handles.append(layer.self_attn.register_forward_hook(lambda mod, args, out: project(out)))
        handles.append(layer.mlp.register_forward_hook(lambda mod, args, out: project(out)))
    return handles


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int, make_hooks=None,
             openings: list[int] | None = None) -> list[str]:
    """Greedy responses, left-padded batches, hooks made per batch (they may need the batch's openings)."""
    out = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s : s + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        opening = None
        if openings is not None:
            opening = torch.tensor([width - len(p) + o for p, o in zip(chunk, openings[s : s + batch_size])])
        handles = make_hooks(opening) if make_hooks else []
        with hooked(handles):
            new = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad)
        out += tokenizer.batch_decode(new[:, width:], skip_special_tokens=True)
    return out


# ------------------------------------------------------------------ prompts


def run_prompts(run: RunFolder) -> dict:
    import datasets

    return {r["prompt_id"]: r for r in datasets.load_from_disk(str(run.paths.activations.prompts)).to_list()}


def test_prompts(run: RunFolder, condition: str) -> list[str]:
    lines = [json.loads(x) for x in run.paths.circuits.responses.read_text().splitlines()]
    return [r["prompt_id"] for r in lines if r["condition"] == condition]


def other_prompts(run: RunFolder, n: int) -> list[str]:
    """Toxic prompts of the embedded large set that the run does not hold, the first ``n`` by a hash of the text."""
    from refusal_lens.data.prompts import read_prompts

    seen = {r["prompt"] for r in run_prompts(run).values()}
    texts = sorted({p.prompt for p in read_prompts("embedded:large") if p.label == "toxic"} - seen,
                   key=lambda t: hashlib.sha256(t.encode()).hexdigest())
    return texts[:n]


# ------------------------------------------------------------------ main


def main(argv=None) -> int:
    args, run = parse_args(argv)
    from refusal_lens.infra import durable

    setup = load_setup(run)
    ids, prompts, openings = the_prompts(args, run, setup)
    doc = measure(args, run, setup, ids, prompts, openings)
    out = args.out or run.check_output("rerun_circuit" if args.prompts == "other" else "rerun_circuit-test")
    durable.write_json(out, doc, indent=1)
    f = doc["fraction_of_direction"]
    log.info("re-run on %d refused prompts (%s): clean %.0f%%, circuit %s, direction %s; fraction of the direction's "
             "effect %s %s (stage: %s on %d test prompts)", len(doc["responses"]), args.prompts,
             100 * (doc["clean"]["refusal_rate"] or 0), doc["circuit"]["refusal_rate"], doc["direction"]["refusal_rate"],
             f, doc["fraction_ci"], doc["stage"]["fraction_of_direction"], doc["stage"]["n"])
    log.info("wrote %s", out)
    return 0


def parse_args(argv) -> tuple[argparse.Namespace, RunFolder]:
    """The flags, checked (a bad one refused naming what is allowed); nothing downloaded from here on."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished run folder (results/<run_name>)")
    ap.add_argument("--prompts", choices=("other", "test"), default="other")
    ap.add_argument("--n", type=int, default=96, help="--prompts other: toxic prompts generated clean first")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", type=Path, help="default: <run>/rerun_circuit[-test].json")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # an entry point: nothing is downloaded
    run = RunFolder(args.run)
    needed = [run.paths.circuits.config, run.paths.circuits.behaviour, run.paths.direction.vector]
    if missing := [str(p.relative_to(args.run)) for p in needed if not p.is_file()]:
        ap.error(f"--run {args.run}: not a run folder whose discover stage measured behaviour (missing "
                 f"{', '.join(missing)}); allowed: results/<run_name> after `refusal-lens run` or `discover`")
    if args.n < 1 or args.batch_size < 1:
        ap.error(f"--n={args.n}, --batch-size={args.batch_size}; allowed: integers >= 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return args, run


def load_setup(run: RunFolder) -> dict:
    """The run's config, headline, model (plain transformers, the interventions' dtype), SAEs and direction."""
    import yaml
    from transformers import AutoModelForCausalLM

    from refusal_lens.models.intervention_dtype import saved_dtype
    from refusal_lens.models.loading import load_tokenizer, resolve_source

    cfg = yaml.safe_load(run.paths.circuits.config.read_text())
    head = read_headline(run)
    if head["mode"] not in ("zero", "scale"):
        raise SystemExit(f"the headline is a {head['mode']} ablation: it needs the stage's class means, which this "
                         "independent re-run does not rebuild; allowed: a run whose headline is zero (or scale)")
    dtype = getattr(torch, saved_dtype(cfg["model"]))
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        dtype = torch.float32
    source = resolve_source(cfg["model"]["name"])
    setup = {"head": head, "dtype": dtype, "tokenizer": load_tokenizer(source),
             "model": AutoModelForCausalLM.from_pretrained(source, dtype=dtype).eval(),
             "saes": load_saes(run, head["features"]), "r": read_direction(run),
             "max_tokens": int(cfg["inference"]["max_prompt_tokens"])}
    log.info("headline %s: %d features at %s", head["condition"], sum(map(len, head["features"].values())),
             ", ".join(head["features"]))
    return setup


def the_prompts(args, run: RunFolder, setup: dict) -> tuple[list[str], list[list[int]], list[int] | None]:
    """``(ids, token ids, opening lengths or None)`` of the prompts re-run: the stage's test prompts, or toxic
    prompts of the large embedded set that the run never saw."""
    from refusal_lens.core.chat import encode_prompt

    if args.prompts == "test":
        table = run_prompts(run)
        ids = test_prompts(run, setup["head"]["condition"])
        texts = [table[i]["prompt"] for i in ids]
    else:
        texts = other_prompts(run, args.n)
        ids = [f"large:{hashlib.sha256(t.encode()).hexdigest()[:12]}" for t in texts]
    enc = [encode_prompt(setup["tokenizer"], t, setup["max_tokens"]) for t in texts]
    openings = [e.n_opening for e in enc] if setup["head"]["positions"] == "after_opening" else None
    return ids, [e.ids for e in enc], openings


def measure(args, run: RunFolder, setup: dict, ids, prompts, openings) -> dict:
    """Clean, circuit and direction responses judged; rates, the fraction of the direction's effect and the
    stage's own numbers beside them (and, on test, how many responses equal the stage's)."""
    from refusal_lens.core.behaviour import fraction_interval, fraction_of
    from refusal_lens.core.judge import judge

    head, model, tokenizer, new_tokens = (setup["head"], setup["model"], setup["tokenizer"],
                                             setup["head"]["max_new_tokens"])

    def outcomes(responses):
        return [judge(x).outcome for x in responses]

    def circuit(opening):
        return circuit_hooks(model, setup["saes"], head["features"], head["mode"], head["c"], opening)

    doc = {"run": str(run.root), "prompts": args.prompts,
           "headline": {k: head[k] for k in ("condition", "mode", "c", "positions", "features")},
           "dtype": str(setup["dtype"]), "max_new_tokens": new_tokens}
    clean = generate(model, tokenizer, prompts, new_tokens, args.batch_size)
    clean_out = outcomes(clean)
    doc["clean_all"] = rate(clean_out)
    keep = [i for i, o in enumerate(clean_out) if o == "refused"]
    if args.prompts == "other":
        log.info("clean: %d of %d toxic prompts refused", len(keep), len(prompts))
    else:
        keep = list(range(len(prompts)))  # the stage's prompts: refused when collected
    sub = [prompts[i] for i in keep]
    sub_open = [openings[i] for i in keep] if openings is not None else None
    circ = generate(model, tokenizer, sub, new_tokens, args.batch_size, circuit, sub_open)
    dirn = generate(model, tokenizer, sub, new_tokens, args.batch_size, lambda _o: direction_hooks(model, setup["r"]))
    c_out, d_out = outcomes(circ), outcomes(dirn)
    cl = np.array([clean_out[i] == "refused" for i in keep], float)
    ci_, di_ = np.array([o == "refused" for o in c_out], float), np.array([o == "refused" for o in d_out], float)
    doc.update({"clean": rate([clean_out[i] for i in keep]), "circuit": rate(c_out), "direction": rate(d_out),
                "fraction_of_direction": fraction_of(cl.mean(), ci_.mean(), di_.mean()) if len(keep) else None,
                "fraction_ci": list(fraction_interval(cl, ci_, di_)) if len(keep) else [None, None]})
    b = head["behaviour"]
    doc["stage"] = {"n": b["headline"]["n"], "clean": b["clean"]["refusal_rate"], "circuit": b["headline"]["refusal_rate"],
                    "circuit_ci": b["headline"]["ci"], "direction": b["direction"]["refusal_rate"],
                    "direction_ci": b["direction"]["ci"], "fraction_of_direction": b["headline"]["fraction_of_direction"]}
    if args.prompts == "test":
        lines = [json.loads(x) for x in run.paths.circuits.responses.read_text().splitlines()]
        stage = {x["prompt_id"]: x["response"] for x in lines if x["condition"] == head["condition"]}
        same = [stage[i].strip() == resp.strip() for i, resp in zip(ids, circ)]
        doc["same_responses_as_stage"] = {"equal": int(sum(same)), "of": len(same)}
    doc["responses"] = [{"prompt_id": ids[i], "clean": clean[i], "circuit": circ[j], "direction": dirn[j]}
                        for j, i in enumerate(keep)]
    return doc


if __name__ == "__main__":
    raise SystemExit(main())
