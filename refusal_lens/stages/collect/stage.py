"""Stage 1, collect: responses, refusal judgements and activations of every prompt, into ``activations/``.

The prompts are OR-Bench's (``safe``, ``toxic``) and the harmless contrast set (``harmless``). Table of contents
(:meth:`CollectStage.run`):

1. **prompts** — encoded through the chat template; the storage estimate;
2. **responses** — greedy responses, judged, committed batch by batch (:mod:`.responses`);
3. **split and refusal tokens** — once every response is judged, on rank 0: each prompt goes to
   ``discovery`` / ``validation`` / ``test`` (stratified by label x category x refused) and the refusal score's
   token set is learned from the discovery responses (:mod:`.split`);
4. **activations** — one plain forward pass per batch (:mod:`.extraction`) gives the kept positions of every hook
   and the refusal score at the last prompt token, buffered and written shard by shard (:mod:`.shards`);
5. **finalize** — on rank 0: one HF ``datasets`` folder per hook and for the prompts, the refusal rates
   (:mod:`.rates`), the manifest's fields (hooks, widths, refusal tokens, the template's opening, AUROC).

Progress is committed batch by batch (responses) and shard by shard (activations): kill the process at any moment
and the same command resumes after the last committed batch or shard, giving the same rows as an uninterrupted
run. Every file is written durably (:mod:`refusal_lens.infra.durable`); each committed shard lists the size and
SHA-256 of its files, checked on resume; a finished collection checks the sizes before it is skipped.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict

from tqdm.auto import tqdm

from refusal_lens.core.chat import encode_prompt, shared_prefix_length
from refusal_lens.core.hooks import resolve_hooks
from refusal_lens.core.intervene import Intervener
from refusal_lens.core.refusal import RefusalTokens
from refusal_lens.data.prompts import Prompt
from refusal_lens.errors import UserError
from refusal_lens.config import config_to_dict
from refusal_lens.infra.storage_estimate import estimate_for_config, measure_hook_widths
from refusal_lens.infra.status import StageOutcome, rates_summary
from refusal_lens.run.collected import ResponseLog
from refusal_lens.run.stage import StageContext, StageResult
from refusal_lens.stages.collect.extraction import CollectStats, process_batch
from refusal_lens.stages.collect.rates import format_rates, refusal_rates, score_auroc, write_rates
from refusal_lens.stages.collect.responses import initial_batch_size, respond_all, with_oom_halving
from refusal_lens.stages.collect.shards import ShardWriter, committed_sizes_ok, finalize
from refusal_lens.stages.collect.split import split_and_tokens

logger = logging.getLogger(__name__)


class CollectError(UserError, RuntimeError):
    """Prompts that cannot be read, or a results folder of other settings."""


def versions() -> dict[str, str]:
    """The versions of the packages the results depend on (recorded in the manifest)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("refusal-lens", "torch", "transformers", "transformer-lens", "sae-lens", "datasets"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


class CollectStage:
    """The collect stage; ``prompts`` replaces the configured prompt sets (``data``, ``direction.harmless``)."""

    all_ranks = True
    what = "activations"

    def __init__(self, prompts: Sequence[Prompt] | None = None):
        self.given = list(prompts) if prompts is not None else None

    def check(self, ctx: StageContext) -> None:
        """Load the prompts (bad data fails before the model loads) and resolve the hooks."""
        from refusal_lens.data.prompts import load_harmless, load_prompts

        cfg = ctx.cfg
        self.prompts = self.given if self.given is not None else (
            load_prompts(cfg.data) + load_harmless(cfg.direction.harmless, cfg.direction.harmless_samples,
                                                   cfg.data.seed))
        self.hooks = resolve_hooks(ctx.loaded.model, cfg.model.activation_layers)

    def fingerprint(self, ctx: StageContext) -> dict:
        """What makes two collections the same: model, data and inference settings that change rows."""
        cfg = ctx.cfg
        inf = config_to_dict(cfg.inference)
        inf.pop("batch_size")  # batching does not change what is stored
        inf.pop("shard_mb")
        inf.pop("collector")  # nor does the collector (values equal up to float rounding, as across batch sizes)
        return {"model": config_to_dict(cfg.model), "data": config_to_dict(cfg.data), "inference": inf,
                "harmless": [cfg.direction.harmless, cfg.direction.harmless_samples], "hooks": list(self.hooks),
                "world": ctx.dist.world}

    def still_complete(self, ctx: StageContext) -> bool:
        """A finished collection whose committed files have lost their recorded size is resumed instead."""
        return committed_sizes_ok(ctx.run.paths.activations, int(ctx.manifest.get("world", 1)))

    def run(self, ctx: StageContext) -> tuple[dict | None, dict]:
        """The stage; ``ctx.status`` gets this rank's progress (responses, then activations: two steps per prompt)
        and the refusal rates once known."""
        cfg, dist, files, loaded, prompts = ctx.cfg, ctx.dist, ctx.run.paths.activations, ctx.loaded, self.prompts
        inf = cfg.inference

        # ---- 1. prompts and the storage estimate
        encoded, widths, estimate = self._encode_and_estimate(ctx)
        _, mine = dist.block(list(range(len(prompts))))
        steps = 2 * len(mine)
        if dist.world > 1:
            ctx.status.set(message=f"collect progress counts rank 0's block: {len(mine)} of {len(prompts)} prompts")

        # ---- 2. responses, judged
        log = ResponseLog(files, dist.rank)
        answered = len({j.index for j in log.read()} & set(mine))
        bar = tqdm(total=steps, initial=answered, unit="step", desc=f"collect[{dist.rank}]",
                   disable=not ctx.show_progress or not dist.is_main)
        ctx.status.progress(answered, steps, "step", initial=answered)
        stats = CollectStats()
        progress = {"done": answered}

        def on_batch(n: int) -> None:
            progress["done"] += n
            bar.update(n)
            ctx.status.progress(progress["done"], steps)

        t0 = time.perf_counter()
        judged, batch_size = respond_all(log, Intervener(loaded), mine, prompts, encoded, inf.max_new_tokens,
                                         initial_batch_size(inf.batch_size, loaded.device), on_batch)
        stats.generate_s = time.perf_counter() - t0

        # ---- 3. split and refusal tokens (once, on rank 0)
        dist.barrier()
        if dist.is_main and not files.split.is_file():
            split_and_tokens(files, loaded, prompts, cfg, dist.world)
        dist.barrier()
        info = json.loads(files.split.read_text())

        # ---- 4. activations and refusal scores, shard by shard
        writer = ShardWriter(files, self.hooks, widths, inf.storage_dtype, dist.rank, int(inf.shard_mb * (1 << 20)),
                             bytes_per_prompt=estimate.disk_bytes_per_1000_prompts / 1000 if inf.save_activations
                             else 0, n_prompts=len(mine))
        batch_size = self._activations(ctx, writer, mine, encoded, judged, info, batch_size, bar, stats, steps)
        stats.batch_size_final = batch_size
        bar.close()

        # ---- 5. finalize (rank 0)
        dist.barrier()
        fields = self._finalize(ctx, writer, encoded, widths, info, estimate, stats) if dist.is_main else {}
        if dist.is_main:
            ctx.status.progress(steps, steps)
        return None, fields

    def _encode_and_estimate(self, ctx: StageContext):
        """``(encoded prompts, hook widths, storage estimate)``; a warning names the prompts that were cut."""
        inf, loaded = ctx.cfg.inference, ctx.loaded
        encoded = [encode_prompt(loaded.tokenizer, p.prompt, inf.max_prompt_tokens) for p in self.prompts]
        if n_trunc := sum(e.truncated for e in encoded):
            logger.warning("%d prompt(s) longer than inference.max_prompt_tokens=%d were cut", n_trunc,
                           inf.max_prompt_tokens)
        widths = measure_hook_widths(loaded.model, self.hooks)
        estimate = estimate_for_config(widths, inf, ctx.cfg.model.torch_dtype,
                                       sum(len(e.ids) for e in encoded) / max(len(encoded), 1))
        for line in estimate.lines():
            logger.info("estimate: %s", line)
        return encoded, widths, estimate

    def _finalize(self, ctx: StageContext, writer: ShardWriter, encoded, widths: dict, info: dict, estimate,
                  stats: CollectStats) -> dict:
        """Rank 0: the prompts table and shards finalized, the refusal rates written (and on the status); returns
        the manifest's fields."""
        import datasets

        files, loaded, inf = ctx.run.paths.activations, ctx.loaded, ctx.cfg.inference
        finalize(files, self.hooks, writer, widths, inf, ctx.dist.world)
        rows = datasets.load_from_disk(str(files.prompts)).to_list()
        rates = refusal_rates(rows)
        write_rates(files, rates)
        ctx.status.set(rates=rates)
        return dict(
            n_prompts=len(self.prompts), n_layers=loaded.n_layers, hooks=list(self.hooks), widths=widths,
            template_prefix_tokens=shared_prefix_length([e.ids for e in encoded]),
            opening_tokens=min((e.n_opening for e in encoded), default=0),
            post_instruction_tokens=max((e.n_post_instruction for e in encoded), default=0),
            refusal_tokens=info["refusal_tokens"], score_auroc=score_auroc(rows), split_counts=info["counts"],
            estimate=estimate.to_dict(), versions=versions(), stats_rank0=asdict(stats))

    def _activations(self, ctx, writer: ShardWriter, mine: Sequence[int], encoded, judged, info: dict,
                     batch_size: int, bar, stats: CollectStats, steps: int) -> int:
        """Pass 3: every prompt of this rank's block through the forward pass, buffered and written shard by
        shard, resuming after the last committed shard. Returns the batch size reached."""
        cfg, loaded, prompts = ctx.cfg, ctx.loaded, self.prompts
        splits, tokens = info["splits"], RefusalTokens.from_dict(info["refusal_tokens"])
        writer.verify()
        if removed := writer.remove_uncommitted():
            logger.info("collect: removed %d file(s) of an interrupted shard", removed)
        done_n = writer.next_prompt
        with writer.space_for(done_n):  # a disk too small fails here, before any model work
            pass
        if done_n:
            logger.info("collect: resuming the activations of rank %d at prompt %d of %d", ctx.dist.rank, done_n,
                        len(mine))
        bar.update(done_n)
        ctx.status.progress(len(mine) + done_n, steps)
        shard_start = i = done_n
        t_start = time.perf_counter()
        while i < len(mine):
            def forward(bs: int):
                idx = mine[i : i + bs]
                return process_batch(loaded, [prompts[j] for j in idx], [encoded[j] for j in idx],
                                     [judged[j] for j in idx], splits, self.hooks, cfg, tokens)

            out, batch_size = with_oom_halving(batch_size, "activations")(forward)
            t0 = time.perf_counter()
            writer.add(out)
            i += out.stats.prompts
            if writer.full():
                out.stats.bytes_written += writer.flush(shard_start, i)
                shard_start = i
            out.stats.write_s = time.perf_counter() - t0
            stats.add(out.stats)
            bar.update(out.stats.prompts)
            bar.set_postfix(tok_s=f"{stats.forward_tokens / (time.perf_counter() - t_start):.0f}")
            ctx.status.progress(len(mine) + i, steps)
        t0 = time.perf_counter()
        stats.bytes_written += writer.flush(shard_start, len(mine))
        stats.write_s += time.perf_counter() - t0
        return batch_size

    def load(self, ctx: StageContext) -> dict:
        files = ctx.run.paths.activations
        manifest = json.loads(files.manifest.read_text())
        rates = json.loads(files.rates_json.read_text())
        return {"n_prompts": manifest["n_prompts"], "hooks": manifest["hooks"], "rates": rates}

    def on_skip(self, ctx: StageContext, summary: dict) -> None:
        """What a skipped collection tells the live status."""
        ctx.status.progress(2 * summary["n_prompts"], 2 * summary["n_prompts"], "step")
        ctx.status.set(rates=summary["rates"])

    def outcome(self, ctx: StageContext, result: StageResult) -> tuple[list[str], StageOutcome]:
        s = result.summary
        lines = [f"refusal rates ({s['n_prompts']} prompts; safe = over-refusal, toxic = correct refusal):",
                 format_rates(s["rates"]), f"activations: {result.folder} ({len(s['hooks'])} hooks)"]
        return lines, StageOutcome("skipped" if result.skipped else "done",
                                   {"prompts": s["n_prompts"], "hooks": len(s["hooks"]),
                                    "refusal_rate": rates_summary(s["rates"])})

