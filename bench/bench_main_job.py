"""Wall time of the main job (`refusal-lens run` on the default config), stage by stage, against its budget.

Runs the README's main job from an empty results folder in a subprocess (the embedded model's
safetensors cache in ~/.cache/refusal_lens is reused when present; a first run on a new machine adds its
one-off GGUF conversion, ~50 s for Qwen), reads each stage's elapsed time from the run's live status file,
and prints every stage's time and share of the budget (15 min on the 2-core CPU machine) and the total as a
ratio of the budget. Also prints the share of the total that goes to model forward/backward work in the
discover stage (from its summary) so the cost of each part is visible.

Then **the profile**: every stage's parts (the spans between its status messages) with their seconds and the
token positions they pushed through the model (``status.json``, counted by
:class:`refusal_lens.infra.token_meter.TokenMeter`: forward, forward + backward, and decode steps), and each
part's seconds divided by the time its passes take at *the floor*: the throughput this machine reaches on one
large batched forward of each model the run uses, measured here after the run (a forward + backward counted as
3 forwards, a decode step as one position). Parts far above the floor are the ones to optimise. Beside them, the
process's resident memory at the end of each part and its peak so far
(:mod:`refusal_lens.infra.resident_memory`): the part where the peak rises is where memory peaks.

With ``--record NAME`` the run's analysis summary and this timing are copied into ``docs/results/NAME.json``
and the README's results section is rewritten from them (``refusal_lens.readme_results``): the README's
numbers always come from such a run.

Results are read through :class:`refusal_lens.run.folder.RunFolder` (status file, discover summary, report).

``--smoke``: the same subprocess on a tiny main job (bench/smoke.py: a random 2-layer model, 24 + 12 tiny
prompts, every stage cut down; seconds), in a temporary folder removed at the end; ``--record`` is refused
there (a smoke run's numbers are not the main job's).

Usage: .venv/bin/python bench/bench_main_job.py [--config configs/pipelines/default.yaml]
       [--results results/bench-main-job] [--budget-min 15] [--record main_job] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def head_commit() -> str:
    """``git rev-parse --short HEAD`` of the checkout, ``+changes`` when tracked files differ from it."""
    git = ["git", "-C", str(ROOT)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True).stdout.strip())
    return commit + ("+changes" if dirty else "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/pipelines/default.yaml"))
    parser.add_argument("--results", default=str(ROOT / "results/bench-main-job"),
                        help="results folder for this run (emptied first)")
    parser.add_argument("--budget-min", type=float, default=15.0)
    parser.add_argument("--record", metavar="NAME", help="save the results for the README as docs/results/NAME.json")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny main job in a temporary folder (seconds; checks the bench, measures nothing)")
    args = parser.parse_args(argv)
    if args.smoke and args.record:
        parser.error("--record is refused with --smoke: the README's numbers come from the real main job only")
    if args.record and head_commit().endswith("+changes"):
        parser.error("--record is refused from a tree with uncommitted changes to tracked files: the README's "
                     "numbers must name the commit they come from; commit first")
    if not args.smoke:
        return measure(args, Path(args.config), Path(args.results))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import smoke

    with smoke.scratch("bench_main_job") as folder:
        print(smoke.smoke_note())
        return measure(args, smoke.tiny_config(folder), folder / "results")


def measure(args, config: Path, results: Path) -> int:
    from refusal_lens.run.folder import RunFolder

    shutil.rmtree(results, ignore_errors=True)
    run = RunFolder(results / "main")  # output.run_name=main below
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "refusal_lens", "run", "--config", str(config),
           "--set", f"output.result_dir={results}", "--set", f"output.run_name={run.name}"]
    started_at = head_commit()  # the code the stages run is the code at the start
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        return proc.returncode
    status = json.loads(run.status_file.read_text())
    budget = args.budget_min * 60
    print(f"main job: {config}")
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs ({cpu_model()})"
    print(f"machine: {machine}, {platform.platform()}; torch threads per config")
    print(f"{'stage':<12}{'seconds':>10}{'share of budget':>18}")
    for stage in status["stages"]:
        print(f"{stage['name']:<12}{stage['elapsed_s']:>10.1f}{stage['elapsed_s'] / budget:>18.2f}")
    print(f"{'total':<12}{wall:>10.1f}{wall / budget:>18.2f}   (wall time of the command, model loading included)")
    print(f"budget {args.budget_min:.0f} min: {'within' if wall <= budget else 'OVER'} "
          f"({wall / 60:.1f} min = {wall / budget:.2f}x the budget)")
    discover = next((s for s in status["stages"] if s["name"] == "discover"), None)
    attribution = run.circuits_summary().get("attribution_seconds") if run.complete("circuits") else None
    if discover and attribution is not None and discover["elapsed_s"]:
        print(f"discover: attribution (model forward/backward passes) {attribution:.1f} s = "
              f"{attribution / discover['elapsed_s']:.2f} of the stage, {attribution / wall:.2f} of the total")
    print(f"report: {run.report} ({'exists' if run.report.is_file() else 'missing'})")
    print(f"generation and interventions ran in {intervention_dtype(run)} (model.intervention_dtype as run)")
    rows = profile_rows(status, floor_throughput(config, smoke=args.smoke))
    print()
    print(profile_table(rows))
    if args.record:
        from refusal_lens import readme_results

        timing = {"date": time.strftime("%Y-%m-%d"), "total_s": wall, "config": os.path.relpath(config.resolve(), ROOT),
                  "commit": started_at,
                  "machine": f"{machine}, no GPU", "intervention_dtype": intervention_dtype(run),
                  "stages": {stage["name"]: stage["elapsed_s"] for stage in status["stages"]}, "profile": rows}
        if (ended_at := head_commit()) != started_at:
            timing["head_at_end"] = ended_at  # commits landed while it ran: said, not hidden
        out = readme_results.save(run.paths.analysis.summary, args.record, timing)
        readme_results.update()
        print(f"recorded {out}; README results rewritten")
    return 0


def intervention_dtype(run) -> str:
    """The dtype the run's interventions ran in, from the config its last stage saved (``auto`` made concrete)."""
    import yaml

    from refusal_lens.models.intervention_dtype import saved_dtype

    return saved_dtype(yaml.safe_load(run.paths.circuits.config.read_text())["model"])


