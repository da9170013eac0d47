"""Sampling: golden values, agreement with transformers' own logits processors, seeds and fast paths."""

from __future__ import annotations

import dataclasses
import json
import math
import random

import pytest
import torch

from model.sampling import (
    GPT_OSS_DEFAULTS,
    PRESETS,
    SamplingParams,
    apply_min_p,
    apply_no_repeat_ngram,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    make_generator,
    process_logits,
    resolve_seed,
    sample_next,
)

X = float("-inf")
GOLDEN_LOGITS = [2.0, 1.0, 0.5, -0.5, -1.0, 0.0]
GOLDEN_CONTEXT = [0, 3, 3, 5]


def _logits() -> torch.Tensor:
    return torch.tensor([GOLDEN_LOGITS])


def assert_same(actual: torch.Tensor, expected: torch.Tensor | list, atol: float = 1e-5) -> None:
    """Same -inf positions and finite values within atol."""
    expected = torch.as_tensor(expected, dtype=torch.float32).reshape(actual.shape)
    actual = actual.float()
    assert torch.equal(torch.isneginf(actual), torch.isneginf(expected)), (actual, expected)
    finite = torch.isfinite(expected)
    assert torch.isfinite(actual[finite]).all(), (actual, expected)
    assert torch.allclose(actual[finite], expected[finite], atol=atol, rtol=0), (actual, expected)


# --------------------------------------------------------------------------------------------------------
# 1. Golden table (docs/streamlit-and-sampling.md, HF 5.23)
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "op, expected",
    [
        (lambda l: apply_repetition_penalty(l, GOLDEN_CONTEXT, 1.5), [1.333333, 1.0, 0.5, -0.75, -1.0, 0.0]),
        (lambda l: apply_temperature(l, 0.5), [4, 2, 1, -1, -2, 0]),
        (lambda l: apply_top_k(l, 2), [2, 1, X, X, X, X]),
        (lambda l: apply_top_p(l, 0.5), [2, X, X, X, X, X]),
        (lambda l: apply_top_p(l, 0.7), [2, 1, X, X, X, X]),
        (lambda l: apply_top_p(l, 0.9), [2, 1, 0.5, X, X, 0.0]),
        (lambda l: apply_min_p(l, 0.1), [2, 1, 0.5, X, X, 0]),
        (lambda l: apply_min_p(l, 0.3), [2, 1, X, X, X, X]),
        (lambda l: apply_min_p(apply_temperature(l, 2.0), 0.3), [1, 0.5, 0.25, X, X, 0]),
        (lambda l: apply_top_p(apply_temperature(l, 0.5), 0.9), [4, 2, X, X, X, X]),
        (lambda l: apply_no_repeat_ngram(l, [0, 3, 5, 1, 3], 2), [2.0, 1.0, 0.5, -0.5, -1.0, X]),
    ],
    ids=[
        "rep1.5", "temp0.5", "topk2", "topp0.5", "topp0.7", "topp0.9", "minp0.1", "minp0.3",
        "temp2-minp0.3", "temp0.5-topp0.9", "ngram2",
    ],
)
def test_golden_table(op, expected) -> None:
    logits = _logits()
    before = logits.clone()
    assert_same(op(logits), expected)
    assert torch.equal(logits, before), "processors must not modify their input"


@pytest.mark.parametrize(
    "params, expected",
    [
        (SamplingParams(temperature=1.0, repetition_penalty=1.5), [1.333333, 1.0, 0.5, -0.75, -1.0, 0.0]),
        (SamplingParams(temperature=2.0, min_p=0.3), [1, 0.5, 0.25, X, X, 0]),
        (SamplingParams(temperature=0.5, top_p=0.9), [4, 2, X, X, X, X]),
        (SamplingParams(temperature=1.0, top_k=2), [2, 1, X, X, X, X]),
    ],
)
def test_golden_through_process_logits(params, expected) -> None:
    assert_same(process_logits(_logits(), GOLDEN_CONTEXT, params), expected)


def test_no_repeat_ngram_golden_with_every_context_form() -> None:
    ids = [0, 3, 5, 1, 3]
    for ctx in (ids, [ids], torch.tensor(ids), torch.tensor([ids])):
        out = apply_no_repeat_ngram(_logits(), ctx, 2)
        assert torch.isneginf(out).nonzero().tolist() == [[0, 5]]


