"""The Intervener: edits on the HF modules, and the shared opening computed once (same logits and tokens)."""

import pytest
import torch

from planted import load_planted_directions, loaded_planted
from refusal_lens.core.chat import OPENING
from refusal_lens.core.direction_edits import ablation_edits, addition_edits, capture_post_instruction
from refusal_lens.core.edit import Edit
from refusal_lens.core.intervene import Intervener, shared_opening


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return loaded_planted(tmp_path_factory.mktemp("planted-iv") / "model", every=3)


def both(loaded, batch_size=4):
    return (Intervener(loaded, batch_size, model=loaded.hf_model, share_opening=True),
            Intervener(loaded, batch_size, model=loaded.hf_model, share_opening=False))


def test_the_shared_opening_is_found_from_the_template(planted):
    _, loaded, prompts = planted
    prefix = shared_opening(prompts)
    assert len(prefix) == prompts[0].n_opening == 2 and all(tuple(p.ids[:2]) == prefix for p in prompts)
    odd = prompts[:2] + [type(prompts[0])("", [5, 6, 7, 8], 1, False, 2)]
    assert shared_opening(odd) == ()  # a prompt with another opening: nothing shared


def test_cached_opening_gives_the_same_logits_nll_and_tokens(planted):
    folder, loaded, prompts = planted
    e_h = load_planted_directions(folder)["harm"]
    cached, whole = both(loaded)
    sums = {k: torch.zeros(loaded.n_layers, prompts[0].n_post_instruction, loaded.d_model, dtype=torch.float64)
            for k in ("cached", "whole")}

    def site_only(x, ctx):  # touches the prompt's own positions only
        return x + 0.5 * e_h * (ctx.classes != OPENING)[..., None]

    cases = {"none": None, "ablation (changes the opening)": ablation_edits(e_h, loaded.n_layers),
             "addition (changes the opening)": addition_edits(3 * e_h, 1),
             "sites only": [Edit("blocks.1.hook_resid_pre", site_only, opening=False)]}
    for name, edits in cases.items():
        torch.testing.assert_close(cached.last_logits(prompts, edits), whole.last_logits(prompts, edits),
                                   rtol=1e-4, atol=1e-4, msg=name)
        assert cached.generate(prompts, 5, edits) == whole.generate(prompts, 5, edits), name
        conts = [[7, 8, 9]] * len(prompts)
        a, b = cached.continuation_logprobs(prompts, conts, edits), whole.continuation_logprobs(prompts, conts, edits)
        assert a[1] == pytest.approx(b[1], rel=1e-4, abs=1e-4), name
        torch.testing.assert_close(torch.stack(a[0]), torch.stack(b[0]), rtol=1e-4, atol=1e-4)
    cached.last_logits(prompts, capture_post_instruction(range(loaded.n_layers), prompts[0].n_post_instruction,
                                                         sums["cached"]))
    whole.last_logits(prompts, capture_post_instruction(range(loaded.n_layers), prompts[0].n_post_instruction,
                                                        sums["whole"]))
    torch.testing.assert_close(sums["cached"], sums["whole"], rtol=1e-4, atol=1e-4)
    # the clean opening is computed once and reused
    assert len(cached._clean_prefix) == 1


def test_an_edit_that_says_it_spares_the_opening_but_does_not_is_caught_by_the_comparison(planted):
    """The flag matters: an edit that changes the opening, declared as sparing it, gives other logits when the
    opening is shared (so tests of each edit's flag can fail)."""
    folder, loaded, prompts = planted
    e_h = load_planted_directions(folder)["harm"]
    cached, whole = both(loaded)
    liar = [Edit("blocks.0.hook_resid_pre", lambda x, ctx: x + 5 * e_h, opening=False)]
    assert not torch.allclose(cached.last_logits(prompts, liar), whole.last_logits(prompts, liar), atol=1e-3)


