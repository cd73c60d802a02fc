"""The package's layers (docs/architecture.md): no module imports one of a higher layer, at module level or inside a
function; stage modules do not import each other except the analysis's figures; no module is over 400 lines."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "refusal_lens"

#: (layer, module prefixes) from the bottom up; the longest matching prefix decides a module's layer
LAYERS: list[tuple[int, tuple[str, ...]]] = [
    (0, ("refusal_lens.errors", "refusal_lens.infra", "refusal_lens.infra.durable", "refusal_lens.infra.lock", "refusal_lens.infra.status",
         "refusal_lens.infra.distributed")),
    (1, ("refusal_lens.core", "refusal_lens.report")),
    (2, ("refusal_lens.config", *(f"refusal_lens.stages.{s}.config" for s in
                                   ("collect", "direction", "saes", "circuits", "analysis")))),
    (3, ("refusal_lens.models", "refusal_lens.data", "refusal_lens.activations", "refusal_lens.infra.storage_estimate",
         "refusal_lens.infra.memory_plan")),
    (4, ("refusal_lens.run",)),
    (5, ("refusal_lens.stages",)),
    (6, ("refusal_lens.pipeline", "refusal_lens.api", "refusal_lens.checks", "refusal_lens.readme_results",
         "refusal_lens.cli", "refusal_lens.__main__", "refusal_lens.__init__")),
]
#: stage modules that may read another stage's modules: the report draws every stage's figures
CROSS_STAGE = {"refusal_lens.stages.analysis.figures": {"refusal_lens.stages.circuits.plots",
                                                         "refusal_lens.stages.direction.figures"}}


def layer_of(module: str) -> int:
    best = None
    for layer, prefixes in LAYERS:
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > len(best[1])):
                best = (layer, p)
    if best is None:
        raise AssertionError(f"{module} is in no layer of tests/test_architecture.py (add it, and to the docs)")
    return best[0]


def module_name(path: Path) -> str:
    """``refusal_lens/core/judge.py`` -> ``refusal_lens.core.judge``; a subpackage's ``__init__.py`` is the
    subpackage; the package's own is ``refusal_lens.__init__`` (so that no prefix matches every module)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 2:
        parts = parts[:-1]
    return ".".join(parts)


def imported(tree: ast.AST) -> set[str]:
    """Every refusal_lens module a file imports (``from a.b import c`` counts ``a.b.c`` when that is a module)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("refusal_lens")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("refusal_lens"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if importlib.util.find_spec(node.module) and _is_module(sub) else node.module)
    return out


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_is_in_a_layer():
    for path in MODULES:
        layer_of(module_name(path))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_import_runs_from_a_lower_layer_to_a_higher_one(path):
    me = module_name(path)
    mine = layer_of(me)
    bad = [(m, layer_of(m)) for m in imported(ast.parse(path.read_text())) if layer_of(m) > mine]
    assert not bad, f"{me} (layer {mine}) imports higher layers: {bad}"


@pytest.mark.parametrize("path", [p for p in MODULES if ".stages." in module_name(p) + "."
                                  and not module_name(p).endswith(".config")], ids=lambda p: p.stem)
def test_a_stage_reads_other_stages_only_through_the_run_folder(path):
    me = module_name(path)
    if me.count(".") < 3:
        return
    stage = me.split(".")[2]
    other = {m for m in imported(ast.parse(path.read_text()))
             if m.startswith("refusal_lens.stages.") and m.count(".") >= 3 and m.split(".")[2] != stage
             and not m.endswith(".config")}
    assert other <= CROSS_STAGE.get(me, set()), f"{me} imports other stages' modules: {sorted(other)}"


def test_the_checker_sees_a_violation(tmp_path):
    """The check above can fail: a core module importing a stage is caught."""
    tree = ast.parse("def f():\n    from refusal_lens.stages.direction.select import choose\n")
    assert {layer_of(m) for m in imported(tree)} == {5} and layer_of("refusal_lens.core.judge") == 1


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in MODULES if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


#: the functions allowed over 60 lines (at most 3), and why: SAE-Lens's trainer set-up is one long call with every
#: option spelled out; the splice metrics compute every SAE quality figure in one pass over the same batches; the
#: behaviour plan lists every condition of the headline's table in the order the table reads
LONG_FUNCTIONS = {("stages/saes/train.py", "train_sae"), ("stages/saes/evaluate.py", "splice_metrics"),
                  ("stages/circuits/behaviour.py", "behaviour")}


def test_at_most_three_functions_are_over_60_lines_and_they_are_the_named_ones():
    long = {(str(p.relative_to(PACKAGE)), n.name) for p in MODULES for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60}
    assert len(LONG_FUNCTIONS) <= 3 and long <= LONG_FUNCTIONS, sorted(long - LONG_FUNCTIONS)


#: tests at the top of tests/ are about the package as a whole (its layers, pipeline, API, CLI kill/resume, README)
TOP_LEVEL_TESTS = {"test_architecture", "test_pipeline", "test_python_api", "test_kills", "test_readme_results"}


def test_the_test_tree_mirrors_the_package_tree():
    """tests/<area>/test_x.py tests refusal_lens/<area>/ (tests/bench/ the benches); tests at the top are listed."""
    misplaced = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        rel = path.relative_to(ROOT / "tests")
        if len(rel.parts) == 1:
            if path.stem not in TOP_LEVEL_TESTS:
                misplaced.append(str(rel))
        elif rel.parts[0] == "bench":
            if not (ROOT / "bench").is_dir():
                misplaced.append(str(rel))
        elif not (PACKAGE / Path(*rel.parts[:-1])).is_dir():
            misplaced.append(str(rel))
    assert not misplaced, f"tests with no matching package folder (or not listed as top-level): {misplaced}"


def test_the_docs_stage_table_is_the_pipeline_table():
    from refusal_lens.pipeline import stage_table

    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text.split("<!-- stage-table -->\n", 1)[1].split("<!-- /stage-table -->", 1)[0]
    assert table.strip() == stage_table().strip()
