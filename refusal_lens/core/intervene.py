"""Interventions on the Hugging Face model: forward passes and greedy generation with edits at hook points.

Every intervention of refusal_lens (directional ablation, activation addition, SAE-feature ablation,
steering) is an :class:`Edit`: a TransformerLens hook name and a function ``fn(x, ctx) -> x`` of the
activation at that hook. :class:`Intervener` runs edits on the untouched HF model (the KV cache and sdpa
attention of ``transformers``), attaching each edit as a PyTorch hook on the module that carries that hook
point (:func:`refusal_lens.core.hooks.hf_hook_target`); the TransformerLens runner of the attribution methods
calls the same edit functions from its own hook points (:mod:`refusal_lens.stages.circuits.attribution`), so one
implementation of an edit serves both.

``ctx`` (:class:`EditContext`) tells the edit where each column of ``x`` is: ``ctx.classes`` is
``[batch, columns]`` of position classes (:mod:`refusal_lens.core.chat`: padding, opening, content,
post-instruction ``j``, generated) and ``ctx.rows`` the batch's row indices in the caller's list, so that
an edit can differ per prompt. During generation the prompt is one forward pass (prefill) and every new
token one more (class ``GENERATED``), so edits apply to generated tokens too.

The model is ``loaded.gen_model``: the HF model in ``model.intervention_dtype`` (bf16 runs 2.9x faster
than fp32 on the project's CPUs; measured in bench/bench_interventions.py).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from refusal_lens.core.chat import GENERATED, OPENING, PAD, EncodedPrompt, left_pad
from refusal_lens.core.edit import Edit, EditContext, EditsFor, opening_groups, per_condition
from refusal_lens.core.greedy import greedy
from refusal_lens.core.hooks import hf_hook_target
from refusal_lens.core.metrics import kl_divergence
from refusal_lens.core.refusal import RefusalTokens, refusal_score
from refusal_lens.core.stem import Stems, clean_stem, first_edited_layer, layers_window, windowed


@dataclass
class Batch:
    ids: Tensor  # [batch, width] left-padded (after the shared prefix, when ``prefix`` is set)
    mask: Tensor
    classes: Tensor  # [batch, width]
    rows: list[int]
    n_prompt: list[int]  # unpadded prompt length of each member (continuations excluded)
    prefix: tuple[int, ...] = ()  # token ids every member starts with, cut off (their keys/values come cached)

    def __len__(self) -> int:
        return len(self.rows)


def shared_opening(prompts: Sequence[EncodedPrompt]) -> tuple[int, ...]:
    """The token ids of the template's opening, when every prompt has the same one (else empty)."""
    if not prompts:
        return ()
    n = min(p.n_opening for p in prompts)
    first = tuple(prompts[0].ids[:n])
    return first if n > 0 and all(tuple(p.ids[:n]) == first for p in prompts) else ()


def make_batch(prompts: Sequence[EncodedPrompt], rows: Sequence[int], pad_id: int,
               continuations: Sequence[Sequence[int]] | None = None, device: torch.device | str = "cpu",
               prefix: Sequence[int] = ()) -> Batch:
    """Left-padded prompts (optionally followed by teacher-forced continuations, class GENERATED); with
    ``prefix`` (a shared opening) the batch holds what follows it."""
    conts = continuations if continuations is not None else [[] for _ in prompts]
    cut = len(prefix)
    seqs = [list(p.ids[cut:]) + list(c) for p, c in zip(prompts, conts)]
    ids, mask = left_pad(seqs, pad_id)
    classes = torch.full(ids.shape, PAD, dtype=torch.long)
    for b, (p, c) in enumerate(zip(prompts, conts)):
        cls = p.position_classes(len(c))[cut:]
        classes[b, ids.shape[1] - len(cls):] = torch.tensor(cls, dtype=torch.long)
    return Batch(ids.to(device), mask.to(device), classes.to(device), list(rows), [len(p.ids) for p in prompts],
                 tuple(prefix))


