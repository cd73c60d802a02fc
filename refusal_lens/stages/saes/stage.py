"""Stage 3, train-saes: one SAE per collected hook (SAE-Lens), evaluated on held-out prompts.

Table of contents (:meth:`TrainSAEsStage.run`): the hooks to train (``sae.hooks`` or every collected one) and
their sites (:class:`Sites`: trained on discovery, judged on validation, reported on test, the template's opening
left out); then per hook (this rank's share: hook ``i`` goes to rank ``i % world``): train (:mod:`.train`) or copy
(``sae.source: path``), evaluate (:mod:`.evaluate`), commit; then, on rank 0, the quality table and figures.

Output folder (``saes/``, paths in :class:`refusal_lens.run.folder.SAEFiles`)::

    manifest.json             fingerprint (SAE config + the activations it was trained on), status
    config.yaml               the resolved config
    <hook name>/              SAE-Lens's own format: cfg.json + sae_weights.safetensors
                              (+ training_log.jsonl, metrics.json, files.json: size and SHA-256 of each)
    quality.json / .csv       the per-layer table: held-out metrics and whether the SAE passes the bar
    figures/*.html            training curves and metrics by layer (plotly, offline)

A hook is finished when its folder exists and its files match ``files.json`` (it is written under a
temporary name, synced and renamed once trained, saved and evaluated: :func:`refusal_lens.infra.durable.commit_dir`);
finished hooks are skipped on rerun, an interrupted or damaged one is trained again from scratch,
``--force`` retrains.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from refusal_lens.infra import durable
from refusal_lens.activations.store import HookActivations
from refusal_lens.core.chat import encode_prompt
from refusal_lens.run.collected import Collected
from refusal_lens.config import Config, config_to_dict
from refusal_lens.errors import UserError
from refusal_lens.core.hooks import parse_hook_name, resolve_layer_specs
from refusal_lens.stages.saes.data import activation_batches, distinct_rows, site_rows
from refusal_lens.stages.saes.evaluate import mean_activation, reconstruction_metrics, splice_metrics
from refusal_lens.stages.saes.plots import write_figures
from refusal_lens.stages.saes.train import build_training_sae, check_sae_config, train_sae
from refusal_lens.infra.status import StageOutcome
from refusal_lens.run.folder import ActivationFiles, SAEFiles
from refusal_lens.run.sae_files import load_sae
from refusal_lens.run.stage import StageContext, StageResult

logger = logging.getLogger(__name__)

QUALITY_FIELDS = ("hook", "layer", "hook_type", "explained_variance", "mse", "l0", "dead_fraction", "dense_fraction",
                  "ce_loss_recovered", "ce_increase", "kl_sae", "kl_mean", "ce_clean", "ce_sae", "ce_mean", "tokens_seen",
                  "epochs", "train_rows", "distinct_train_rows", "val_explained_variance", "val_ce_loss_recovered",
                  "passes")


class SAEStageError(UserError, RuntimeError):
    """Missing activations or SAEs, or a results folder from another config."""


def hooks_to_train(cfg: Config, manifest: dict) -> list[str]:
    collected = list(manifest["hooks"])
    if not cfg.sae.hooks:
        return collected
    wanted = resolve_layer_specs(list(cfg.sae.hooks), int(manifest["n_layers"]), valid_hooks=collected)
    missing = [h for h in wanted if h not in collected]
    if missing:
        raise SAEStageError(
            f"sae.hooks: no activations for hook(s) {missing}; collected hooks: {collected}. "
            "Add them to model.activation_layers and collect again."
        )
    return wanted


def eval_sequences(data: Collected, tokenizer, split: str, limit: int, max_tokens: int) -> list[list[int]]:
    """Token ids (chat prompt + response) of up to ``limit`` prompts of ``split``, for the splice metrics."""
    seqs = []
    for i in data.split_rows(split)[:limit]:
        r = data.rows[i]
        prompt = encode_prompt(tokenizer, r["prompt"], max_tokens).ids
        seqs.append(prompt + tokenizer(r["response"], add_special_tokens=False)["input_ids"])
    return seqs


@dataclass(frozen=True)
class Sites:
    """Which rows of a hook folder an SAE trains (discovery), is judged (validation) and reported (test) on."""

    split_of: dict[str, str]
    opening: dict[str, int]  # per prompt: positions before this are the template's opening (not sites)
    exclude: tuple[int, ...]  # token ids left out (special tokens, when sae.exclude_special_tokens)

    def rows(self, acts: HookActivations) -> dict[str, np.ndarray]:
        return site_rows(acts, self.split_of, self.opening, self.exclude)


def sites_for(cfg: Config, data: Collected, loaded) -> Sites:
    opening = {r["prompt_id"]: int(r["n_opening_tokens"]) if cfg.sae.exclude_template_prefix else 0 for r in data.rows}
    exclude = tuple(loaded.tokenizer.all_special_ids) if cfg.sae.exclude_special_tokens else ()
    return Sites({r["prompt_id"]: r["split"] for r in data.rows}, opening, exclude)


def check_rows(cfg: Config, acts: HookActivations, train_rows: np.ndarray, hook: str) -> int:
    """The distinct training rows; an error (unless allowed) when they are fewer than the SAE's features."""
    d_sae = acts.width * cfg.sae.expansion_factor
    distinct = distinct_rows(acts, train_rows)
    if distinct < d_sae and not cfg.sae.allow_fewer_rows_than_features:
        raise SAEStageError(
            f"{hook}: the discovery split holds {distinct} distinct training rows for an SAE of {d_sae} features "
            f"(sae.expansion_factor={cfg.sae.expansion_factor}); it would memorise them. Collect more rows "
            "(inference.positions: all, inference.store_response_activations: true, a larger "
            "inference.max_new_tokens, more prompts or a larger data.split_discovery), use a smaller "
            "sae.expansion_factor, or set sae.allow_fewer_rows_than_features: true")
    return distinct


