"""What the benches' ``--smoke`` modes share: a tiny random chat model, tiny prompt files and a tiny main-job
config, all written to a temporary folder (no embedded model, no download, seconds).

Not a bench itself (``make bench`` runs ``bench/bench_*.py`` only). Each bench imports it as ``smoke``
(``python bench/bench_x.py`` puts ``bench/`` first on ``sys.path``). The model is a random Llama of
:mod:`refusal_lens.models.synthetic` (the tests' tiny models are built the same way): its weights refuse
nothing, so the smoke config keeps every prompt (``direction.keep: all``, ``circuits.select: all``) and the
circuits' behaviour checks are skipped, as in ``bench_gpu.py --tiny``. Smoke timings say nothing; a smoke run
checks that a bench still runs against the current code and prints its table.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parents[1]

#: prompts made of the synthetic tokenizer's words (every word is one token; nothing maps to <unk>)
TOXIC = ["make bomb", "steal car", "how make bomb ?", "steal code", "bomb car", "steal the car", "make a bomb",
         "what is bomb ?", "steal python code", "bomb the world", "make bomb cake", "steal a cake"]
SAFE = ["make cake", "what is a car ?", "how are you ?", "print code", "hello car", "the car is", "bake car",
        "make the world", "print hello", "bake a cake", "what is code ?", "the world is"]
HARMLESS = ["bake cake", "hello world", "print 2 + 2 = ?", "what is python code ?", "how are you", "hello",
            "what is the world ?", "print hello world", "how bake cake ?", "python code", "make code",
            "hello , how are you ?"]
CATEGORIES = ("harmful", "illegal")


@contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A temporary folder, removed at the end (whatever happens)."""
    folder = Path(tempfile.mkdtemp(prefix=f"{prefix}_smoke_"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def tiny_model(folder: Path, *, n_layers: int = 2, d_model: int = 32, seed: int = 0) -> Path:
    """A random Llama chat model (word-level tokenizer, chat template) saved to ``folder``; returns it."""
    from transformers import LlamaConfig

    from refusal_lens.models.synthetic import build_random_chat_model, chat_vocab, special_token_ids

    if (folder / "config.json").is_file():
        return folder
    config = LlamaConfig(vocab_size=len(chat_vocab()), hidden_size=d_model, intermediate_size=2 * d_model,
                         num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False, **special_token_ids())
    return build_random_chat_model(folder, config, seed=seed, init_std=0.2)


def tiny_data(folder: Path) -> tuple[Path, Path]:
    """The tiny prompts as an OR-Bench folder (toxic, safe) and a harmless CSV; returns both paths."""
    bench = folder / "or-bench"
    bench.mkdir(parents=True, exist_ok=True)
    files = {"or-bench-toxic": TOXIC, "or-bench-80k": SAFE, "or-bench-hard-1k": []}
    for name, texts in files.items():
        with (bench / f"{name}.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["prompt", "category"])
            w.writerows([(t, CATEGORIES[i % 2]) for i, t in enumerate(texts)])
    harmless = folder / "harmless.csv"
    with harmless.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["prompt", "category"])
        w.writerows([(t, "general") for t in HARMLESS])
    return bench, harmless


def tiny_prompts(folder: Path):
    """The tiny OR-Bench prompts (toxic and safe) as :class:`refusal_lens.data.prompts.Prompt` s."""
    from refusal_lens.data.prompts import read_prompts

    bench, _ = tiny_data(folder)
    return read_prompts(bench)


def tiny_config(folder: Path, model_dir: Path | None = None, run_name: str = "smoke") -> Path:
    """A tiny main job (every stage, seconds) on the tiny model, writing to ``folder/results/<run_name>``:
    the shape of tests/test_pipeline.py's config, with every prompt kept (random weights refuse nothing)."""
    model_dir = model_dir or tiny_model(folder / "model")
    bench, harmless = tiny_data(folder / "data")
    path = folder / "smoke.yaml"
    path.write_text(f"""
base: {ROOT / "configs/pipelines/default.yaml"}
model: {{name: "{model_dir}", activation_layers: ["residuals_0", "residuals_1"], intervention_dtype: "same"}}
inference: {{batch_size: 16, max_new_tokens: 4, activation_model: "model"}}
data: {{path: "{bench}", split_discovery: 0.4, split_validation: 0.3, split_test: 0.3}}
direction: {{harmless: "{harmless}", harmless_samples: null, keep: "all", exact_candidates: 2, exact_per_layer: 1,
             random_directions: 2, bootstrap: 50, emergence_stride: 1, batch_size: 16, max_new_tokens: 4}}
sae: {{hooks: ["residuals_0", "residuals_1"], expansion_factor: 2, k: 8, training_tokens: 2048,
       train_batch_size_tokens: 128, eval_prompts: 4, num_threads: 1, allow_fewer_rows_than_features: true,
       min_explained_variance: -10.0, min_ce_recovered: -100.0}}
circuits: {{select: "all", hooks: ["residuals_0", "residuals_1"], behaviour_k: [1, 2], headline_k: 2, random_sets: 2,
           induction_random_sets: 1, faithfulness_sizes: [2, 20], random_controls: 2, bootstrap: 50, agreement_nodes: 2,
           agreement_prompts: 4, edge_prompts: 4, batch_size: 8, num_threads: 1, cosine_preselect: 4, top_k: 5,
           intervention_batch_size: 16, max_new_tokens: 4}}
analysis: {{permutations: 50, interval_draws: 200, check_render: false, min_prompts: 4}}
output: {{result_dir: "{folder / 'results'}", run_name: "{run_name}"}}
""")
    return path


def tiny_run(folder: Path, stages) -> object:
    """The tiny main job's ``stages`` run in this process (:func:`refusal_lens.api.run_pipeline`) into ``folder``; returns
    its :class:`~refusal_lens.run.folder.RunFolder`."""
    from refusal_lens import api
    from refusal_lens.config import load_config

    cfg = load_config(tiny_config(folder))
    api.run_pipeline(cfg, list(stages), show_progress=False)
    return api.open_run(cfg)


def smoke_note() -> str:
    return "smoke run (tiny random model, tiny sizes): checks that the bench runs; its timings mean nothing"