@contextmanager
def frozen(model):
    """No parameter gradients inside (only activations need them); the flags are restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


PER_BATCH = object()  # a prefix cache computed with each batch's rows (see Intervener._plan)


class Intervener:
    """Forward passes and greedy generation of ``loaded.gen_model`` with :class:`Edit` s.

    **The shared opening is computed once.** Every prompt starts with the template's opening (e.g. Qwen's
    default system prompt: half the tokens of a short prompt), identical in every prompt. When no edit
    changes it (``Edit.opening`` false for all), its keys and values come from one clean pass, cached; when
    edits do change it but apply alike to every row, from one pass with those edits per call; when they differ
    between rows (the conditions of :meth:`generate_conditions`), from one pass per batch with one row per distinct
    edit of the opening (``Edit.row_key``, :func:`opening_groups`), expanded to the batch. Only the rest of
    each prompt is run per batch, after the cache (middle padding, explicit positions). ``share_opening=False``
    runs every prompt whole; ``tests/core/test_intervene.py`` checks both give the same logits and tokens.
    """

    def __init__(self, loaded, batch_size: int = 16, model=None, share_opening: bool = True,
                 generation_batch_size: int | None = None, gradient_batch_size: int | None = None):
        self.loaded = loaded
        self.model = loaded.gen_model if model is None else model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.batch_size = batch_size
        #: prompts per greedy-generation batch (``batch_size`` when None): a CPU decoding step reads every weight
        #: whatever the batch, so generation gains from larger batches than forward passes do (bench_interventions)
        self.generation_batch_size = generation_batch_size or batch_size
        #: prompts per forward + backward pass (``batch_size`` when None): the autograd graph of a float32 model
        #: holds every layer's activations, 5.4 GB at 64 prompts of the main job (the direction stage's peak)
        self.gradient_batch_size = gradient_batch_size or batch_size
        self.share_opening = share_opening
        self._clean_prefix: dict[tuple[int, ...], object] = {}
        ids = self.model.generation_config.eos_token_id
        self.eos = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        if self.tokenizer.eos_token_id is not None:
            self.eos.add(self.tokenizer.eos_token_id)
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "past_key_values" if "past_key_values" in params else "cache"

    # ---------------------------------------------------------------- hooks

    @contextmanager
    def edits(self, edits: Sequence[Edit], batch: Batch, alive: list[int] | None = None):
        """Attach ``edits`` for the passes over ``batch`` (prefill columns, then one generated column per step).

        ``alive``: the batch members (indices into ``batch.rows``) a generated column belongs to, kept up to date
        by the caller as rows finish (:meth:`generate_scored` drops them); all of them when None."""
        handles = []
        width = batch.ids.shape[1]
        gen_classes = torch.full((len(batch.rows), 1), GENERATED, dtype=torch.long, device=batch.ids.device)

        def context(x: Tensor) -> EditContext:
            if x.shape[1] == width:
                return EditContext(batch.classes, batch.rows)
            if x.shape[1] == 1:
                if alive is None or len(alive) == len(batch.rows):
                    return EditContext(gen_classes, batch.rows)
                return EditContext(gen_classes[: len(alive)], [batch.rows[i] for i in alive])
            raise ValueError(f"edit got {x.shape[1]} columns; expected the prompt width {width} or 1 (a new token)")

        def post(fn):
            def hook(module, args, output):  # noqa: ARG001
                if isinstance(output, tuple):
                    return (fn(output[0], context(output[0])), *output[1:])
                return fn(output, context(output))

            return hook

        def pre(fn):
            def hook(module, args, kwargs):  # noqa: ARG001
                if args:
                    return (fn(args[0], context(args[0])), *args[1:]), kwargs
                x = kwargs["hidden_states"]
                return args, {**kwargs, "hidden_states": fn(x, context(x))}

            return hook

        try:
            for edit in edits:
                module, kind = hf_hook_target(self.model, edit.hook)
                handles.append(module.register_forward_pre_hook(pre(edit.fn), with_kwargs=True) if kind == "pre"
                               else module.register_forward_hook(post(edit.fn)))
            yield
        finally:
            for h in handles:
                h.remove()

    # ---------------------------------------------------------------- batches and the shared opening

    def batches(self, prompts: Sequence[EncodedPrompt], continuations: Sequence[Sequence[int]] | None = None,
                order_by_length: bool = True, prefix: Sequence[int] = (), size: int | None = None) -> list[Batch]:
        """Batches of ``size`` (default ``batch_size``) prompts (sorted by length to pad little; rows keep the
        caller's order)."""
        size = size or self.batch_size
        idx = list(range(len(prompts)))
        if order_by_length:
            idx.sort(key=lambda i: (len(prompts[i].ids) + (len(continuations[i]) if continuations else 0), i))
        out = []
        for s in range(0, len(idx), size):
            rows = idx[s : s + size]
            out.append(make_batch([prompts[i] for i in rows], rows, self.tokenizer.pad_token_id,
                                  [continuations[i] for i in rows] if continuations is not None else None,
                                  self.device, prefix))
        return out

    @staticmethod
    def _edits_for(edits: EditsFor | None, rows: list[int]) -> Sequence[Edit]:
        if edits is None:
            return []
        return edits(rows) if callable(edits) else edits

    def _plan(self, prompts: Sequence[EncodedPrompt], edits: EditsFor | None) -> tuple[tuple[int, ...], object]:
        """``(prefix ids, its cache)`` to share: the clean cache (no edit changes the opening), one computed with
        the edits (they change it alike for every row), or ``PER_BATCH`` (they change it per row: computed with
        each batch's rows); ``((), None)`` when every prompt runs whole."""
        prefix = shared_opening(prompts) if self.share_opening else ()
        if not prefix:
            return (), None
        fixed = [] if edits is None else edits if not callable(edits) else None
        if fixed is None:  # per-batch edits: share only a clean opening, and only if none of them changes it
            probe = self._edits_for(edits, list(range(min(len(prompts), 1))))
            if any(e.opening for e in probe):
                return (), None
            fixed = []
        if any(e.opening and e.per_row for e in fixed):
            return prefix, PER_BATCH
        if any(e.opening for e in fixed):
            return prefix, self._prefix_cache(prefix, fixed)
        return prefix, self._clean_opening(prefix)

    def _clean_opening(self, prefix: tuple[int, ...]):
        """The clean keys and values of ``prefix``, computed once and kept."""
        if prefix not in self._clean_prefix:
            self._clean_prefix[prefix] = self._prefix_cache(prefix, [])
        return self._clean_prefix[prefix]

    @torch.no_grad()
    def _prefix_cache(self, prefix: tuple[int, ...], edits: Sequence[Edit], rows: Sequence[int] = ()):
        """The keys and values of ``prefix`` under ``edits``: one row, or one per row of ``rows`` (per-row edits)."""
        n = max(len(rows), 1)
        ids = torch.tensor([prefix] * n, device=self.device)
        batch = Batch(ids, torch.ones_like(ids), torch.full_like(ids, OPENING), list(rows), [len(prefix)] * n)
        with self.edits(edits, batch):
            # only the cache is kept: the logits of one position, not [rows, len(prefix), d_vocab] (measured: 0.55 GiB
            # and the time of that unembedding for a per-batch opening of 64 rows of the main job)
            out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
        return out.past_key_values

    def _inputs(self, batch: Batch, cache, edits: Sequence[Edit] = ()) -> dict:
        """Model inputs of a batch: plain, or after the shared prefix (its cache expanded to the batch, or computed
        for the batch's rows)."""
        if not batch.prefix:
            return {"input_ids": batch.ids, "attention_mask": batch.mask}
        n, p = len(batch), len(batch.prefix)
        if cache is PER_BATCH:  # one opening per distinct edit of it among the batch's rows, expanded to the rows
            reps, index = opening_groups(edits, batch.rows)
            mine = self._prefix_cache(batch.prefix, edits, reps)
            if len(reps) < n:
                mine.reorder_cache(torch.tensor(index, device=batch.ids.device))
        else:
            mine = copy.deepcopy(cache)
            mine.batch_repeat_interleave(n)
        mask = torch.cat([torch.ones(n, p, dtype=batch.mask.dtype, device=batch.mask.device), batch.mask], 1)
        pos = p + (batch.mask.cumsum(-1) - 1).clamp_min(0)
        return {"input_ids": batch.ids, "attention_mask": mask, "position_ids": pos, self._cache_kw: mine}

    # ---------------------------------------------------------------- passes

    def last_logits_grad(self, batch: Batch, edits: Sequence[Edit]) -> Tensor:
        """``[batch, d_vocab]`` float32 logits at the last position of one batch, with autograd (the caller's
        edits create the leaves); parameters should be frozen (:func:`frozen`). Every prompt runs whole."""
        with self.edits(edits, batch):
            return self.model(input_ids=batch.ids, attention_mask=batch.mask, logits_to_keep=1).logits[:, -1].float()

    @torch.no_grad()
    def last_logits(self, prompts: Sequence[EncodedPrompt], edits: EditsFor | None = None,
                    stems: Stems | None = None) -> Tensor:
        """``[n, d_vocab]`` float32 logits at each prompt's last position (the first response token).

        ``stems``: the caller's clean stems (:mod:`refusal_lens.core.stem`): a batch whose edits all act in layers
        ``>= l > 0`` runs from the clean residual entering layer ``l``, computed once per batch and layer and kept
        there for the caller's next passes over the same prompts; the same logits bit for bit."""
        prefix, cache = self._plan(prompts, edits)
        # a per-row edited opening is computed with the batch's rows: its layers below the edits need not be the
        # clean opening's bits, so those passes run whole
        stems = stems if cache is not PER_BATCH and windowed(self.model) else None
        out: list[Tensor | None] = [None] * len(prompts)
        for batch in self.batches(prompts, prefix=prefix):
            mine = self._edits_for(edits, batch.rows)
            inputs = self._inputs(batch, cache, mine)  # before the batch's edits attach (a per-batch opening cache)
            start = first_edited_layer(mine) if stems is not None and mine else 0
            if start:
                del inputs["input_ids"]
                inputs["inputs_embeds"] = self._stem(batch, start, stems)
            with self.edits(mine, batch), layers_window(self.model, start) if start else nullcontext():
                logits = self.model(**inputs, logits_to_keep=1).logits[:, -1].float().cpu()
            for b, row in enumerate(batch.rows):
                out[row] = logits[b]
        return torch.stack(out)  # type: ignore[arg-type]

    def _stem(self, batch: Batch, layer: int, stems: Stems) -> Tensor:
        """The clean residual entering ``layer`` for ``batch`` (from ``stems``, or computed and kept there): a clean
        pass with the clean opening, whose layers below any edit are those of every opening the batch can get."""
        key = Stems.batch_key(batch.ids, batch.mask, batch.prefix)
        stem = stems.get(key, layer)
        if stem is None:
            clean = self._clean_opening(batch.prefix) if batch.prefix else None
            start, below = stems.below(key, layer)
            stem = clean_stem(self.model, self._inputs(batch, clean), layer, start, below)
            stems.put(key, layer, stem)
        return stem

    @torch.no_grad()
    def continuation_logprobs(self, prompts: Sequence[EncodedPrompt], continuations: Sequence[Sequence[int]],
                              edits: EditsFor | None = None, reference: Sequence[Tensor] | None = None
                              ) -> tuple[list[Tensor], list[float], list[float]]:
        """Teacher-forced continuations: per prompt (the last-prompt-position log-probs ``[d_vocab]``, the summed
        NLL of the continuation, the KL to ``reference`` (the same prompts' last-position log-probs of another
        run; 0 without it))."""
        prefix, cache = self._plan(prompts, edits)
        first: list[Tensor | None] = [None] * len(prompts)
        nll = [0.0] * len(prompts)
        kl = [0.0] * len(prompts)
        for batch in self.batches(prompts, continuations, prefix=prefix):
            mine = self._edits_for(edits, batch.rows)
            inputs = self._inputs(batch, cache, mine)
            # only the positions that predict a response token (the rows are left-padded, so the continuations
            # end together): [batch, keep, d_vocab] instead of the whole width, the memory peak of evaluation
            keep = max(len(continuations[row]) for row in batch.rows) + 1
            with self.edits(mine, batch):
                logits = self.model(**inputs, logits_to_keep=keep).logits
            width = batch.ids.shape[1]
            for b, row in enumerate(batch.rows):
                logp = logits[b].float().log_softmax(-1)  # one row at a time: [keep, d_vocab] float32
                n_cont = len(continuations[row])
                last = keep - n_cont - 1  # kept position predicting the first response token
                # a copy, not a view: a view of logp (on the CPU, .cpu() returns it as is) keeps the row's whole
                # [keep, d_vocab] float32 alive (measured: 2 GiB for 40 harmless prompts, the main job's peak)
                first[row] = logp[last].detach().to("cpu", copy=True)
                if n_cont:
                    targets = batch.ids[b, width - n_cont :]
                    nll[row] = float(-logp[last : keep - 1].gather(-1, targets[:, None]).sum())
                if reference is not None:
                    ref = reference[row].to(logp.device)
                    kl[row] = float(kl_divergence(ref, logp[last]))
        return first, nll, kl  # type: ignore[return-value]

    @torch.no_grad()
    def generate(self, prompts: Sequence[EncodedPrompt], max_new_tokens: int, edits: EditsFor | None = None
                 ) -> list[list[int]]:
        """Greedy responses (token ids up to, not including, the first end-of-sequence token)."""
        return self.generate_scored(prompts, max_new_tokens, edits)[0]

    @torch.no_grad()
    def generate_scored(self, prompts: Sequence[EncodedPrompt], max_new_tokens: int, edits: EditsFor | None = None,
                        tokens: RefusalTokens | None = None) -> tuple[list[list[int]], list[float] | None]:
        """Greedy responses, and with ``tokens`` the refusal score of each prompt's first response position, read from
        the logits the generation's first step computes anyway (the float32 logits greedy decoding takes its first
        token from). They are what :meth:`last_logits` gives up to the batch's rounding: the same prompts and edits in
        other batches (bf16)."""
        prefix, cache = self._plan(prompts, edits)
        out: list[list[int] | None] = [None] * len(prompts)
        scores: list[float | None] = [None] * len(prompts)
        for batch in self.batches(prompts, prefix=prefix, size=self.generation_batch_size):
            mine = self._edits_for(edits, batch.rows)
            inputs = self._inputs(batch, cache, mine)
            alive = list(range(len(batch)))  # the rows still decoding: the edits' generated columns are theirs
            with self.edits(mine, batch, alive):
                responses, first = greedy(self.model, inputs, batch.ids.shape[1], self.eos, max_new_tokens,
                                          self._cache_kw, alive)
            batch_scores = refusal_score(first, tokens).cpu().tolist() if tokens is not None else None
            for b, row in enumerate(batch.rows):
                out[row] = responses[b]
                if batch_scores is not None:
                    scores[row] = float(batch_scores[b])
        return out, (scores if tokens is not None else None)  # type: ignore[return-value]

    def generate_conditions(self, conditions: Sequence[tuple[Sequence[EncodedPrompt], Sequence[Edit]]],
                            max_new_tokens: int) -> list[list[list[int]]]:
        """Greedy responses of several conditions (each: prompts and its own edits) in shared batches.

        A CPU decoding step has a fixed cost, reading every weight (measured on the main job's model: ~85 ms a
        step, then ~2.7 ms a row; 16 rows 157 ms, 64 rows 260 ms), so the rows of several conditions run together:
        each edit applies to its own condition's rows only (:func:`per_condition`). Returns the responses of each
        condition, in its prompts' order."""
        return self.generate_conditions_scored(conditions, max_new_tokens)[0]

    def generate_conditions_scored(self, conditions: Sequence[tuple[Sequence[EncodedPrompt], Sequence[Edit]]],
                                   max_new_tokens: int, tokens: RefusalTokens | None = None
                                   ) -> tuple[list[list[list[int]]], list[list[float]] | None]:
        """:meth:`generate_conditions`, and with ``tokens`` each response's first-position refusal score
        (:meth:`generate_scored`), per condition in its prompts' order (None without ``tokens``)."""
        prompts, owner = [], []
        for c, (ps, _) in enumerate(conditions):
            prompts += list(ps)
            owner += [c] * len(ps)
        flat, flat_scores = self.generate_scored(prompts, max_new_tokens,
                                                 per_condition([e for _, e in conditions], owner), tokens)
        out: list[list[list[int]]] = [[] for _ in conditions]
        by: list[list[float]] = [[] for _ in conditions]
        for row, c in enumerate(owner):
            out[c].append(flat[row])
            if flat_scores is not None:
                by[c].append(flat_scores[row])
        return out, (by if flat_scores is not None else None)

    def decode(self, responses: Sequence[Sequence[int]]) -> list[str]:
        return self.tokenizer.batch_decode(responses, skip_special_tokens=True)