def test_conditions_in_shared_batches_give_what_each_gives_alone(planted):
    """Rows of several conditions run together; each condition's edits touch its own rows only (with edits that
    change the opening, and edits that do not)."""
    folder, loaded, prompts = planted
    e_h = load_planted_directions(folder)["harm"]
    iv = Intervener(loaded, 16, model=loaded.hf_model)

    def site_only(x, ctx):
        return x + 2.0 * e_h * (ctx.classes != OPENING)[..., None]

    conditions = [(prompts, []), (prompts[:3], ablation_edits(e_h, loaded.n_layers)),
                  (prompts, [Edit("blocks.1.hook_resid_pre", site_only, opening=False)]),
                  (prompts[1:], addition_edits(3 * e_h, 1))]
    together = iv.generate_conditions(conditions, 5)
    alone = [Intervener(loaded, 4, model=loaded.hf_model).generate(ps, 5, edits) for ps, edits in conditions]
    assert together == alone
    wide = Intervener(loaded, 2, model=loaded.hf_model, generation_batch_size=64)  # one generation batch for all
    assert wide.generate_conditions(conditions, 5) == alone
    assert len(together[1]) == 3 and together[1] != together[0][:3]  # the edits did something, on their rows only


def test_scores_read_from_the_first_generation_step_are_the_last_logits_scores(planted):
    """generate_scored's refusal scores (the logits greedy decoding takes its first token from) equal the refusal
    score of last_logits on the same prompts and edits, and its responses are generate's; in shared batches of
    several conditions (generate_conditions_scored) each condition gets its own rows' scores."""
    from refusal_lens.core.refusal import RefusalTokens, refusal_score

    folder, loaded, prompts = planted
    e_h = load_planted_directions(folder)["harm"]
    tokens = RefusalTokens((21,), ("I",), "learned")
    iv = Intervener(loaded, 16, model=loaded.hf_model)
    conditions = [(prompts, []), (prompts[:3], ablation_edits(e_h, loaded.n_layers)),
                  (prompts[1:], addition_edits(3 * e_h, 1))]
    for ps, edits in conditions:
        responses, scores = iv.generate_scored(ps, 5, edits, tokens)
        assert responses == iv.generate(ps, 5, edits)
        torch.testing.assert_close(torch.tensor(scores), refusal_score(iv.last_logits(ps, edits), tokens),
                                   rtol=1e-4, atol=1e-4)
    assert iv.generate_scored(prompts, 5)[1] is None  # no tokens, no scores
    together, scores = iv.generate_conditions_scored(conditions, 5, tokens)
    assert together == iv.generate_conditions(conditions, 5)
    for (ps, edits), got in zip(conditions, scores):
        torch.testing.assert_close(torch.tensor(got), refusal_score(iv.last_logits(ps, edits), tokens),
                                   rtol=1e-4, atol=1e-4)
    assert not torch.allclose(torch.tensor(scores[0][:3]), torch.tensor(scores[1]), atol=1e-3)  # edits matter


def test_the_opening_is_computed_once_per_condition_that_changes_it(planted):
    """In one generation batch of four conditions (clean, two that change the opening, one that spares it) the
    opening's cache is computed for three rows, not for every row: the clean and the sparing condition share one,
    each changing condition has its own (and the responses are what each condition gives alone)."""
    folder, loaded, prompts = planted
    e_h = load_planted_directions(folder)["harm"]

    def site_only(x, ctx):
        return x + 2.0 * e_h * (ctx.classes != OPENING)[..., None]

    conditions = [(prompts, []), (prompts[:3], ablation_edits(e_h, loaded.n_layers)),
                  (prompts, [Edit("blocks.1.hook_resid_pre", site_only, opening=False)]),
                  (prompts[1:], addition_edits(3 * e_h, 1))]
    wide = Intervener(loaded, 2, model=loaded.hf_model, generation_batch_size=64)
    computed = []
    original = wide._prefix_cache
    wide._prefix_cache = lambda prefix, edits, rows=(): computed.append(list(rows)) or original(prefix, edits, rows)
    together = wide.generate_conditions(conditions, 5)
    n_rows = sum(len(ps) for ps, _ in conditions)
    assert [len(rows) for rows in computed] == [3], (computed, n_rows)
    alone = [Intervener(loaded, 4, model=loaded.hf_model).generate(ps, 5, edits) for ps, edits in conditions]
    assert together == alone


