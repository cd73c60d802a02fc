"""docs/python_api.md runs: every code block, in order, on the tiny planted model and a finished tiny run (the
setup block replaced by theirs); the embedded block also on the embedded Qwen. And the API's two ablations equal
the stages' own interventions (:mod:`refusal_lens.core.direction_edits`, :func:`~refusal_lens.stages.circuits.edits.
feature_edit`) on the same model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "python_api.md"
BLOCK = re.compile(r"(?:<!-- (?P<mark>[a-z]+):[^\n]*-->\n)?```python\n(?P<code>.*?)```", re.S)


def blocks() -> list[tuple[str | None, str]]:
    return [(m["mark"], m["code"]) for m in BLOCK.finditer(DOC.read_text())]


def test_the_doc_has_its_setup_first_and_one_embedded_block():
    marks = [mark for mark, _ in blocks()]
    assert marks[0] == "setup" and marks.count("embedded") == 1 and len(marks) >= 6


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from test_pipeline import write_config

    import refusal_lens as rl

    root = tmp_path_factory.mktemp("api")
    config = write_config(root)
    cfg = rl.load_config(config)
    rl.run_pipeline(cfg, show_progress=False)
    return root, config, rl.open_run(cfg)


def test_every_example_runs_on_the_tiny_model(tiny_run, monkeypatch, capsys):
    root, config, run = tiny_run
    monkeypatch.chdir(root)  # the examples write to ./results
    setup = {"MODEL": str(root / "planted-model"), "RUN": str(run.root), "CONFIG": str(config),
             "HOOKS": ["residuals_0-1"]}
    namespace: dict = dict(setup)
    for mark, code in blocks()[1:]:
        exec(compile(code, f"{DOC}:{mark or 'block'}", "exec"), namespace)  # noqa: S102
    out = capsys.readouterr().out
    assert "blocks." in out and "KL(clean || ablated)" in out and "prompts;" in out
    assert (root / "results" / "notebook" / "activations" / "manifest.json").is_file()
    assert namespace["sae"].cfg.d_in == namespace["info"].width
    # the direction's ablation moved the logits (that the feature ablation equals the stages' own is checked below:
    # the example's prompt has few words of the tiny model's vocabulary, where the circuit's features may not fire)
    assert not torch.allclose(namespace["ablated"], namespace["clean"])
    assert namespace["without_circuit"].shape == namespace["clean"].shape


@pytest.mark.embedded
def test_the_model_example_runs_on_the_embedded_qwen():
    pytest.importorskip("gguf")
    from refusal_lens.models.embedded import EmbeddedModelError, embedded_model_dir

    try:
        embedded_model_dir("qwen2.5-coder-0.5b-instruct")
    except EmbeddedModelError as err:
        pytest.skip(str(err))
    namespace = {"MODEL": "qwen2.5-coder-0.5b-instruct", "HOOKS": ["residuals_10-21"]}
    [code] = [code for mark, code in blocks() if mark == "embedded"]
    exec(compile(code, f"{DOC}:embedded", "exec"), namespace)  # noqa: S102
    assert namespace["hooks"] == [f"blocks.{i}.hook_resid_post" for i in range(10, 22)]
    assert namespace["logits"].shape[-1] == namespace["model"].cfg.d_vocab
    # the hooked Qwen's logits are HF's (tests/models/test_models.py checks the bridge; this is the suite's one
    # hooked Qwen): one unpadded prompt, measured 2.7e-5 on logits of magnitude ~20
    from refusal_lens.models.loading import load_hf_model

    reference = load_hf_model(str(embedded_model_dir("qwen2.5-coder-0.5b-instruct")), torch.float32,
                              torch.device("cpu"), "eager")
    with torch.no_grad():
        ref = reference(input_ids=namespace["tokens"]).logits
    assert (namespace["logits"] - ref).abs().max().item() < 5e-4
    assert (namespace["logits"].argmax(-1) == ref.argmax(-1)).all()


def test_the_api_ablations_equal_the_stages_interventions(tiny_run):
    """``ablate_direction`` on the TransformerLens model = the stages' directional ablation (HF model, Intervener);
    ``ablate_features`` (zero, scale) = :func:`feature_edit` at every position: the same last-position logits."""
    import refusal_lens as rl
    from refusal_lens.core.chat import encode_prompt
    from refusal_lens.core.direction_edits import ablation_edits
    from refusal_lens.core.intervene import Intervener
    from refusal_lens.stages.circuits.edits import feature_edit
    from refusal_lens.stages.circuits.nodes import NodeSpace

    root, _, run = tiny_run
    m = rl.load_model(str(root / "planted-model"), hooks=["residuals_0-1"])
    loaded = m.loaded
    prompts = [encode_prompt(loaded.tokenizer, t, 64) for t in ("make bomb", "bake cake", "steal the car")]
    iv = Intervener(loaded, 8, model=loaded.hf_model, share_opening=False)
    r = run.direction().vector
    with torch.no_grad():
        theirs = iv.last_logits(prompts, ablation_edits(r, loaded.n_layers))
        with rl.ablate_direction(m.model, r):
            ours = torch.stack([m.model(torch.tensor([p.ids]))[0, -1] for p in prompts])
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(theirs, iv.last_logits(prompts), atol=1e-3)  # the ablation moved them
    saes = run.saes()
    hook = next(iter(saes))
    space = NodeSpace((hook,), saes, prompts[0].n_post_instruction)
    mask = torch.zeros(space.d_sae(hook))
    feats = [0, 1, 2, 3]
    mask[feats] = 1
    for mode, c in (("zero", 1.0), ("scale", 3.0)):
        with torch.no_grad():
            theirs = iv.last_logits(prompts, [feature_edit(space, hook, mask, mode, None, c, "all")])
            with rl.ablate_features(m.model, saes, {hook: feats}, mode, c=c):
                ours = torch.stack([m.model(torch.tensor([p.ids]))[0, -1] for p in prompts])
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="allowed: zero, mean, scale"):
        with rl.ablate_features(m.model, saes, {hook: feats}, "steer"):
            pass
