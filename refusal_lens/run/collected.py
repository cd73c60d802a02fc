"""The collect stage's files as every later stage reads them: the prompts table, the judged responses, the split.

* ``activations/prompts/`` — an HF ``datasets`` folder, one row per prompt (:func:`prompt_features`): the
  prompt, its label and category, the greedy response and its judgement, the split, the refusal score;
* ``activations/responses/rank-RRR-NNNNN.json`` — pass 1's commits: the judged responses (with their token
  ids) of one batch of one rank (:class:`ResponseLog`);
* ``activations/manifest.json`` — once complete: hooks, widths, the refusal tokens, the template's opening.

:func:`load_collected` (or :meth:`refusal_lens.run.folder.RunFolder.collected`) gives a :class:`Collected`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from refusal_lens.core.chat import EncodedPrompt, encode_prompt
from refusal_lens.core.refusal import RefusalTokens
from refusal_lens.errors import UserError
from refusal_lens.infra import durable
from refusal_lens.run.folder import ActivationFiles


def prompt_features():
    """The schema of the prompts table (``activations/prompts``)."""
    from datasets import Features, Value

    return Features(
        {
            "prompt_id": Value("string"),
            "prompt": Value("string"),
            "category": Value("string"),
            "label": Value("string"),
            "source": Value("string"),
            "response": Value("string"),
            "outcome": Value("string"),
            "judge_rule": Value("string"),
            "refused": Value("bool"),
            "split": Value("string"),
            "refusal_score": Value("float32"),
            "n_prompt_tokens": Value("int32"),
            "n_response_tokens": Value("int32"),
            "truncated": Value("bool"),
            "n_opening_tokens": Value("int32"),
            "n_post_instruction_tokens": Value("int32"),
        }
    )


@dataclass
class Judged:
    """The response of one prompt and its judgement (pass 1)."""

    index: int  # position in the stage's prompt list
    prompt_id: str
    response_ids: list[int]
    response: str
    outcome: str
    rule: str

    @property
    def refused(self) -> bool:
        return self.outcome == "refused"


class ResponseLog:
    """Pass 1's commits: one JSON file per batch of judged responses of this rank, written atomically."""

    def __init__(self, files: ActivationFiles, rank: int):
        self.folder = files.responses
        self.rank = rank

    def files(self, rank: int | None = None) -> list[Path]:
        pattern = f"rank-{self.rank if rank is None else rank:03d}-*.json"
        return sorted(self.folder.glob(pattern)) if self.folder.is_dir() else []

    def read(self, rank: int | None = None) -> list[Judged]:
        out = []
        for path in self.files(rank):
            out += [Judged(**row) for row in json.loads(path.read_text())]
        return out

    def commit(self, judged: Sequence[Judged]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        durable.write_json(self.folder / f"rank-{self.rank:03d}-{len(self.files()):05d}.json",
                           [asdict(j) for j in judged], indent=None)


def hash_key(prompt_id: str) -> str:
    """The order "first by prompt-id hash" of every capped prompt sample (independent of the data's order)."""
    return hashlib.sha256(prompt_id.encode()).hexdigest()


@dataclass
class Collected:
    """A finished collection as later stages read it."""

    files: ActivationFiles
    manifest: dict
    rows: list[dict]  # the prompts table, in collection order
    tokens: RefusalTokens

    @property
    def folder(self) -> Path:
        return self.files.dir

    def split_rows(self, split: str, label: str | None = None, refused: bool | None = None) -> list[int]:
        """Indices of the rows of ``split`` (optionally of one label, refused or not)."""
        return [i for i, r in enumerate(self.rows) if r["split"] == split and (label is None or r["label"] == label)
                and (refused is None or bool(r["refused"]) == refused)]

    def hash_order(self, rows: Sequence[int]) -> list[int]:
        """``rows`` ordered by the hash of their prompt ids (a fixed pseudo-random order for capped samples)."""
        return sorted(rows, key=lambda i: hash_key(self.rows[i]["prompt_id"]))

    def ids(self, rows: Sequence[int]) -> list[str]:
        return [self.rows[i]["prompt_id"] for i in rows]

    def encoded(self, tokenizer, max_tokens: int, rows: Sequence[int], template: str | None = None
                ) -> list[EncodedPrompt]:
        return [encode_prompt(tokenizer, self.rows[i]["prompt"], max_tokens, template) for i in rows]

    def response_ids(self, tokenizer, rows: Sequence[int]) -> list[list[int]]:
        """The judged responses of ``rows`` as token ids (as collected, from ``responses/``)."""
        judged = {}
        log = ResponseLog(self.files, 0)
        for r in range(int(self.manifest.get("world", 1))):
            judged.update({j.prompt_id: j.response_ids for j in log.read(r)})
        return [judged[self.rows[i]["prompt_id"]] for i in rows]


def load_collected(files: ActivationFiles | Path) -> Collected:
    """The prompts table, manifest and refusal tokens of a finished collect stage (an error otherwise)."""
    import datasets

    files = files if isinstance(files, ActivationFiles) else ActivationFiles(Path(files))
    manifest = json.loads(files.manifest.read_text()) if files.manifest.is_file() else {}
    if manifest.get("status") != "complete":
        raise UserError(f"no finished activations in {files.dir}: run `refusal-lens collect` with this config first")
    rows = datasets.load_from_disk(str(files.prompts)).to_list()
    return Collected(files, manifest, rows, RefusalTokens.from_dict(manifest["refusal_tokens"]))