def template_prefix(loaded, files: ActivationFiles, max_tokens: int) -> int:
    """Tokens all collected prompts share at the start (for collections made before the manifest kept it)."""
    import datasets

    from refusal_lens.core.chat import shared_prefix_length

    rows = datasets.load_from_disk(str(files.prompts)).select_columns(["prompt"])[:64]["prompt"]
    return shared_prefix_length([encode_prompt(loaded.tokenizer, p, max_tokens).ids for p in rows])


def hook_problems(folder: Path) -> list[str] | None:
    """Why a committed hook folder is not to be trusted (``["absent"]``, no ``files.json``, or the files that do not
    match it); None when it is intact."""
    if not folder.is_dir():
        return ["absent"]
    ledger = durable.Ledger(SAEFiles.ledger(folder))
    names = {p.name for p in folder.iterdir()} - {SAEFiles.ledger(folder).name} | set(ledger.records)
    problems = [f"{n}: {why}" for n in sorted(names) if (why := ledger.damaged(folder / n)) is not None]
    if not ledger.records:
        return ["no files.json"]
    return problems or None


def _hook_done(folder: Path) -> bool:
    """A committed hook folder whose files all match ``files.json``; a damaged one is removed (retrained)."""
    problems = hook_problems(folder)
    if problems is None:
        return True
    if problems != ["absent"]:
        logger.warning("%s: not trusted (%s): trained again", folder, "; ".join(problems))
        shutil.rmtree(folder)
    return False


