"""The selected direction on disk, for other tools: ``direction/direction.safetensors`` + ``direction.json``.

``direction.safetensors`` holds one tensor, ``direction``: the raw difference in means ``r`` (float32,
``[d_model]``, not normalised). ``direction.json`` says where it was taken and how it was chosen:

============================  ==============================================================================
key                           meaning
============================  ==============================================================================
``hook``                      TransformerLens hook of the means: ``blocks.{layer}.hook_resid_pre`` (block input)
``layer``                     that block
``position``                  token position relative to the prompt's end (-1 = the last prompt token)
``post_instruction_index``    index among the template's post-instruction tokens
``post_instruction_tokens``   how many the template has
``norm``                      ``|r|``
``scores``                    ``bypass``, ``induce``, ``kl`` measured on the validation split (see select.py)
``filters``                   the selection filters applied and notes when one had to be dropped
``splits``                    prompts used per split and side (``harmful`` / ``harmless``), after the filter
                              that keeps only prompts the model agrees with
``model``                     the model it belongs to
============================  ==============================================================================

To apply it elsewhere: ablation is ``x <- x - (x . r_hat) r_hat`` on every block's input, attention output
and MLP output (every layer and position); activation addition is ``x <- x + r`` at ``hook``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from refusal_lens.infra import durable
from refusal_lens.run.folder import DirectionFiles



@dataclass
class SavedDirection:
    vector: torch.Tensor  # raw r
    info: dict

    @property
    def layer(self) -> int:
        return int(self.info["layer"])

    @property
    def unit(self) -> torch.Tensor:
        return self.vector / self.vector.norm()


def save_direction(files: DirectionFiles, vector: torch.Tensor, info: dict) -> None:
    files.dir.mkdir(parents=True, exist_ok=True)
    durable.save_safetensors({"direction": vector.detach().float().contiguous().cpu()}, files.vector)
    durable.write_json(files.info, info)


def load_direction(files: DirectionFiles | Path) -> SavedDirection:
    """The direction saved in a run's ``direction/`` (its :class:`DirectionFiles`, or the folder)."""
    files = files if isinstance(files, DirectionFiles) else DirectionFiles(Path(files))
    if not files.vector.is_file() or not files.info.is_file():
        from refusal_lens.errors import UserError

        raise UserError(f"no refusal direction in {files.dir}: run `refusal-lens direction` first")
    return SavedDirection(load_file(str(files.vector))["direction"], json.loads(files.info.read_text()))
