"""The train-saes stage's SAEs as readers get them: SAE-Lens ``SAE`` objects loaded from ``saes/<hook>/``
(SAE-Lens's own format, ``cfg.json`` + ``sae_weights.safetensors``), in eval mode with frozen parameters."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from refusal_lens.errors import UserError
from refusal_lens.run.folder import SAEFiles


def load_sae(folder: Path, device: str = "cpu"):
    """One SAE-Lens SAE from its folder (``cfg.json`` + ``sae_weights.safetensors``)."""
    from sae_lens import SAE

    if not SAEFiles.sae_config(Path(folder)).is_file():
        raise UserError(f"no SAE-Lens SAE at {folder} (no cfg.json): run `refusal-lens train-saes` first")
    return SAE.load_from_disk(str(folder), device=str(device))


def load_saes(files: SAEFiles, hooks: Sequence[str], device: str = "cpu") -> dict:
    """The SAEs of ``hooks``, in eval mode, parameters frozen (the circuits' node space)."""
    saes = {}
    for h in hooks:
        sae = load_sae(files.hook(h), device)
        sae.eval()
        for p in sae.parameters():
            p.requires_grad_(False)
        saes[h] = sae
    return saes