def test_per_row_context_and_out_of_vocab_ids() -> None:
    logits = torch.tensor([GOLDEN_LOGITS, GOLDEN_LOGITS])
    out = apply_repetition_penalty(logits, [[0, 3, 999], [5, 5, -1]], 1.5)
    assert_same(out[0], [1.333333, 1.0, 0.5, -0.75, -1.0, 0.0])
    assert_same(out[1], GOLDEN_LOGITS)  # id 5's logit is 0: unchanged; ids outside the vocab ignored
    with pytest.raises(ValueError, match="different lengths"):
        apply_repetition_penalty(logits, [[0, 3], [5]], 1.5)
    with pytest.raises(ValueError, match="3 rows but logits have batch 2"):
        apply_no_repeat_ngram(logits, torch.zeros(3, 4, dtype=torch.long), 2)


# --------------------------------------------------------------------------------------------------------
# 2. Agreement with transformers' own processors
# --------------------------------------------------------------------------------------------------------


def _hf_chain(p: SamplingParams):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    chain = LogitsProcessorList()
    if p.repetition_penalty != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(penalty=p.repetition_penalty))
    if p.no_repeat_ngram_size > 0:
        chain.append(NoRepeatNGramLogitsProcessor(ngram_size=p.no_repeat_ngram_size))
    if p.temperature != 1.0:
        chain.append(TemperatureLogitsWarper(temperature=p.temperature))
    if p.top_k > 0:
        chain.append(TopKLogitsWarper(top_k=p.top_k))
    if p.top_p < 1.0:
        chain.append(TopPLogitsWarper(top_p=p.top_p))
    if p.min_p > 0.0:
        chain.append(MinPLogitsWarper(min_p=p.min_p))
    return chain


def _random_case(rng: random.Random, vocab: int = 300, batch: int = 3):
    params = SamplingParams(
        temperature=rng.choice([1.0, rng.uniform(0.2, 2.5)]),
        top_k=rng.choice([0, rng.randint(1, 10), rng.randint(1, vocab), vocab + 5]),
        top_p=rng.choice([1.0, rng.uniform(0.05, 1.0)]),
        min_p=rng.choice([0.0, rng.uniform(0.0, 0.6), 1.0]),
        repetition_penalty=rng.choice([1.0, rng.uniform(0.5, 2.0)]),
        no_repeat_ngram_size=rng.choice([0, 0, 1, 2, 3]),
    )
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    logits = torch.randn(batch, vocab, generator=gen) * rng.uniform(0.5, 4.0)
    if rng.random() < 0.3:  # coarse values create ties at the top-k / top-p boundaries
        logits = (logits * 2).round() / 2
    seq = rng.randint(1, 40)
    # a small id range makes repeated ids and repeated n-grams likely
    high = rng.choice([8, vocab])
    context = torch.randint(0, high, (batch, seq), generator=gen)
    return params, logits, context


def test_matches_transformers_processors_on_random_settings() -> None:
    rng = random.Random(1234)
    for case in range(60):
        params, logits, context = _random_case(rng)
        expected = _hf_chain(params)(context, logits.clone())
        actual = process_logits(logits, context, params)
        try:
            assert_same(actual, expected, atol=1e-6)
        except AssertionError as exc:
            raise AssertionError(f"case {case}: {params}") from exc


