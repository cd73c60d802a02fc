"""The contrast of the refusal direction: harmful = toxic prompts, harmless = harmless prompts, each kept only when
the model agrees with its side (``direction.keep``), per split (discovery fits, validation selects, test reports)."""

from __future__ import annotations

from dataclasses import dataclass

from refusal_lens.errors import UserError
from refusal_lens.run.collected import Collected


class DirectionError(UserError, RuntimeError):
    """Missing inputs (no harmful or harmless prompts the model agrees with), or a folder of other settings."""


@dataclass
class Contrast:
    """Row indices (into the prompts table) of each split's contrast sets."""

    harmful: dict[str, list[int]]
    harmless: dict[str, list[int]]
    dropped: dict[str, dict[str, int]]  # prompts left out because the model does not agree with their side

    def counts(self) -> dict:
        return {s: {"harmful": len(self.harmful[s]), "harmless": len(self.harmless[s]),
                    "harmful_dropped": self.dropped[s]["harmful"], "harmless_dropped": self.dropped[s]["harmless"]}
                for s in self.harmful}


def agrees(row: dict, harmful: bool, keep: str) -> bool:
    """Whether the model agrees with a prompt's side: ``score`` (refusal score > 0 harmful, < 0 harmless, as
    Arditi et al.), ``judged`` (refused harmful, not refused harmless), ``both``, or ``all`` (always)."""
    by_score = row["refusal_score"] > 0 if harmful else row["refusal_score"] < 0
    by_judge = bool(row["refused"]) if harmful else not row["refused"]
    return {"score": by_score, "judged": by_judge, "both": by_score and by_judge, "all": True}[keep]


def contrast_sets(data: Collected, cap: int | None, keep: str = "score") -> Contrast:
    """Harmful = toxic prompts, harmless = harmless prompts, each kept only when the model agrees (``keep``).
    The validation sets are capped at ``cap`` prompts per side (the first by prompt-id hash order)."""
    harmful, harmless, dropped = {}, {}, {}
    for split in ("discovery", "validation", "test"):
        tox = data.split_rows(split, "toxic")
        safe = data.split_rows(split, "harmless")
        harmful[split] = [i for i in tox if agrees(data.rows[i], True, keep)]
        harmless[split] = [i for i in safe if agrees(data.rows[i], False, keep)]
        dropped[split] = {"harmful": len(tox) - len(harmful[split]), "harmless": len(safe) - len(harmless[split])}
    if cap is not None:
        harmful["validation"] = sorted(data.hash_order(harmful["validation"])[:cap])
        harmless["validation"] = sorted(data.hash_order(harmless["validation"])[:cap])
    for split in ("discovery", "validation"):
        if not harmful[split] or not harmless[split]:
            raise DirectionError(
                f"the {split} split has {len(harmful[split])} harmful and {len(harmless[split])} harmless prompts the "
                f"model agrees with (direction.keep={keep!r}); the direction needs both (more prompts, "
                "direction.harmless_samples, direction.keep, or other data.split_* fractions)")
    return Contrast(harmful, harmless, dropped)