def _train_one(hook: str, cfg: Config, acts: HookActivations, tmp: Path, show_progress: bool, sites: Sites) -> dict:
    train_rows = sites.rows(acts)["discovery"]
    distinct = check_rows(cfg, acts, train_rows, hook)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.sae.seed)
        sae = build_training_sae(cfg.sae, acts.width, hook, cfg.model.name)
    batches = activation_batches(acts, train_rows, cfg.sae.train_batch_size_tokens, balance=cfg.sae.balance,
                                 seed=cfg.sae.seed)
    summary = train_sae(sae, batches, cfg.sae, train_rows=len(train_rows), log_path=SAEFiles.training_log(tmp),
                        show_progress=show_progress)
    sae.save_inference_model(str(tmp))
    # SAE-Lens writes cfg.json's keys in an order that varies from process to process: sorted, the
    # same SAE gives the same bytes (and the same sha256 in files.json)
    cfg_json = SAEFiles.sae_config(tmp)
    durable.write_text(cfg_json, json.dumps(json.loads(cfg_json.read_text()), sort_keys=True))
    return {"tokens_seen": summary.tokens_seen, "epochs": summary.epochs, "steps": summary.steps,
            "train_rows": summary.train_rows, "distinct_train_rows": distinct}


def _evaluate_one(hook: str, cfg: Config, acts: HookActivations, folder: Path, loaded, sequences: dict[str, list],
                  sites: Sites, splice_from: int, special: Sequence[int], clean: dict[str, dict] | None = None) -> dict:
    """Reconstruction and splice metrics on the validation split (the bar) and the test split (reported); ``clean``
    (split -> memo, shared by the hooks) keeps each split's clean passes (:func:`splice_metrics`)."""
    sae = load_sae(folder, cfg.sae.device)
    if sae.cfg.d_in != acts.width:
        raise SAEStageError(f"{folder}: SAE d_in={sae.cfg.d_in} does not match the activations of {hook} ({acts.width})")
    rows = sites.rows(acts)
    mean = mean_activation(acts, rows["discovery"])
    out = {}
    for split in ("validation", "test"):
        if len(rows[split]) == 0:
            raise SAEStageError(f"{hook}: no {split} rows to judge the SAE on (more prompts, or data.split_{split})")
        metrics = reconstruction_metrics(sae, acts, rows[split])
        if sequences[split]:
            metrics.update(splice_metrics(loaded.model, sae, hook, sequences[split], loaded.tokenizer.pad_token_id,
                                          splice_from=splice_from, skip_token_ids=special, mean=mean,
                                          clean=None if clean is None else clean.setdefault(split, {})))
        out[split] = metrics
    return {**out["test"], "validation": out["validation"]}