def cpu_model() -> str:
    """The CPU's model name and the matrix extensions that set its bf16 throughput (machines of the same name
    differ by 2-3.6x in the floor: bench/README.md), from /proc/cpuinfo (:func:`refusal_lens.models.intervention_dtype.cpu_info`)."""
    from refusal_lens.models.intervention_dtype import cpu_info

    name, flags = cpu_info()
    extensions = [f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"{name}; {' '.join(extensions) or 'no bf16 extensions'}"


# ------------------------------------------------------------------------------------------- profile

#: a forward + backward pass costs about three forwards (the backward computes two products per forward one)
AUTOGRAD_FORWARDS = 3.0


def floor_throughput(config: Path, smoke: bool = False) -> dict[str, float]:
    """Positions per second of one large batched forward (16 prompts x 128 tokens; 4 x 16 in a smoke run), per
    ``"<role> <dtype>"`` model of the run: the HF model, its intervention copy, the TransformerLens model."""
    import torch

    from refusal_lens.config import load_config
    from refusal_lens.models.loading import load_model

    cfg = load_config(config)
    torch.set_num_threads(cfg.circuits.num_threads or torch.get_num_threads())
    loaded = load_model(cfg.model)
    b, t = (4, 16) if smoke else (16, 128)
    ids = torch.randint(10, min(len(loaded.tokenizer), 5000), (b, t), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    dtype = lambda m: str(next(m.parameters()).dtype).removeprefix("torch.")  # noqa: E731
    passes = {f"hf {dtype(loaded.hf_model)}": lambda: loaded.hf_model(input_ids=ids, attention_mask=mask),
              f"hf {dtype(loaded.gen_model)}": lambda: loaded.gen_model(input_ids=ids, attention_mask=mask),
              f"tl {dtype(loaded.model)}": lambda: loaded.model.run_with_hooks(ids, attention_mask=mask, fwd_hooks=[])}
    out = {}
    with torch.no_grad():
        for label, run in passes.items():
            run()  # warm-up: first-call allocations and kernel choices
            t0 = time.perf_counter()
            run()
            out[label] = b * t / (time.perf_counter() - t0)
    return out


def profile_rows(status: dict, floor: dict[str, float]) -> list[dict]:
    """Per stage and part: seconds, positions by kind, and the seconds its passes take at the floor's throughput."""
    rows = []
    for stage in status["stages"]:
        for part in stage.get("parts", []):
            positions = part.get("positions", {})
            kinds = {"forward": 0, "autograd": 0, "decode": 0}
            floor_s = 0.0
            for key, n in positions.items():
                label, kind = key.rsplit(" ", 1)
                kinds[kind] += n
                floor_s += n * (AUTOGRAD_FORWARDS if kind == "autograd" else 1.0) / floor[label]
            name = part["part"].split(": ", 1)[-1] or ("whole stage" if len(stage["parts"]) == 1 else "set-up")
            rows.append({"stage": stage["name"], "part": name, "seconds": part["seconds"], **kinds,
                         "floor_s": floor_s, "x_floor": part["seconds"] / floor_s if floor_s else None,
                         "rss_mb": part.get("rss_mb"), "peak_rss_mb": part.get("peak_rss_mb"),
                         "part_peak_rss_mb": part.get("part_peak_rss_mb")})
    return rows


def profile_table(rows: list[dict]) -> str:
    lines = ["| stage | part | seconds | forward positions | autograd positions | decode positions | floor s | x floor "
             "| RSS at end GiB | peak RSS so far GiB | peak RSS in part GiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    gb = lambda mb: f"{mb / 1024:.2f}" if mb is not None else "-"  # noqa: E731  (MiB -> GiB)
    for r in rows:
        ratio = f"{r['x_floor']:.1f}" if r["x_floor"] is not None else "no model passes"
        lines.append(f"| {r['stage']} | {r['part']} | {r['seconds']:.1f} | {r['forward']:,} | {r['autograd']:,} | "
                     f"{r['decode']:,} | {r['floor_s']:.1f} | {ratio} | {gb(r.get('rss_mb'))} | "
                     f"{gb(r.get('peak_rss_mb'))} | {gb(r.get('part_peak_rss_mb'))} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