def test_an_edit_that_reads_the_rows_gets_its_own_opening_per_row():
    """A condition's edit that reads ``ctx.rows`` (per_row) leaves its hook without a row key: every row of the
    batch then gets its own opening; keyed rows group by their key."""
    from refusal_lens.core.edit import opening_groups, per_condition

    def noop(x, ctx):
        return x

    owner = [0, 0, 1, 1, 2]
    keyed = per_condition([[Edit("blocks.0.hook_resid_pre", noop)], [], [Edit("blocks.0.hook_resid_pre", noop)]],
                          owner)
    assert opening_groups(keyed, [0, 1, 2, 3, 4]) == ([0, 2, 4], [0, 0, 1, 1, 2])
    reading = per_condition([[Edit("blocks.0.hook_resid_pre", noop, per_row=True)], [], []], owner)
    assert reading[0].row_key is None
    assert opening_groups(reading, [0, 1, 2, 3, 4]) == ([0, 1, 2, 3, 4], [0, 1, 2, 3, 4])
    sparing = per_condition([[Edit("blocks.0.hook_resid_pre", noop, opening=False)], []], [0, 1])
    assert not sparing[0].opening
    # one condition spares the opening, one changes it: the sparing rows share one opening with the edit-less ones
    mixed = per_condition([[Edit("blocks.0.hook_resid_pre", noop, opening=False)],
                           [Edit("blocks.0.hook_resid_pre", noop)], []], [0, 0, 1, 1, 2])
    assert opening_groups(mixed, [0, 1, 2, 3, 4]) == ([0, 2], [0, 0, 1, 1, 0])


def test_per_row_edits_that_change_the_opening_give_whole_prompt_results_in_every_pass(planted):
    """Per-row edits that change the opening (several conditions in one batch) compute the opening's cache per
    batch: last_logits and continuation_logprobs must give what running every prompt whole gives, as generate
    does (the batch's own edits must not be attached while that cache is computed)."""
    folder, loaded, prompts = planted
    e_h = load_planted_directions(folder)["harm"]
    owner = [i % 2 for i in range(len(prompts))]
    from refusal_lens.core.edit import per_condition

    edits = per_condition([ablation_edits(e_h, loaded.n_layers), addition_edits(3 * e_h, 1)], owner)
    assert any(e.opening and e.per_row for e in edits)
    cached, whole = both(loaded)
    torch.testing.assert_close(cached.last_logits(prompts, edits), whole.last_logits(prompts, edits),
                               rtol=1e-4, atol=1e-4)
    conts = [[7, 8, 9]] * len(prompts)
    a, b = cached.continuation_logprobs(prompts, conts, edits), whole.continuation_logprobs(prompts, conts, edits)
    assert a[1] == pytest.approx(b[1], rel=1e-4, abs=1e-4)
    assert cached.generate(prompts, 5, edits) == whole.generate(prompts, 5, edits)


def test_the_openings_cache_computes_the_logits_of_one_position_only(planted):
    """The opening's cache keeps keys and values only: the unembedding runs on one position per row, not on the
    whole opening of every row of a per-batch cache (which held [rows, opening, d_vocab])."""
    folder, loaded, prompts = planted
    e_h = load_planted_directions(folder)["harm"]
    from refusal_lens.core.edit import per_condition

    owner = [i % 2 for i in range(len(prompts))]
    edits = per_condition([ablation_edits(e_h, loaded.n_layers), addition_edits(3 * e_h, 1)], owner)
    cached, _ = both(loaded)
    seen = []
    hook = loaded.hf_model.get_output_embeddings().register_forward_hook(lambda m, a, out: seen.append(out.shape))
    try:
        cached._prefix_cache(shared_opening(prompts), edits, list(range(4)))
    finally:
        hook.remove()
    assert seen and all(shape[-2] == 1 for shape in seen), seen


def test_an_explicit_template_sets_the_position_classes_from_its_own_text(planted):
    """encode_prompt with a hand-written template (refusal_direction's Qwen one): the opening and the
    post-instruction tokens are those of that template, the user's text sits between them, and a template
    without exactly one {instruction} is refused naming what is allowed."""
    from refusal_lens.core.chat import encode_prompt

    _, loaded, _ = planted
    tok = loaded.tokenizer
    template = "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"
    enc = encode_prompt(tok, "How do I bake bread?", 64, template)
    assert enc.text == template.replace("{instruction}", "How do I bake bread?")
    assert enc.ids == tok(enc.text, add_special_tokens=False)["input_ids"]
    opening = tok(template.split("{instruction}")[0], add_special_tokens=False)["input_ids"]
    post = tok(template.split("{instruction}")[1], add_special_tokens=False)["input_ids"]
    assert enc.ids[: enc.n_opening] == opening and enc.ids[len(enc.ids) - enc.n_post_instruction:] == post
    default = encode_prompt(tok, "How do I bake bread?", 64)
    assert default.text != enc.text  # the tokenizer's own template is a different one
    with pytest.raises(ValueError, match="exactly one"):
        encode_prompt(tok, "x", 64, "<|im_start|>user\n<|im_end|>")