class TrainSAEsStage:
    all_ranks = True
    what = "SAEs"

    def check(self, ctx: StageContext) -> None:
        cfg = ctx.cfg
        self.collect_manifest = ctx.run.manifest("activations")
        if self.collect_manifest.get("status") != "complete":
            raise SAEStageError(f"no finished activations in {ctx.run.paths.activations.dir}: run `refusal-lens "
                                "collect` with this config first")
        self.hooks = hooks_to_train(cfg, self.collect_manifest)
        collected = self.collect_manifest.get("config", {}).get("inference", {})
        if cfg.sae.source == "train" and collected.get("positions") != "all":
            logger.warning("the activations hold only the %r position of each prompt: SAEs need many more tokens; "
                           "collect with inference.positions: all and store_response_activations: true",
                           collected.get("positions"))
        if cfg.sae.source == "train":
            for hook in self.hooks:  # bad settings fail before anything is written
                check_sae_config(cfg.sae, int(self.collect_manifest["widths"][hook]))

    def fingerprint(self, ctx: StageContext) -> dict:
        sae = config_to_dict(ctx.cfg.sae)
        for key in ("num_threads", "wandb", "wandb_project", "min_explained_variance", "min_ce_recovered", "hooks"):
            sae.pop(key)
        return {"sae": sae, "activations": self.collect_manifest["fingerprint"]}

    def still_complete(self, ctx: StageContext) -> bool:
        """A finished folder whose every hook still matches its ``files.json`` (else the damaged hooks are redone)."""
        return all(hook_problems(ctx.run.paths.saes.hook(h)) is None for h in self.hooks)

    def run(self, ctx: StageContext) -> tuple[dict, dict]:
        """Train (or load) and evaluate this rank's SAEs; the quality table and figures on rank 0. ``ctx.status``
        gets the hooks done of this rank's share after each hook (finished hooks count as done)."""
        cfg, dist, files, loaded = ctx.cfg, ctx.dist, ctx.run.paths.saes, ctx.loaded
        torch.set_num_threads(cfg.sae.num_threads)
        data = ctx.run.collected()
        sequences = {split: eval_sequences(data, loaded.tokenizer, split, cfg.sae.eval_prompts,
                                           cfg.inference.max_prompt_tokens) for split in ("validation", "test")}
        sites = sites_for(cfg, data, loaded)
        prefix = int(self.collect_manifest.get("opening_tokens", 0)) if cfg.sae.exclude_template_prefix else 0
        logger.info("SAE sites: trained on the discovery split, judged on validation, reported on test; leaving out "
                    "%s%s", f"the template's opening ({prefix} tokens)" if prefix else "nothing of the template",
                    " and special tokens" if cfg.sae.exclude_special_tokens else "")
        mine = [h for i, h in enumerate(self.hooks) if i % dist.world == dist.rank]
        if dist.world > 1:
            ctx.status.set(message=f"train-saes progress counts rank 0's share: {len(mine)} of {len(self.hooks)} hooks")
        ctx.status.progress(0, len(mine), "hook")
        trained, skipped = [], []
        # the splice's clean passes, one per split for every hook (a [1, seq, d_vocab] float32 log-softmax per chat:
        # ~0.2 GiB per split of 4 chats of ~100 tokens in the main job)
        clean: dict[str, dict] = {}
        for hook in mine:
            if _hook_done(files.hook(hook)):
                skipped.append(hook)
                logger.info("%s: SAE already trained and evaluated (--force retrains)", hook)
                ctx.status.progress(len(trained) + len(skipped), initial=len(skipped))
                continue
            metrics = self._one(ctx, hook, data, sequences, sites, prefix, clean)
            trained.append(hook)
            ctx.status.progress(len(trained) + len(skipped))
            logger.info("%s: test explained variance %.3f, CE loss recovered (vs mean ablation) %.3f, CE increase "
                        "%.3f nats, L0 %.1f", hook, metrics["explained_variance"],
                        metrics.get("ce_loss_recovered", float("nan")), metrics.get("ce_increase", float("nan")),
                        metrics["l0"])
        dist.barrier()
        quality: list[dict] = []
        if dist.is_main:
            quality = quality_table(files, self.hooks, cfg.sae.min_explained_variance, cfg.sae.min_ce_recovered)
            write_figures(files, quality, cfg.sae.min_explained_variance, cfg.sae.min_ce_recovered)
            ctx.status.progress(len(self.hooks), len(self.hooks), "hook")
        dist.barrier()
        if not dist.is_main:
            quality = json.loads(files.quality_json.read_text())
        return ({"quality": quality, "trained": trained, "skipped": skipped},
                {"hooks": self.hooks, "architecture": cfg.sae.architecture})

    def _one(self, ctx: StageContext, hook: str, data: Collected, sequences: dict, sites: Sites, prefix: int,
             clean: dict[str, dict] | None = None) -> dict:
        """Train (or copy) one hook's SAE under a temporary name, evaluate it, commit it; ``clean``: the splice's
        clean passes shared by the hooks (:func:`_evaluate_one`)."""
        cfg, files = ctx.cfg, ctx.run.paths.saes
        tmp = files.partial(hook)
        shutil.rmtree(tmp, ignore_errors=True)  # an interrupted hook restarts cleanly
        tmp.mkdir(parents=True)
        acts = ctx.run.hook_activations(hook)
        if cfg.sae.source == "path":
            src = Path(cfg.sae.path).expanduser() / hook
            if not SAEFiles.sae_config(src).is_file():
                raise SAEStageError(f"sae.path: no SAE-Lens SAE for {hook} at {src} (expected cfg.json there)")
            shutil.rmtree(tmp)
            shutil.copytree(src, tmp)
            info = {"source": str(src)}
        else:
            info = _train_one(hook, cfg, acts, tmp, ctx.show_progress, sites)
        metrics = {**info, **_evaluate_one(hook, cfg, acts, tmp, ctx.loaded, sequences, sites, prefix, sites.exclude,
                                                     clean)}
        durable.write_json(SAEFiles.metrics(tmp), metrics)
        ledger = SAEFiles.ledger(tmp)
        durable.Ledger(ledger).add(*sorted(p for p in tmp.iterdir() if p.name != ledger.name))
        durable.commit_dir(tmp, files.hook(hook))
        return metrics

    def load(self, ctx: StageContext) -> dict:
        return {"quality": ctx.run.sae_quality(), "trained": [], "skipped": list(self.hooks)}

    def outcome(self, ctx: StageContext, result: StageResult) -> tuple[list[str], StageOutcome]:
        s, sae = result.summary, ctx.cfg.sae
        lines = [f"SAE quality on held-out prompts (bar: explained variance >= {sae.min_explained_variance}, "
                 f"CE loss recovered >= {sae.min_ce_recovered}):", format_quality(s["quality"]),
                 f"SAEs: {result.folder} (trained {len(s['trained'])} here, already done {len(s['skipped'])})"]
        return lines, StageOutcome("skipped" if not s["trained"] else "done",
                                   {"saes": len(s["quality"]), "passing": sum(bool(q["passes"]) for q in s["quality"]),
                                    "trained_here": len(s["trained"]), "already_done_here": len(s["skipped"])})


