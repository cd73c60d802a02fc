"""The report's feature and run tables: the top promoting features of the pooled circuits with the prompt tokens
where they fire most, and the other analysed runs of the results folder side by side."""

from __future__ import annotations

import numpy as np
import torch

from refusal_lens.config import Config
from refusal_lens.run.folder import RunFolder
from refusal_lens.run.sae_files import load_sae


def top_features(cfg: Config, groups: dict[str, dict], run: RunFolder, tokenizer) -> dict:
    """For the pooled circuits' top promoting features: the prompt tokens (any prompt) where they fire most."""
    a = cfg.analysis
    tok = tokenizer
    wanted: dict[str, set[int]] = {}
    for key in ("toxic/all", "safe/all"):
        for node in (groups.get(key) or {}).get("promoting", [])[: a.top_features]:
            wanted.setdefault(node["hook"], set()).add(node["feature"])
    examples: dict[str, list] = {}
    for hook, feats in wanted.items():
        acts = run.hook_activations(hook)
        is_response = np.asarray(acts.table.column("is_response").to_pylist(), dtype=bool)
        rows = np.flatnonzero(~is_response)
        sae = load_sae(run.paths.saes.hook(hook), "cpu")
        feats = sorted(feats)
        best = {f: [] for f in feats}
        with torch.no_grad():
            for s in range(0, len(rows), 4096):
                chunk = rows[s : s + 4096]
                fa = sae.encode(acts.take(chunk))[:, feats]
                for j, f in enumerate(feats):
                    vals, idx = torch.topk(fa[:, j], min(a.top_examples, len(chunk)))
                    best[f] += [(float(v), int(chunk[i])) for v, i in zip(vals, idx) if v > 0]
        by_prompt: dict[str, dict[int, int]] = {}
        for r in rows:
            by_prompt.setdefault(acts.prompt_ids[r], {})[int(acts.positions[r])] = int(acts.token_ids[r])
        for f in feats:
            out = []
            for v, r in sorted(best[f], reverse=True)[: a.top_examples]:
                pid, pos = acts.prompt_ids[r], int(acts.positions[r])
                toks = by_prompt[pid]
                left = "".join(tok.decode([toks[p]]) for p in range(pos - 8, pos) if p in toks)
                out.append({"prompt_id": pid, "category": acts.categories[r], "label": acts.labels[r],
                            "activation": v, "token": tok.decode([toks[pos]]), "context": left})
            examples[f"{hook}/{f}"] = out
    return {key: [{"node": n["id"], "effect_test": n["effect_test"], "ci": [n["ci_low"], n["ci_high"]],
                   "cosine": n["cosine_with_direction"], "examples": examples.get(n["id"], [])}
                  for n in (groups.get(key) or {}).get("promoting", [])[: a.top_features]]
            for key in ("toxic/all", "safe/all") if key in groups}


def compare_runs(run: RunFolder) -> list[dict]:
    """Every run of the results folder with a written analysis (this one from its previous analysis), side by side."""
    rows = []
    for other_dir in sorted(p for p in run.root.parent.iterdir() if p.is_dir()):
        other = RunFolder(other_dir)
        if not other.paths.analysis.summary.is_file():
            continue
        this = other_dir.resolve() == run.root.resolve()
        s = other.evidence()
        d = s.get("direction", {})
        b = s.get("circuit_behaviour") or {}
        rows.append({"run": other.name, "model": s.get("model"), "this run": this,
                     "direction": (d.get("direction") or {}).get("hook"),
                     "refused harmful ablated": ((d.get("harmful_refused") or {}).get("ablated") or {}).get("refusal_rate"),
                     "circuit share of direction": (b.get("circuit") or {}).get("fraction_of_direction")})
    return rows