def test_continuation_logprobs_match_one_unbatched_forward_per_prompt(planted):
    """Continuations of different lengths in one left-padded batch (only the positions predicting a response
    token are computed): the first-token log-probs and the summed NLL equal those of each prompt run alone."""
    _, loaded, prompts = planted
    conts = [[7, 8, 9, 10][: i % 4] for i in range(len(prompts))]  # lengths 0..3, mixed in every batch
    first, nll, _ = Intervener(loaded, 4, model=loaded.hf_model).continuation_logprobs(prompts, conts)
    for p, c, f, n in zip(prompts, conts, first, nll):
        with torch.no_grad():
            logp = loaded.hf_model(input_ids=torch.tensor([p.ids + c])).logits[0].float().log_softmax(-1)
        last = len(p.ids) - 1
        torch.testing.assert_close(f, logp[last], rtol=1e-4, atol=1e-4)
        want = -sum(float(logp[last + j, t]) for j, t in enumerate(c))
        assert n == pytest.approx(want, rel=1e-4, abs=1e-4)
        # its own [d_vocab] storage: a view would keep the batch row's [keep, d_vocab] log-probs alive
        assert f.untyped_storage().nbytes() == f.numel() * f.element_size()


def test_rows_that_end_leave_the_batch_and_every_row_gets_generates_tokens(planted):
    """Greedy decoding drops a row from the batch (and its keys and values from the cache) once it produces an end
    token: each row's tokens are those of ``transformers``' ``generate`` on the whole batch, with the shared opening
    and without, clean and edited, and in shared batches of conditions whose edits read the rows (after rows have
    left, each generated column's edit must still go to its own rows)."""
    from refusal_lens.core.intervene import make_batch

    folder, loaded, prompts = planted
    e_h = load_planted_directions(folder)["harm"]
    model, pad = loaded.hf_model, loaded.tokenizer.pad_token_id
    free = Intervener(loaded, 16, model=model)
    free.eos = set()
    end = free.generate(prompts, 8)[0][2]  # a token row 0 produces third: an end that some rows reach early

    def reference(edits):
        batch = make_batch(prompts, list(range(len(prompts))), pad)
        positions = (batch.mask.cumsum(-1) - 1).masked_fill(batch.mask == 0, 1)
        with free.edits(edits, batch):
            new = model.generate(input_ids=batch.ids, attention_mask=batch.mask, position_ids=positions,
                                 max_new_tokens=8, do_sample=False, pad_token_id=pad, eos_token_id=[end])
        seqs = new[:, batch.ids.shape[1]:].tolist()
        return [s[: s.index(end)] if end in s else s for s in seqs]

    cases = {"clean": [], "ablation": ablation_edits(e_h, loaded.n_layers), "addition": addition_edits(3 * e_h, 1)}
    for name, edits in cases.items():
        expected = reference(edits)
        for share in (True, False):
            iv = Intervener(loaded, 16, model=model, share_opening=share)
            iv.eos = {end}
            assert iv.generate(prompts, 8, edits) == expected, (name, share)
    lengths = [len(s) for s in reference([])]
    assert min(lengths) < 8 and len(set(lengths)) > 1  # rows ended at different steps: some left the batch early
    fed: list[int] = []  # rows of each one-token step: a row is fed each token it made before its end
    handle = model.get_input_embeddings().register_forward_hook(
        lambda m, args, out: fed.append(args[0].shape[0]) if args[0].shape[1] == 1 else None)
    try:
        iv.generate(prompts, 8)
    finally:
        handle.remove()
    assert sum(fed) == sum(min(n, 7) for n in lengths) < 7 * len(prompts)

    iv = Intervener(loaded, 16, model=model)
    iv.eos = {end}
    conditions = [(prompts, []), (prompts, addition_edits(3 * e_h, 1)), (prompts[2:], ablation_edits(e_h, 2))]
    alone = [iv.generate(ps, 8, edits) for ps, edits in conditions]
    assert alone[0] != alone[1]  # the edit changes the tokens, so a row given another's edit would show
    assert iv.generate_conditions(conditions, 8) == alone
