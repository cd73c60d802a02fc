"""The geometry part of :mod:`refusal_lens.checks.false_refusal_why`: where w and r point, and what separates the refused
safe from the refused toxic prompts at the sites where the model decides to refuse.

:func:`geometry` is pure (tensors in, numbers out; tests/checks/test_false_refusal_why.py plants the answers);
:func:`run_geometry` reads a run and computes the tensors as the direction stage does (the float32 model, the same
discovery contrast, :class:`~refusal_lens.stages.direction.candidates.SiteCache`)."""

from __future__ import annotations

import logging

import numpy as np
from torch import Tensor

from refusal_lens.core.refusal import auroc

logger = logging.getLogger(__name__)


def _unit(v: Tensor) -> Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def cosines(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine of ``[..., d]`` tensors."""
    return (_unit(a.double()) * _unit(b.double())).sum(-1)


def auroc_interval(pos: np.ndarray, neg: np.ndarray, n_boot: int = 1000, level: float = 0.95, seed: int = 0
                   ) -> list[float | None]:
    """Percentile bootstrap interval of :func:`~refusal_lens.core.refusal.auroc` (each group resampled)."""
    if len(pos) == 0 or len(neg) == 0:
        return [None, None]
    gen = np.random.default_rng(seed)
    values = [auroc(pos[gen.integers(0, len(pos), len(pos))], neg[gen.integers(0, len(neg), len(neg))])
              for _ in range(n_boot)]
    return [float(np.quantile(values, (1 - level) / 2)), float(np.quantile(values, (1 + level) / 2))]


def separation(safe: Tensor, toxic: Tensor, u: Tensor, n_boot: int = 0) -> dict:
    """Projections of ``[n, d]`` safe and toxic activations on ``u``: their means and the AUROC of toxic above safe
    (with ``n_boot``, its bootstrap interval)."""
    u = _unit(u.double())
    ps, pt = (safe.double() @ u).numpy(), (toxic.double() @ u).numpy()
    out = {"mean_safe": float(ps.mean()) if len(ps) else None, "mean_toxic": float(pt.mean()) if len(pt) else None,
           "auroc_toxic_above_safe": auroc(pt, ps)}
    if n_boot:
        out["auroc_ci"] = auroc_interval(pt, ps, n_boot)
    return out


def geometry(w: Tensor, r: Tensor, test: dict[str, Tensor], discovery: dict[str, Tensor], sites: dict[str, tuple],
             n_boot: int = 1000) -> dict:
    """``w``, ``r``: ``[L, P, d]`` candidates; ``test`` / ``discovery``: ``{"safe_refused", "toxic_refused"} -> [n, L, P, d]``
    block inputs; ``sites``: ``name -> (layer, j, vector [d])``.

    Returns the cosine of w with r at every site; along r_hat at every site the AUROC of the refused toxic test prompts
    above the refused safe ones (how much of the label the refusal direction's dose carries); the label read-out
    (refused safe - refused toxic discovery means, per site, its test AUROC of safe above toxic, and its cosine with
    r); and for each named site its cosines with r and with the read-out, and the three separations (along r, the
    site's vector and the read-out, with bootstrap intervals of ``n_boot``)."""
    n_layers, n_post = w.shape[:2]
    cos = cosines(w, r)
    readout = discovery["safe_refused"].double().mean(0) - discovery["toxic_refused"].double().mean(0)  # [L, P, d]
    along_r, along_readout = [], []
    for layer in range(n_layers):
        row_r, row_o = [], []
        for j in range(n_post):
            s, t = test["safe_refused"][:, layer, j], test["toxic_refused"][:, layer, j]
            row_r.append(separation(s, t, r[layer, j])["auroc_toxic_above_safe"])
            row_o.append(1 - separation(s, t, readout[layer, j])["auroc_toxic_above_safe"])  # safe above toxic
        along_r.append(row_r)
        along_readout.append(row_o)
    named = {}
    for name, (layer, j, vec) in sites.items():
        s, t, probe = test["safe_refused"][:, layer, j], test["toxic_refused"][:, layer, j], readout[layer, j]
        named[name] = {"layer": layer, "position": j - n_post, "cosine_with_r": float(cosines(vec, r[layer, j])),
                       "cosine_with_label_readout": float(cosines(vec, probe)),
                       "along_r": separation(s, t, r[layer, j], n_boot), "along_vector": separation(s, t, vec, n_boot),
                       "along_label_readout": separation(s, t, probe, n_boot)}
    return {"cosine_w_r": cos.tolist(), "auroc_toxic_above_safe_along_r": along_r,
            "label_readout_auroc_safe_above_toxic": along_readout,
            "label_readout_cosine_with_r": cosines(readout, r).tolist(),
            "sites": named, "n_test": {k: int(v.shape[0]) for k, v in test.items()},
            "n_discovery": {k: int(v.shape[0]) for k, v in discovery.items()}}


def run_geometry(run, data, fr: dict, batch_size: int, n_boot: int = 1000) -> tuple[dict, dict[str, float]]:
    """:func:`geometry` of a run (the module docstring), and each refused test prompt's projection on r_hat at r's
    site (prompt id -> value). The stage's chosen w' are recomputed from the candidates and the headline checked
    against the saved ``false_refusal.safetensors``."""
    from safetensors.torch import load_file

    from refusal_lens.core.intervene import Intervener
    from refusal_lens.models.loading import load_model
    from refusal_lens.stages.direction.candidates import SiteCache, difference_in_means, load_candidates
    from refusal_lens.stages.direction.contrast import contrast_sets
    from refusal_lens.stages.direction.false_refusal_select import orthogonalised

    cfg = run.config()
    loaded = load_model(cfg.model)
    precise = Intervener(loaded, batch_size, model=loaded.hf_model)
    n_layers, d_model = loaded.n_layers, loaded.d_model
    sites_cache = SiteCache(precise, n_layers, d_model)
    contrast = contrast_sets(data, cfg.direction.selection_prompts, cfg.direction.keep)

    def enc(rows):
        return data.encoded(loaded.tokenizer, cfg.inference.max_prompt_tokens, rows)

    rows = {(split, lab): data.split_rows(split, lab, refused=True) for split in ("discovery", "test")
            for lab in ("safe", "toxic")}
    safe_disc = rows["discovery", "safe"]
    logger.info("geometry: w from %d refused safe and %d harmless discovery prompts", len(safe_disc),
                len(contrast.harmless["discovery"]))
    w = difference_in_means(precise, enc(safe_disc), enc(contrast.harmless["discovery"]), n_layers, d_model, sites_cache)
    r = load_candidates(run.paths.direction.candidate_tensors)
    acts = {}
    for split in ("discovery", "test"):
        acts[split] = {f"{lab}_refused": sites_cache.sites(enc(rows[split, lab]))[1] for lab in ("safe", "toxic")}
    saved = run.direction()
    j_r = int(saved.info["post_instruction_index"])
    named = {"r": (saved.layer, j_r, saved.vector.double())}
    w_prime: dict[float, Tensor] = {}  # lambda -> w' at every site

    def site(lam: float, layer: int, j: int) -> tuple:
        if lam not in w_prime:
            w_prime[lam] = orthogonalised(w, r, lam).diff
        return layer, j, w_prime[lam][layer, j]

    for lam, ch in fr.get("chosen", {}).items():
        named[f"w'(lambda={lam})"] = site(float(lam), ch["layer"], ch["j"])
    kept = fr.get("chosen_keeping_toxic", {})
    if "layer" in kept:
        named[f"w'(lambda={fr['lambda']:g}, toxic kept)"] = site(float(fr["lambda"]), kept["layer"], kept["j"])
    out = geometry(w.diff, r.diff, acts["test"], acts["discovery"], named, n_boot)
    u = _unit(saved.vector.double())
    projection = {}  # each refused test prompt's block input at r's site, projected on r_hat: the dose of r it carries
    for lab in ("safe", "toxic"):
        values = acts["test"][f"{lab}_refused"][:, saved.layer, j_r].double() @ u
        projection.update(zip(data.ids(rows["test", lab]), values.tolist()))
    head = named.get(f"w'(lambda={fr['lambda']:g})")
    if head is not None and run.paths.direction.false_refusal_vector.is_file():
        stored = load_file(str(run.paths.direction.false_refusal_vector))["direction"]
        out["headline_recomputed_cosine_with_saved"] = float(cosines(head[2], stored))
    return out, projection
