"""Interventions on the Hugging Face model: forward passes and greedy generation with edits at hook points.

Every intervention of refusal_lens (directional ablation, activation addition, SAE-feature ablation,
steering) is an :class:`Edit`: a TransformerLens hook name and a function ``fn(x, ctx) -> x`` of the
activation at that hook. :class:`Intervener` runs edits on the untouched HF model (the KV cache and sdpa
attention of ``transformers``), attaching each edit as a PyTorch hook on the module that carries that hook
point (:func:`refusal_lens.hooks.hf_hook_target`); the TransformerLens runner of the attribution methods
calls the same edit functions from its own hook points (:mod:`refusal_lens.circuits.attribution`), so one
implementation of an edit serves both.

``ctx`` (:class:`EditContext`) tells the edit where each column of ``x`` is: ``ctx.classes`` is
``[batch, columns]`` of position classes (:mod:`refusal_lens.chat`: padding, opening, content,
post-instruction ``j``, generated) and ``ctx.rows`` the batch's row indices in the caller's list, so that
an edit can differ per prompt. During generation the prompt is one forward pass (prefill) and every new
token one more (class ``GENERATED``), so edits apply to generated tokens too.

The model is ``loaded.gen_model``: the HF model in ``model.intervention_dtype`` (bf16 runs 2.9x faster
than fp32 on the project's CPUs; measured in bench/bench_interventions.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from refusal_lens.chat import GENERATED, PAD, EncodedPrompt, left_pad
from refusal_lens.hooks import hf_hook_target


@dataclass
class EditContext:
    classes: Tensor  # [batch, columns] position classes of the columns of x (PAD for padding)
    rows: list[int]  # row of each batch member in the caller's list


EditFn = Callable[[Tensor, EditContext], Tensor]


@dataclass(frozen=True)
class Edit:
    hook: str  # TransformerLens hook name (blocks.{i}.hook_resid_pre, ...hook_attn_out, ...)
    fn: EditFn


#: edits for a batch: a fixed list, or a function of the batch's rows (per-prompt conditions).
EditsFor = Sequence[Edit] | Callable[[list[int]], Sequence[Edit]]


@dataclass
class Batch:
    ids: Tensor  # [batch, width] left-padded
    mask: Tensor
    classes: Tensor  # [batch, width]
    rows: list[int]
    n_prompt: list[int]  # unpadded prompt length of each member (continuations excluded)


def make_batch(prompts: Sequence[EncodedPrompt], rows: Sequence[int], pad_id: int,
               continuations: Sequence[Sequence[int]] | None = None, device: torch.device | str = "cpu") -> Batch:
    """Left-padded prompts (optionally followed by teacher-forced continuations, class GENERATED)."""
    conts = continuations if continuations is not None else [[] for _ in prompts]
    seqs = [list(p.ids) + list(c) for p, c in zip(prompts, conts)]
    ids, mask = left_pad(seqs, pad_id)
    classes = torch.full(ids.shape, PAD, dtype=torch.long)
    for b, (p, c) in enumerate(zip(prompts, conts)):
        cls = p.position_classes(len(c))
        classes[b, ids.shape[1] - len(cls):] = torch.tensor(cls, dtype=torch.long)
    return Batch(ids.to(device), mask.to(device), classes.to(device), list(rows), [len(p.ids) for p in prompts])


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


class Intervener:
    """Forward passes and greedy generation of ``loaded.gen_model`` with :class:`Edit` s."""

    def __init__(self, loaded, batch_size: int = 16, model=None):
        self.loaded = loaded
        self.model = loaded.gen_model if model is None else model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.batch_size = batch_size
        ids = self.model.generation_config.eos_token_id
        self.eos = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        if self.tokenizer.eos_token_id is not None:
            self.eos.add(self.tokenizer.eos_token_id)

    # ---------------------------------------------------------------- hooks

    @contextmanager
    def edits(self, edits: Sequence[Edit], batch: Batch):
        """Attach ``edits`` for the passes over ``batch`` (prefill columns, then one generated column per step)."""
        handles = []
        width = batch.ids.shape[1]
        gen_classes = torch.full((len(batch.rows), 1), GENERATED, dtype=torch.long, device=batch.ids.device)

        def context(x: Tensor) -> EditContext:
            if x.shape[1] == width:
                return EditContext(batch.classes, batch.rows)
            if x.shape[1] == 1:
                return EditContext(gen_classes, batch.rows)
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

    def batches(self, prompts: Sequence[EncodedPrompt], continuations: Sequence[Sequence[int]] | None = None,
                order_by_length: bool = True) -> list[Batch]:
        """Batches of ``batch_size`` prompts (sorted by length to pad little; rows keep the caller's order)."""
        idx = list(range(len(prompts)))
        if order_by_length:
            idx.sort(key=lambda i: (len(prompts[i].ids) + (len(continuations[i]) if continuations else 0), i))
        out = []
        for s in range(0, len(idx), self.batch_size):
            rows = idx[s : s + self.batch_size]
            out.append(make_batch([prompts[i] for i in rows], rows, self.tokenizer.pad_token_id,
                                  [continuations[i] for i in rows] if continuations is not None else None,
                                  self.device))
        return out

    @staticmethod
    def _edits_for(edits: EditsFor | None, rows: list[int]) -> Sequence[Edit]:
        if edits is None:
            return []
        return edits(rows) if callable(edits) else edits

    # ---------------------------------------------------------------- passes

    def last_logits_grad(self, batch: Batch, edits: Sequence[Edit]) -> Tensor:
        """``[batch, d_vocab]`` float32 logits at the last position of one batch, with autograd (the caller's
        edits create the leaves); parameters should be frozen (:func:`frozen`)."""
        with self.edits(edits, batch):
            return self.model(input_ids=batch.ids, attention_mask=batch.mask, logits_to_keep=1).logits[:, -1].float()

    @torch.no_grad()
    def last_logits(self, prompts: Sequence[EncodedPrompt], edits: EditsFor | None = None) -> Tensor:
        """``[n, d_vocab]`` float32 logits at each prompt's last position (the first response token)."""
        out: list[Tensor | None] = [None] * len(prompts)
        for batch in self.batches(prompts):
            with self.edits(self._edits_for(edits, batch.rows), batch):
                logits = self.model(input_ids=batch.ids, attention_mask=batch.mask,
                                    logits_to_keep=1).logits[:, -1].float().cpu()
            for b, row in enumerate(batch.rows):
                out[row] = logits[b]
        return torch.stack(out)  # type: ignore[arg-type]

    @torch.no_grad()
    def continuation_logprobs(self, prompts: Sequence[EncodedPrompt], continuations: Sequence[Sequence[int]],
                              edits: EditsFor | None = None, reference: Sequence[Tensor] | None = None
                              ) -> tuple[list[Tensor], list[float], list[float]]:
        """Teacher-forced continuations: per prompt the log-probs ``[len + 1, d_vocab]`` of the positions that
        predict the first response token and each continuation token are too large to keep, so this returns
        (last-prompt-position log-probs ``[d_vocab]``, summed NLL of the continuation, summed KL to
        ``reference`` (the same prompts' last-position log-probs of another run; 0 without it))."""
        first: list[Tensor | None] = [None] * len(prompts)
        nll = [0.0] * len(prompts)
        kl = [0.0] * len(prompts)
        for batch in self.batches(prompts, continuations):
            with self.edits(self._edits_for(edits, batch.rows), batch):
                logits = self.model(input_ids=batch.ids, attention_mask=batch.mask).logits.float()
            logp = logits.log_softmax(-1)
            width = batch.ids.shape[1]
            for b, row in enumerate(batch.rows):
                n_cont = len(continuations[row])
                last = width - n_cont - 1  # position predicting the first response token
                first[row] = logp[b, last].cpu()
                if n_cont:
                    targets = batch.ids[b, last + 1 :]
                    nll[row] = float(-logp[b, last : width - 1].gather(-1, targets[:, None]).sum())
                if reference is not None:
                    ref = reference[row].to(logp.device)
                    kl[row] = float((ref.exp() * (ref - logp[b, last])).sum())
        return first, nll, kl  # type: ignore[return-value]

    @torch.no_grad()
    def generate(self, prompts: Sequence[EncodedPrompt], max_new_tokens: int, edits: EditsFor | None = None
                 ) -> list[list[int]]:
        """Greedy responses (token ids up to, not including, the first end-of-sequence token)."""
        out: list[list[int] | None] = [None] * len(prompts)
        for batch in self.batches(prompts):
            with self.edits(self._edits_for(edits, batch.rows), batch):
                new = self.model.generate(input_ids=batch.ids, attention_mask=batch.mask, max_new_tokens=max_new_tokens,
                                          do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
            for b, row in enumerate(batch.rows):
                seq = new[b, batch.ids.shape[1]:].tolist()
                cut = next((i for i, t in enumerate(seq) if t in self.eos), len(seq))
                out[row] = seq[:cut]
        return out  # type: ignore[return-value]

    def decode(self, responses: Sequence[Sequence[int]]) -> list[str]:
        return self.tokenizer.batch_decode(responses, skip_special_tokens=True)
