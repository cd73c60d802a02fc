"""Step 6 of discover: edges between the nodes of the pooled circuits at consecutive spliced hooks (discovery
prompts), kept when ``|edge| >= circuits.edge_threshold`` x the largest edge between two features."""

from __future__ import annotations

from collections.abc import Sequence

from tqdm.auto import tqdm

from refusal_lens.config import Config
from refusal_lens.core.intervene import make_batch
from refusal_lens.stages.circuits.attribution import Runner
from refusal_lens.stages.circuits.inputs import Inputs
from refusal_lens.stages.circuits.nodes import ERROR


def circuit_edges(runner: Runner, inputs: Inputs, circuit: dict, rows: Sequence[int], tokenizer, cfg: Config,
                  show_progress: bool) -> list[dict]:
    c = cfg.circuits
    space, data = inputs.space, inputs.data
    feats = [space.offset(n["hook"]) + n["feature"] for n in circuit["promoting"] + circuit["suppressing"]]
    chosen = sorted(data.hash_order(rows)[: c.edge_prompts])
    enc = data.encoded(tokenizer, cfg.inference.max_prompt_tokens, chosen)
    total: dict[tuple[str, str], float] = {}
    for s in tqdm(range(0, len(chosen), c.batch_size), desc="edges", disable=not show_progress):
        b = make_batch(enc[s : s + c.batch_size], chosen[s : s + c.batch_size], tokenizer.pad_token_id,
                       device=runner.device)
        _, values, grads = runner.clean_and_gradients(b)
        for u, d, w in runner.edges(b, values, feats, grads):
            total[(u, d)] = total.get((u, d), 0.0) + w * len(b)
    weights = {k: v / max(len(chosen), 1) for k, v in total.items()}
    # the bar is relative to the largest edge between two features: edges between error nodes (whole
    # residual-stream remainders) are orders of magnitude larger and would hide the rest
    feature_edges = [abs(v) for (u, d), v in weights.items() if not (u.endswith("/" + ERROR) or d.endswith("/" + ERROR))]
    top = max(feature_edges or [abs(v) for v in weights.values()] or [0.0])
    return [{"from": u, "to": d, "effect": w} for (u, d), w in sorted(weights.items(), key=lambda kv: -abs(kv[1]))
            if top > 0 and abs(w) >= c.edge_threshold * top]

