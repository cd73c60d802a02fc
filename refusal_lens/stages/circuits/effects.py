"""Step 2 of discover, attribution: per-prompt effects of every node on the refusal score (AtP or IG, exact error
nodes), batch by batch, each batch committed as a shard (``effects/<split>-batch-*.safetensors`` + a ledger of their
sizes and hashes) so that a killed run resumes after the last checked batch; the split's effects then go to
``effects/<split>.safetensors``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from refusal_lens.config import Config
from refusal_lens.core.intervene import make_batch
from refusal_lens.infra import durable
from refusal_lens.run.collected import Collected
from refusal_lens.stages.circuits.attribution import Runner


@dataclass
class SplitEffects:
    rows: list[int]  # rows of the prompts table, in effect order
    features: torch.Tensor  # [n, n_classes, n_features]
    errors: torch.Tensor  # [n, n_hooks]
    metric: torch.Tensor  # [n]

    def of(self, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        pos = {r: i for i, r in enumerate(self.rows)}
        idx = torch.tensor([pos[r] for r in rows], dtype=torch.long)
        return self.features[idx], self.errors[idx]



def load_effects(path: Path) -> SplitEffects:
    t = load_file(str(path))
    return SplitEffects(t["rows"].tolist(), t["features"], t["errors"], t["metric"])


def attribute(runner: Runner, data: Collected, rows: Sequence[int], tokenizer, cfg: Config, folder: Path, split: str,
              show_progress: bool) -> SplitEffects:
    """Per-prompt effects of every node on the refusal score, batch by batch (resumable, shards checked)."""
    c = cfg.circuits
    path = folder / f"{split}.safetensors"
    if path.is_file():
        return load_effects(path)
    folder.mkdir(parents=True, exist_ok=True)
    ledger = durable.Ledger(folder / "ledger.json")
    encoded = data.encoded(tokenizer, cfg.inference.max_prompt_tokens, rows)
    order = sorted(range(len(rows)), key=lambda i: (len(encoded[i].ids), rows[i]))
    chunks = [order[s : s + c.batch_size] for s in range(0, len(order), c.batch_size)]
    feats, errs, metric, done_rows = [], [], [], []
    for bi, chunk in enumerate(tqdm(chunks, desc=f"attribution ({c.method}, {split})", disable=not show_progress)):
        shard = folder / f"{split}-batch-{bi:04d}.safetensors"
        batch_rows = [rows[i] for i in chunk]
        if ledger.verified(shard):
            t = load_file(str(shard))
            if t["rows"].tolist() == batch_rows:
                feats.append(t["features"]), errs.append(t["errors"]), metric.append(t["metric"])
                done_rows += batch_rows
                continue
        batch = make_batch([encoded[i] for i in chunk], batch_rows, tokenizer.pad_token_id, device=runner.device)
        if c.method == "atp":  # the clean values and the gradients from one pass
            m, values, grads = runner.clean_and_gradients(batch)
            eff = runner.atp(batch, values, grads)
        else:
            m, values = runner.clean(batch)
            eff = runner.ig(batch, values, c.ig_steps)
        errors = runner.exact_errors(batch, m) if c.error_nodes == "exact" else eff.errors
        t = {"features": eff.features.detach().float().cpu().contiguous(),
             "errors": errors.detach().float().cpu().contiguous(), "metric": m.float().cpu(),
             "rows": torch.tensor(batch_rows)}
        durable.save_safetensors(t, shard)
        ledger.add(shard)
        feats.append(t["features"]), errs.append(t["errors"]), metric.append(t["metric"])
        done_rows += batch_rows
    out = SplitEffects(done_rows, torch.cat(feats) if feats else torch.zeros(0), torch.cat(errs) if errs else torch.zeros(0),
                       torch.cat(metric) if metric else torch.zeros(0))
    durable.save_safetensors({"rows": torch.tensor(out.rows), "features": out.features.contiguous(),
                              "errors": out.errors.contiguous(), "metric": out.metric.contiguous()}, path)
    return out