def test_matches_each_transformers_processor_alone() -> None:
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 300, generator=gen) * 3
    context = torch.randint(0, 12, (3, 30), generator=gen)
    pairs = [
        (RepetitionPenaltyLogitsProcessor(penalty=1.3), lambda l: apply_repetition_penalty(l, context, 1.3)),
        (RepetitionPenaltyLogitsProcessor(penalty=0.7), lambda l: apply_repetition_penalty(l, context, 0.7)),
        (NoRepeatNGramLogitsProcessor(ngram_size=1), lambda l: apply_no_repeat_ngram(l, context, 1)),
        (NoRepeatNGramLogitsProcessor(ngram_size=2), lambda l: apply_no_repeat_ngram(l, context, 2)),
        (NoRepeatNGramLogitsProcessor(ngram_size=3), lambda l: apply_no_repeat_ngram(l, context, 3)),
        (TemperatureLogitsWarper(temperature=0.6), lambda l: apply_temperature(l, 0.6)),
        (TopKLogitsWarper(top_k=17), lambda l: apply_top_k(l, 17)),
        (TopPLogitsWarper(top_p=0.8), lambda l: apply_top_p(l, 0.8)),
        (MinPLogitsWarper(min_p=0.05), lambda l: apply_min_p(l, 0.05)),
    ]
    for hf, ours in pairs:
        assert_same(ours(logits), hf(context, logits.clone()), atol=1e-6)
    # The n-gram case above really bans something (otherwise the comparison would be vacuous).
    assert torch.isneginf(apply_no_repeat_ngram(logits, context, 2)).any()


# --------------------------------------------------------------------------------------------------------
# 3. Greedy, seeds, ties, keep-one, validation
# --------------------------------------------------------------------------------------------------------


def test_greedy_is_argmax_of_penalized_logits() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 500, generator=gen)
    greedy = SamplingParams(temperature=0.0, top_k=5, top_p=0.5)
    assert torch.equal(sample_next(logits, None, greedy), logits.argmax(dim=-1))
    # The penalty applies before the argmax: penalizing the winner can move it.
    strong = dataclasses.replace(greedy, repetition_penalty=1000.0)
    one_row = logits[:1].abs() + 0.1  # all positive so the penalty shrinks the winner
    winner = int(one_row.argmax())
    assert int(sample_next(one_row, [winner], strong)) != winner
    # process_logits for greedy keeps exactly the argmax.
    processed = process_logits(logits, None, greedy)
    assert torch.equal(torch.isfinite(processed).sum(dim=-1), torch.ones(4, dtype=torch.long))
    assert torch.equal(processed.argmax(dim=-1), logits.argmax(dim=-1))


def _draws(params: SamplingParams, seed: int, steps: int = 20) -> list[int]:
    logits = torch.randn(2, 1000, generator=torch.Generator().manual_seed(3))
    gen = make_generator(seed)
    return [sample_next(logits, None, params, gen).tolist() for _ in range(steps)]


@pytest.mark.parametrize(
    "params", [SamplingParams(temperature=1.0), PRESETS["Balanced"], PRESETS["Creative"]]
)
def test_seed_reproducibility(params: SamplingParams) -> None:
    assert _draws(params, 42) == _draws(params, 42)
    assert _draws(params, 42) != _draws(params, 43)


def test_seed_minus_one_reports_a_seed_that_reproduces() -> None:
    params = SamplingParams(seed=-1)
    drawn = {resolve_seed(params) for _ in range(5)}
    assert all(0 <= s < 2**31 for s in drawn)
    assert len(drawn) > 1, "seed -1 must draw a fresh seed each time"
    seed = drawn.pop()
    fixed = dataclasses.replace(params, seed=seed)
    assert resolve_seed(fixed) == seed
    assert _draws(params, seed) == _draws(fixed, resolve_seed(fixed))


def test_top_k_keeps_ties_at_kth_value() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 2.0, 0.0]])
    out = apply_top_k(logits, 2)
    assert torch.isfinite(out).nonzero()[:, 1].tolist() == [0, 2, 3, 4]
    # The sampling fast path must keep the tied tokens too: all four ids show up.
    params = SamplingParams(temperature=1.0, top_k=2)
    gen = make_generator(0)
    seen = {int(sample_next(logits, None, params, gen)) for _ in range(300)}
    assert seen == {0, 2, 3, 4}


def test_top_p_and_min_p_keep_at_least_one_token() -> None:
    logits = torch.tensor([[5.0, 4.9, 1.0, 0.0]])
    assert torch.isfinite(apply_top_p(logits, 1e-9)).nonzero()[:, 1].tolist() == [0]
    assert torch.isfinite(apply_min_p(logits, 1.0)).nonzero()[:, 1].tolist() == [0]
    flat = torch.zeros(1, 5)  # uniform: min_p 1.0 keeps all tied maxima, top_p tiny keeps one
    assert int(torch.isfinite(apply_top_p(flat, 1e-6)).sum()) == 1
    assert int(torch.isfinite(apply_min_p(flat, 1.0)).sum()) == 5


