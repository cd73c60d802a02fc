"""Stage 2, train-saes: one SAE per collected hook, evaluated on held-out prompts.

Output folder (``saes/``)::

    manifest.json             fingerprint (SAE config + the activations it was trained on), status
    config.yaml               the resolved config
    <hook name>/              SAE-Lens's own format: cfg.json + sae_weights.safetensors
                              (+ training_log.jsonl, metrics.json, files.json: size and SHA-256 of each)
    quality.json / .csv       the per-layer table: held-out metrics and whether the SAE passes the bar
    figures/*.html            training curves and metrics by layer (plotly, offline)

A hook is finished when its folder exists and its files match ``files.json`` (it is written under a
temporary name, synced and renamed once trained, saved and evaluated: :func:`refusal_lens.durable.commit_dir`);
finished hooks are skipped on rerun, an interrupted or damaged one is trained again from scratch,
``--force`` retrains. With torchrun, hook ``i`` goes to rank ``i % world``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from refusal_lens import durable
from refusal_lens.activations.store import HookActivations
from refusal_lens.chat import encode_prompt
from refusal_lens.collect import MANIFEST, PROMPTS_DIR, Collected, load_collected
from refusal_lens.config import Config, config_to_dict, dump_config
from refusal_lens.distributed import Dist
from refusal_lens.errors import UserError
from refusal_lens.hooks import parse_hook_name, resolve_layer_specs
from refusal_lens.saes.data import activation_batches, distinct_rows, site_rows
from refusal_lens.saes.evaluate import mean_activation, reconstruction_metrics, splice_metrics
from refusal_lens.saes.plots import write_figures
from refusal_lens.saes.train import build_training_sae, check_sae_config, train_sae
from refusal_lens.status import StatusFile

logger = logging.getLogger(__name__)

#: per hook folder: the size and SHA-256 of every other file, written last (see _hook_done).
FILES = "files.json"
QUALITY_FIELDS = ("hook", "layer", "hook_type", "explained_variance", "mse", "l0", "dead_fraction", "dense_fraction",
                  "ce_loss_recovered", "ce_increase", "kl_sae", "kl_mean", "ce_clean", "ce_sae", "ce_mean", "tokens_seen",
                  "epochs", "train_rows", "distinct_train_rows", "val_explained_variance", "val_ce_loss_recovered",
                  "passes")


class SAEStageError(UserError, RuntimeError):
    """Missing activations or SAEs, or a results folder from another config."""


@dataclass
class SAEStageResult:
    folder: Path
    quality: list[dict]
    trained: list[str]
    skipped: list[str]


def _collect_manifest(acts_dir: Path) -> dict:
    path = acts_dir / MANIFEST
    if not path.is_file() or json.loads(path.read_text()).get("status") != "complete":
        raise SAEStageError(f"no finished activations in {acts_dir}: run `refusal-lens collect` with this config first")
    return json.loads(path.read_text())


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


def _fingerprint(cfg: Config, manifest: dict) -> str:
    sae = config_to_dict(cfg.sae)
    for key in ("num_threads", "wandb", "wandb_project", "min_explained_variance", "min_ce_recovered", "hooks"):
        sae.pop(key)
    blob = json.dumps({"sae": sae, "activations": manifest["fingerprint"]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _prepare(out_dir: Path, fp: str, cfg: Config, force: bool, dist: Dist) -> None:
    path = out_dir / MANIFEST
    if force and dist.is_main and out_dir.exists():
        shutil.rmtree(out_dir)
    dist.barrier()
    # every rank checks, so that under torchrun no rank waits at a barrier for one that raised
    if path.is_file() and json.loads(path.read_text()).get("fingerprint") != fp:
        raise SAEStageError(
            f"{out_dir} holds SAEs trained with different sae settings or activations; rerun with --force "
            "to retrain them, or set output.run_name to write elsewhere"
        )
    dist.barrier()
    if dist.is_main and not path.is_file():
        durable.write_json(path, {"fingerprint": fp, "status": "running"})
        durable.write_text(out_dir / "config.yaml", dump_config(cfg))
    dist.barrier()


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


def template_prefix(loaded, acts_dir: Path, max_tokens: int) -> int:
    """Tokens all collected prompts share at the start (for collections made before the manifest kept it)."""
    import datasets

    from refusal_lens.collect import shared_prefix_length

    rows = datasets.load_from_disk(str(acts_dir / PROMPTS_DIR)).select_columns(["prompt"])[:64]["prompt"]
    return shared_prefix_length([encode_prompt(loaded.tokenizer, p, max_tokens).ids for p in rows])


def _hook_done(folder: Path) -> bool:
    """A committed hook folder whose files all match ``files.json``; a damaged one is removed (retrained)."""
    if not folder.is_dir():
        return False
    ledger = durable.Ledger(folder / FILES)
    names = {p.name for p in folder.iterdir()} - {FILES} | set(ledger.records)
    problems = [f"{n}: {why}" for n in sorted(names) if (why := ledger.damaged(folder / n)) is not None]
    if ledger.records and not problems:
        return True
    logger.warning("%s: not trusted (%s): trained again", folder,
                   "no files.json" if not ledger.records else "; ".join(problems))
    shutil.rmtree(folder)
    return False


def _load_sae(folder: Path, device: str):
    from sae_lens import SAE

    return SAE.load_from_disk(str(folder), device=device)


def _train_one(hook: str, cfg: Config, acts: HookActivations, tmp: Path, show_progress: bool, sites: Sites) -> dict:
    train_rows = sites.rows(acts)["discovery"]
    distinct = check_rows(cfg, acts, train_rows, hook)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.sae.seed)
        sae = build_training_sae(cfg.sae, acts.width, hook, cfg.model.name)
    batches = activation_batches(acts, train_rows, cfg.sae.train_batch_size_tokens, balance=cfg.sae.balance,
                                 seed=cfg.sae.seed)
    summary = train_sae(sae, batches, cfg.sae, train_rows=len(train_rows), log_path=tmp / "training_log.jsonl",
                        show_progress=show_progress)
    sae.save_inference_model(str(tmp))
    # SAE-Lens writes cfg.json's keys in an order that varies from process to process: sorted, the
    # same SAE gives the same bytes (and the same sha256 in files.json)
    durable.write_text(tmp / "cfg.json", json.dumps(json.loads((tmp / "cfg.json").read_text()), sort_keys=True))
    return {"tokens_seen": summary.tokens_seen, "epochs": summary.epochs, "steps": summary.steps,
            "train_rows": summary.train_rows, "distinct_train_rows": distinct}


def _evaluate_one(hook: str, cfg: Config, acts: HookActivations, folder: Path, loaded, sequences: dict[str, list],
                  sites: Sites, splice_from: int, special: Sequence[int]) -> dict:
    """Reconstruction and splice metrics on the validation split (the bar) and the test split (reported)."""
    sae = _load_sae(folder, cfg.sae.device)
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
                                          splice_from=splice_from, skip_token_ids=special, mean=mean))
        out[split] = metrics
    return {**out["test"], "validation": out["validation"]}


def run_sae_stage(
    cfg: Config,
    loaded,
    acts_dir: Path,
    out_dir: Path,
    *,
    force: bool = False,
    dist: Dist = Dist(),
    show_progress: bool = True,
    status: StatusFile | None = None,
) -> SAEStageResult:
    """Train (or load) and evaluate one SAE per hook; write the quality table and figures.

    ``status`` gets the hooks done of this rank's share after each hook (finished hooks count as done)."""
    status = status if status is not None else StatusFile(None)
    manifest = _collect_manifest(acts_dir)
    hooks = hooks_to_train(cfg, manifest)
    collected = manifest.get("config", {}).get("inference", {})
    if cfg.sae.source == "train" and collected.get("positions") != "all":
        logger.warning("the activations hold only the %r position of each prompt: SAEs need many more tokens; "
                       "collect with inference.positions: all and store_response_activations: true",
                       collected.get("positions"))
    if cfg.sae.source == "train":
        for hook in hooks:  # bad settings fail before anything is written
            check_sae_config(cfg.sae, int(manifest["widths"][hook]))
    _prepare(out_dir, _fingerprint(cfg, manifest), cfg, force, dist)
    torch.set_num_threads(cfg.sae.num_threads)
    data = load_collected(acts_dir)
    sequences = {split: eval_sequences(data, loaded.tokenizer, split, cfg.sae.eval_prompts,
                                       cfg.inference.max_prompt_tokens) for split in ("validation", "test")}
    sites = sites_for(cfg, data, loaded)
    prefix = int(manifest.get("opening_tokens", 0)) if cfg.sae.exclude_template_prefix else 0
    logger.info("SAE sites: trained on the discovery split, judged on validation, reported on test; leaving out "
                "%s%s", f"the template's opening ({prefix} tokens)" if prefix else "nothing of the template",
                " and special tokens" if cfg.sae.exclude_special_tokens else "")

    trained, skipped = [], []
    n_mine = len(hooks[dist.rank::dist.world])
    if dist.world > 1:
        status.set(message=f"train-saes progress counts rank 0's share: {n_mine} of {len(hooks)} hooks")
    status.progress(0, n_mine, "hook")
    for i, hook in enumerate(hooks):
        if i % dist.world != dist.rank:
            continue
        final = out_dir / hook
        if _hook_done(final):
            skipped.append(hook)
            logger.info("%s: SAE already trained and evaluated (--force retrains)", hook)
            status.progress(len(trained) + len(skipped), initial=len(skipped))
            continue
        tmp = out_dir / f".{hook}.partial"
        shutil.rmtree(tmp, ignore_errors=True)  # an interrupted hook restarts cleanly
        tmp.mkdir(parents=True)
        acts = HookActivations(acts_dir / hook)
        if cfg.sae.source == "path":
            src = Path(cfg.sae.path).expanduser() / hook
            if not (src / "cfg.json").is_file():
                raise SAEStageError(f"sae.path: no SAE-Lens SAE for {hook} at {src} (expected cfg.json there)")
            shutil.rmtree(tmp)
            shutil.copytree(src, tmp)
            info = {"source": str(src)}
        else:
            info = _train_one(hook, cfg, acts, tmp, show_progress, sites)
        metrics = {**info, **_evaluate_one(hook, cfg, acts, tmp, loaded, sequences, sites, prefix, sites.exclude)}
        durable.write_json(tmp / "metrics.json", metrics)
        durable.Ledger(tmp / FILES).add(*sorted(p for p in tmp.iterdir() if p.name != FILES))
        durable.commit_dir(tmp, final)
        trained.append(hook)
        status.progress(len(trained) + len(skipped))
        logger.info("%s: test explained variance %.3f, CE loss recovered (vs mean ablation) %.3f, CE increase %.3f "
                    "nats, L0 %.1f", hook, metrics["explained_variance"], metrics.get("ce_loss_recovered", float("nan")),
                    metrics.get("ce_increase", float("nan")), metrics["l0"])
    dist.barrier()
    quality: list[dict] = []
    if dist.is_main:
        quality = quality_table(out_dir, hooks, cfg.sae.min_explained_variance, cfg.sae.min_ce_recovered)
        write_figures(out_dir, quality, cfg.sae.min_explained_variance, cfg.sae.min_ce_recovered)
        state = json.loads((out_dir / MANIFEST).read_text())
        state.update(status="complete", hooks=hooks, architecture=cfg.sae.architecture)
        durable.write_json(out_dir / MANIFEST, state)  # the commit point of the stage
        status.progress(len(hooks), len(hooks), "hook")
    dist.barrier()
    if not dist.is_main:
        quality = json.loads((out_dir / "quality.json").read_text())
    return SAEStageResult(out_dir, quality, trained, skipped)


def quality_table(out_dir: Path, hooks: Sequence[str], min_ev: float, min_ce: float) -> list[dict]:
    """The per-layer table: test-split metrics, and ``passes`` = the "selective layers" bar on validation."""
    rows = []
    for hook in hooks:
        metrics = json.loads((out_dir / hook / "metrics.json").read_text())
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
    durable.write_json(out_dir / "quality.json", rows)
    with durable.open_atomic(out_dir / "quality.csv", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(QUALITY_FIELDS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return rows


def selected_hooks(saes_dir: Path) -> list[str]:
    """Hooks whose SAE passes the configured bar (for later stages' "selective layers")."""
    return [row["hook"] for row in json.loads((Path(saes_dir) / "quality.json").read_text()) if row["passes"]]


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


