"""SAE training throughput, as ratios against baselines measured in the same run.

1. From disk (the stage's memory-mapped Arrow batches) versus the same SAE-Lens trainer fed from an
   in-memory tensor of the same rows. Target: <= 1.10x time (data loading is not the bottleneck).
2. Versus SAE-Lens's own ``LanguageModelSAETrainingRunner`` on the same hook and architecture, which
   runs the language model for its activations (chat-formatted sample prompts as its token dataset).

The training rows are the train-saes stage's own: the discovery split's sites of one hook
(:func:`refusal_lens.stages.saes.stage.sites_for`), read through :class:`refusal_lens.run.folder.RunFolder`.

Needs a finished collect stage with ``positions: all`` (e.g. after `make run`):
    .venv/bin/python bench/bench_sae_training.py --run results/default --hook blocks.12.hook_resid_post

``--smoke``: a tiny run (bench/smoke.py: random 2-layer model, collect only, seconds) in a temporary folder,
its first hook, 4 steps x 64 tokens, 1 repeat, the LM runner on the tiny model.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from refusal_lens.activations.store import HookActivations  # noqa: E402
from refusal_lens.config import SAEConfig  # noqa: E402
from refusal_lens.run.folder import RunFolder  # noqa: E402
from refusal_lens.stages.saes.data import activation_batches, tensor_batches  # noqa: E402
from refusal_lens.stages.saes.stage import sites_for  # noqa: E402
from refusal_lens.stages.saes.train import build_training_sae, train_sae  # noqa: E402


def run_training(cfg: SAEConfig, acts: HookActivations, batches, rows: int) -> float:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        sae = build_training_sae(cfg, acts.width, acts.hook, "bench")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        train_sae(sae, batches, cfg, train_rows=rows, log_path=Path(tmp) / "log.jsonl", show_progress=False)
        return time.perf_counter() - t0


def lm_runner_seconds(args, cfg: SAEConfig, acts: HookActivations, tokens: int, len_train: int, prompts) -> float:
    """SAE-Lens's runner: model forward passes for activations + the same trainer (norm estimated on as
    many batches as the stage uses)."""
    import datasets
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig

    from refusal_lens.core.chat import encode_prompt
    from refusal_lens.config import ModelConfig
    from refusal_lens.models.loading import load_model

    loaded = load_model(ModelConfig(name=args.model, backend="hooked", activation_layers=(acts.hook,)))
    ids = [i for p in prompts for i in encode_prompt(loaded.tokenizer, p.prompt, 256).ids]
    ctx = 64
    rows = [ids[i : i + ctx] for i in range(0, len(ids) - ctx, ctx)]
    dataset = datasets.Dataset.from_dict({"input_ids": rows})
    runner_cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=acts.width, d_sae=acts.width * cfg.expansion_factor, k=cfg.k,
                                  normalize_activations=cfg.normalize_activations),
        model_name=args.model, hook_name=acts.hook, dataset_path="", is_dataset_tokenized=True,
        context_size=ctx, prepend_bos=False, training_tokens=tokens, train_batch_size_tokens=cfg.train_batch_size_tokens,
        n_batches_in_buffer=16, store_batch_size_prompts=8, n_batches_for_norm_estimate=max(1, len_train // cfg.train_batch_size_tokens), lr=cfg.lr, device="cpu", act_store_device="cpu",
        logger=LoggingConfig(log_to_wandb=False), output_path=None, save_final_checkpoint=False, n_checkpoints=0,
    )
    runner = LanguageModelSAETrainingRunner(runner_cfg, override_dataset=dataset, override_model=loaded.model)
    t0 = time.perf_counter()
    runner.run()
    return time.perf_counter() - t0


def train_rows_of(run: RunFolder, acts: HookActivations) -> np.ndarray:
    """The train-saes stage's training rows of ``acts``: the discovery split's sites."""
    from types import SimpleNamespace

    from refusal_lens.models.loading import load_tokenizer, resolve_source

    cfg = run.config()
    # sites_for reads the tokenizer only for sae.exclude_special_tokens
    loaded = SimpleNamespace(tokenizer=load_tokenizer(resolve_source(cfg.model.name))) \
        if cfg.sae.exclude_special_tokens else None
    return sites_for(cfg, run.collected(), loaded).rows(acts)["discovery"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="results/default", help="a run folder with a finished collect stage")
    ap.add_argument("--hook", default="blocks.12.hook_resid_post")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-lm-runner", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="a tiny run in a temporary folder (checks the bench)")
    args = ap.parse_args(argv)
    if not args.smoke:
        from refusal_lens.data.prompts import read_prompts

        bench(args, RunFolder(args.run), read_prompts(None))
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import smoke

    print(smoke.smoke_note())
    args.steps, args.batch_tokens, args.repeats = 4, 64, 1
    with smoke.scratch("bench_sae_training") as folder:
        run = smoke.tiny_run(folder, ["collect"])
        args.hook, args.model = run.collected().manifest["hooks"][0], run.config().model.name
        bench(args, run, smoke.tiny_prompts(folder / "data") * 4)
    return 0


def bench(args, run: RunFolder, lm_prompts) -> None:
    torch.set_num_threads(args.threads)
    acts = run.hook_activations(args.hook)
    train_rows = train_rows_of(run, acts)
    bt = args.batch_tokens
    cfg = SAEConfig(expansion_factor=4, k=32, train_batch_size_tokens=bt, training_tokens=bt * args.steps,
                    normalize_activations="expected_average_only_in", balance="none")
    if len(train_rows) < bt:
        raise SystemExit(f"{acts.folder}: {len(train_rows)} training rows, fewer than a batch of {bt} (--batch-tokens)")
    in_memory = acts.take(np.sort(train_rows))
    variants = {
        "in-memory tensor (baseline)": lambda: run_training(cfg, acts, tensor_batches(in_memory, bt), len(train_rows)),
        "from disk (Arrow, memory-mapped)": lambda: run_training(cfg, acts, activation_batches(acts, train_rows, bt),
                                                                len(train_rows)),
        "from disk, balanced by label": lambda: run_training(cfg, acts, activation_batches(
            acts, train_rows, bt, balance="labels"), len(train_rows)),
    }
    times = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            times[name].append(fn())
    base = statistics.median(times["in-memory tensor (baseline)"])
    tokens = cfg.training_tokens
    print(f"\n## SAE training ({acts.hook}, d_in {acts.width}, d_sae {acts.width * 4}, TopK k=32, "
          f"{args.steps} steps x {bt} tokens, {len(train_rows)} training rows, {args.threads} thread(s), "
          f"median of {args.repeats})")
    print("| variant | s | tokens/s | x baseline |\n|---|---|---|---|")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"| {name} | {t:.2f} | {tokens / t:.0f} | {t / base:.2f} |")
    if not args.skip_lm_runner:
        try:
            t = lm_runner_seconds(args, cfg, acts, tokens, len(train_rows), lm_prompts)
            print(f"| SAE-Lens LanguageModelSAETrainingRunner (runs the model) | {t:.2f} | {tokens / t:.0f} | "
                  f"{t / base:.2f} |")
        except Exception as err:  # report, do not hide: the comparison is informative, not a gate
            print(f"| SAE-Lens LanguageModelSAETrainingRunner | failed: {type(err).__name__}: {str(err)[:200]} | | |")


if __name__ == "__main__":
    raise SystemExit(main())