def test_top_p_set_that_exactly_reaches_p_is_enough() -> None:
    from transformers.generation.logits_process import TopPLogitsWarper

    flat = torch.zeros(1, 4)  # probabilities 0.25 each: two tokens reach 0.5 exactly
    out = apply_top_p(flat, 0.5)
    assert int(torch.isfinite(out).sum()) == 2
    assert_same(out, TopPLogitsWarper(top_p=0.5)(None, flat.clone()))


def test_fast_path_matches_full_distribution() -> None:
    """sample_next's top-k fast path draws from exactly softmax(process_logits(...))."""
    from model.sampling import _penalties, _reduced_candidates

    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(3, 400, generator=gen) * 2
    context = torch.randint(0, 400, (3, 25), generator=gen)
    for params in (
        PRESETS["Balanced"],
        PRESETS["Creative"],
        SamplingParams(temperature=1.3, top_k=30, min_p=0.1, no_repeat_ngram_size=2),
    ):
        reduced = _reduced_candidates(_penalties(logits.clone(), context, params), params)
        assert reduced is not None
        values, ids = reduced
        fast = torch.zeros(3, 400).scatter_(1, ids, values.softmax(dim=-1))
        full = process_logits(logits, context, params).softmax(dim=-1)
        assert torch.allclose(fast, full, atol=1e-6)


def test_sampled_tokens_are_always_allowed() -> None:
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 300, generator=gen) * 2
    context = torch.randint(0, 300, (2, 50), generator=gen)
    rng = make_generator(9)
    for params in (PRESETS["Balanced"], SamplingParams(temperature=0.9, top_p=0.5, min_p=0.1)):
        allowed = torch.isfinite(process_logits(logits, context, params))
        for _ in range(50):
            ids = sample_next(logits, context, params, rng)
            assert allowed[torch.arange(2), ids].all()


def test_bf16_logits_and_1d_input() -> None:
    logits = torch.tensor(GOLDEN_LOGITS, dtype=torch.bfloat16)
    out = sample_next(logits, [0], SamplingParams(temperature=0.0))
    assert out.dtype == torch.long and out.tolist() == [0]
    assert process_logits(logits, None, SamplingParams(temperature=1.0)).dtype == torch.float32


def test_no_allowed_token_gives_clear_error() -> None:
    logits = torch.zeros(1, 3)
    params = SamplingParams(temperature=1.0, no_repeat_ngram_size=1)
    with pytest.raises(ValueError, match="no allowed token"):
        sample_next(logits, [0, 1, 2], params, make_generator(0))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"min_p": -0.1}, r"min_p must be in \[0, 1\]"),
        ({"min_p": 1.1}, r"min_p must be in \[0, 1\]"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ({"no_repeat_ngram_size": -2}, "no_repeat_ngram_size must be >= 0"),
        ({"seed": -5}, "seed must be -1"),
        ({"stop": ("",)}, "stop strings must not be empty"),
    ],
)
def test_validation_errors_are_clear(kwargs, message) -> None:
    params = SamplingParams(**kwargs)
    with pytest.raises(ValueError, match=message):
        params.validate()
    with pytest.raises(ValueError, match=message):
        sample_next(torch.zeros(1, 4), None, params)


def test_type_errors_name_the_field() -> None:
    with pytest.raises(TypeError, match="temperature must be a number"):
        SamplingParams(temperature="hot")
    with pytest.raises(TypeError, match="top_k must be an integer"):
        SamplingParams(top_k=2.5)
    with pytest.raises(TypeError, match="stop must contain only strings"):
        SamplingParams(stop=("END", 3))


# --------------------------------------------------------------------------------------------------------
# Parameters: presets, dict round trip
# --------------------------------------------------------------------------------------------------------


def test_dict_round_trip_and_unknown_keys() -> None:
    params = SamplingParams(temperature=0.6, top_k=40, stop=["The end", "\n\n"], seed=7)
    assert params.stop == ("The end", "\n\n")
    text = json.dumps(params.to_dict())
    back = SamplingParams.from_dict(json.loads(text))
    assert back == params
    assert SamplingParams.from_dict({"temperature": 1}) == SamplingParams(temperature=1.0)
    with pytest.raises(ValueError, match=r"unknown sampling setting\(s\) \['top-p'\]"):
        SamplingParams.from_dict({"top-p": 0.9})
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams.from_dict({"top_p": 2})