def quality_table(files: SAEFiles, hooks: Sequence[str], min_ev: float, min_ce: float) -> list[dict]:
    """The per-layer table: test-split metrics, and ``passes`` = the "selective layers" bar on validation."""
    rows = []
    for hook in hooks:
        metrics = json.loads(SAEFiles.metrics(files.hook(hook)).read_text())
        site = parse_hook_name(hook)
        val = metrics.get("validation", {})
        ce = val.get("ce_loss_recovered", float("nan"))
        row = {
            "hook": hook,
            "layer": site.layer if site else -1,
            "hook_type": (site.hook_type or site.point) if site else hook,
            **{k: metrics.get(k) for k in QUALITY_FIELDS if k in metrics},
            "val_explained_variance": val.get("explained_variance"), "val_ce_loss_recovered": ce,
            "passes": bool(val.get("explained_variance", float("nan")) >= min_ev and (ce != ce or ce >= min_ce)),
        }
        rows.append(row)
    durable.write_json(files.quality_json, rows)
    with durable.open_atomic(files.quality_csv, newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(QUALITY_FIELDS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return rows


def format_quality(rows: Sequence[dict]) -> str:
    head = (f"{'hook':<28}{'EV':>7}{'CE rec':>8}{'CE +':>8}{'KL':>8}{'L0':>8}{'dead':>7}{'dense':>7}{'epochs':>8}"
            "  pass (validation)")
    lines = [head, "-" * len(head)]
    for r in rows:
        def f(key, fmt):
            v = r.get(key)
            return format(v, fmt) if isinstance(v, (int, float)) else "-"
        lines.append(f"{r['hook']:<28}{f('explained_variance', '7.3f')}{f('ce_loss_recovered', '8.3f')}"
                     f"{f('ce_increase', '8.3f')}{f('kl_sae', '8.3f')}{f('l0', '8.1f')}{f('dead_fraction', '7.2f')}{f('dense_fraction', '7.2f')}"
                     f"{f('epochs', '8.1f')}  {'yes' if r['passes'] else 'no'}")
    return "\n".join(lines)