def test_presets() -> None:
    assert set(PRESETS) == {"Greedy", "Balanced", "Creative"}
    for params in [*PRESETS.values(), GPT_OSS_DEFAULTS]:
        params.validate()
    assert PRESETS["Greedy"].greedy
    b = PRESETS["Balanced"]
    assert (b.temperature, b.top_k, b.top_p, b.repetition_penalty) == (0.7, 50, 0.95, 1.1)
    c = PRESETS["Creative"]
    assert (c.temperature, c.top_k, c.top_p, c.min_p) == (1.0, 200, 0.98, 0.02)
    g = GPT_OSS_DEFAULTS
    assert (g.temperature, g.top_p, g.top_k, g.min_p, g.repetition_penalty) == (1.0, 1.0, 0, 0.0, 1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.temperature = 2.0  # shared presets must not be mutable


def test_hf_kwargs_are_explicit() -> None:
    kw = PRESETS["Creative"].to_hf_kwargs()
    assert kw["do_sample"] is True and kw["top_k"] == 200 and kw["min_p"] == 0.02
    assert GPT_OSS_DEFAULTS.to_hf_kwargs()["top_k"] == 0  # not HF's silent 50
    assert PRESETS["Greedy"].to_hf_kwargs()["do_sample"] is False


# --------------------------------------------------------------------------------------------------------
# 4. Distribution sanity
# --------------------------------------------------------------------------------------------------------


def test_top_k_sampling_distribution() -> None:
    logits = torch.tensor([1.0, 2.0, 0.5, 1.5, -1.0])
    params = SamplingParams(temperature=1.0, top_k=2, seed=123)
    n = 2000
    ids = sample_next(logits.expand(n, -1), None, params, make_generator(resolve_seed(params)))
    counts = torch.bincount(ids, minlength=5).tolist()
    assert counts[0] == counts[2] == counts[4] == 0
    p1 = math.exp(2.0) / (math.exp(2.0) + math.exp(1.5))  # 0.622
    assert abs(counts[1] / n - p1) < 0.05
    assert abs(counts[3] / n - (1 - p1)) < 0.05
    # One token at a time from one generator gives the same kind of distribution.
    gen = make_generator(5)
    seq = [int(sample_next(logits, None, params, gen)) for _ in range(n)]
    assert set(seq) == {1, 3}
    assert abs(seq.count(1) / n - p1) < 0.05


def test_full_vocab_path_distribution() -> None:
    """Without top-k the draw covers the whole (filtered) vocabulary; frequencies follow the softmax."""
    logits = torch.tensor(GOLDEN_LOGITS)
    params = SamplingParams(temperature=1.0, min_p=0.1)  # keeps ids 0, 1, 2, 5
    n = 4000
    ids = sample_next(logits.expand(n, -1), None, params, make_generator(77))
    freq = torch.bincount(ids, minlength=6).double() / n
    expected = process_logits(logits, None, params).softmax(dim=-1)[0].double()
    assert freq[3] == 0 and freq[4] == 0
    assert torch.allclose(freq, expected, atol=0.03), (freq, expected)


@pytest.mark.parametrize("u, probs, expected", [
    (1.0, [0.2, 0.8, 0.0, 0.0], 1),  # u == total (rounding corner): last token with probability > 0
    (0.0, [0.0, 0.0, 1.0, 0.0], 2),  # u == 0 never picks a leading removed token
    (0.5, [0.25, 0.0, 0.25, 0.5], 3),  # cdf [.25 .25 .5 1]: u=.5 lands past the removed id 1 and id 2
])
def test_draw_never_picks_removed_tokens(monkeypatch, u, probs, expected) -> None:
    from model import sampling

    def fixed_rand(shape, **kwargs):
        return torch.full(shape, u, dtype=kwargs.get("dtype", torch.float64))

    monkeypatch.setattr(sampling.torch, "rand", fixed_rand)
    assert sampling._draw(torch.tensor([probs]), None).tolist() == [[expected]]
