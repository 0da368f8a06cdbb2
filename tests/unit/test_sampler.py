"""The batched Sampler on synthetic logits (small vocabulary, fake Requests): no model.

Processed logits are observed through logprobs: with `logprobs=V` the top-logprobs list holds
the log-softmax of every token after processors, bias, penalties and the min_tokens mask, so
differences of its values are differences of the processed logits.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from metroline.engine.request import MAX_LOGPROBS, MAX_N, Request, SamplingParams
from metroline.engine.sampler import Sampler
from metroline.errors import InvalidRequestError

V = 8
EOS = 7
_ids = itertools.count()


def req(prompt=(0, 1), output=(), eos=(EOS,), rid=None, sample_index=0, **sp) -> Request:
    r = Request(rid or f"r{next(_ids)}", list(prompt), SamplingParams(**sp),
                eos_token_ids=frozenset(eos), sample_index=sample_index)
    r.output_token_ids = list(output)
    return r


def logits_of(probs) -> torch.Tensor:
    """A logits row whose softmax is `probs` (which need not be normalized)."""
    return torch.tensor(probs, dtype=torch.float64).log().float()


def rows(*rs) -> torch.Tensor:
    return torch.stack([torch.as_tensor(r, dtype=torch.float32) for r in rs])


def processed(sampler: Sampler, row, r: Request) -> torch.Tensor:
    """The request's processed log-softmax over the whole vocabulary (through logprobs=V)."""
    r.sampling_params.logprobs = V
    res = sampler(rows(row), [r])[0]
    out = torch.full((V,), float("nan"))
    for t, lp in res.top_logprobs:
        out[t] = lp
    assert not out.isnan().any()
    return out


def assert_same_logits(got_logsoftmax: torch.Tensor, expected_logits) -> None:
    """Equal up to the additive constant that log-softmax removes; -inf where expected."""
    exp = torch.log_softmax(torch.as_tensor(expected_logits, dtype=torch.float32), dim=-1)
    assert torch.equal(torch.isinf(got_logsoftmax), torch.isinf(exp))
    fin = ~torch.isinf(exp)
    torch.testing.assert_close(got_logsoftmax[fin], exp[fin], atol=1e-5, rtol=1e-5)


def support(row, n_draws=400, **sp) -> set[int]:
    """Tokens drawn over n_draws differently seeded requests (one batched call)."""
    s = Sampler(V)
    reqs = [req(seed=1000 + i, **sp) for i in range(n_draws)]
    res = s(rows(*[row] * n_draws), reqs)
    return {x.token_id for x in res}


# ---------------------------------------------------------------------- greedy & temperature

def test_greedy_is_argmax_per_row():
    s = Sampler(V)
    batch = torch.randn(6, V, generator=torch.Generator().manual_seed(0))
    res = s(batch, [req(temperature=0.0) for _ in range(6)])
    assert [r.token_id for r in res] == batch.argmax(dim=-1).tolist()


def test_greedy_is_deterministic_and_ignores_filters():
    s = Sampler(V)
    row = logits_of([0.1, 0.05, 0.3, 0.2, 0.1, 0.1, 0.1, 0.05])
    for _ in range(5):
        assert s(rows(row), [req(temperature=0.0, top_k=3, top_p=0.5)])[0].token_id == 2


def test_sampler_does_not_modify_callers_logits():
    s = Sampler(V)
    batch = torch.randn(3, V, generator=torch.Generator().manual_seed(1))
    before = batch.clone()
    s(batch, [req(temperature=0.0, repetition_penalty=2.0, logit_bias={3: 5.0}),
              req(temperature=0.8, presence_penalty=1.0, output=[1, 2], top_k=2, seed=3),
              req(temperature=1.0, min_tokens=4, logprobs=2)])
    assert torch.equal(batch, before)


def test_temperature_sharpens_and_flattens():
    # Two tokens with probabilities 0.75 / 0.25: at temperature T the draw follows softmax(l/T).
    row = logits_of([0.75, 0.25] + [1e-30] * (V - 2))
    n = 2000
    for temp in (0.5, 1.0, 2.0):
        drawn = support_counts(row, n, temperature=temp)
        w = torch.tensor([0.75, 0.25]) ** (1 / temp)
        p0 = float(w[0] / w.sum())
        frac = drawn.get(0, 0) / n
        assert abs(frac - p0) < 4 * math.sqrt(p0 * (1 - p0) / n), (temp, frac, p0)
        assert set(drawn) <= {0, 1}


def support_counts(row, n, **sp) -> dict[int, int]:
    s = Sampler(V)
    res = s(rows(*[row] * n), [req(seed=50_000 + i, **sp) for i in range(n)])
    counts: dict[int, int] = {}
    for r in res:
        counts[r.token_id] = counts.get(r.token_id, 0) + 1
    return counts


def test_tiny_temperature_is_greedy():
    row = logits_of([0.2, 0.3, 0.5, 0, 0, 0, 0, 0])
    assert support(row, temperature=1e-6) == {2}


# --------------------------------------------------------------------------- filters

# Probabilities, descending (rank = token id), and logits with that softmax.
FLAT_P = [0.30, 0.20, 0.15, 0.12, 0.10, 0.06, 0.04, 0.03]
FLAT = logits_of(FLAT_P)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_top_k_keeps_exactly_k(k):
    assert support(FLAT, top_k=k) == set(range(k))


def test_top_k_disabled_and_larger_than_vocab():
    assert support(FLAT, n_draws=600, top_k=0) == set(range(V))
    assert support(FLAT, n_draws=600, top_k=-1) == set(range(V))
    assert support(FLAT, n_draws=600, top_k=V + 10) == set(range(V))


# Cumulative masses of POW2 (descending): 0.5, 0.75, 0.875, 0.9375, ... The smallest prefix
# reaching p: p in (0, .5] -> 1 token, (.5, .75] -> 2, (.75, .875] -> 3, (.875, .9375] -> 4.
POW2 = [0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.0078125]


@pytest.mark.parametrize("p,kept", [(0.3, 1), (0.6, 2), (0.74, 2), (0.8, 3), (0.9, 4), (0.95, 5)])
def test_top_p_keeps_smallest_prefix_reaching_p(p, kept):
    # Shuffle the order so that the filter has to sort.
    perm = [3, 0, 6, 1, 7, 2, 5, 4]
    row = [0.0] * V
    for rank, tok in enumerate(perm):
        row[tok] = POW2[rank]
    assert support(logits_of(row), n_draws=600, top_p=p) == set(perm[:kept])


def test_top_p_one_keeps_everything_even_next_to_a_filtered_row():
    # A row with top_p = 1 in a batch where another row sorts must keep its whole tail.
    s = Sampler(V)
    n = 600
    reqs, batch = [], []
    for i in range(n):
        reqs += [req(seed=i, top_p=1.0), req(seed=10_000 + i, top_p=0.25)]
        batch += [FLAT, FLAT]
    res = s(rows(*batch), reqs)
    assert {r.token_id for r in res[0::2]} == set(range(V))
    assert {r.token_id for r in res[1::2]} == {0}


def test_top_p_applies_to_what_top_k_kept():
    # probs .4 .3 .2 .1; top_k=2 leaves .4/.3 -> renormalized .571/.429: top_p=.5 keeps only 0.
    row = logits_of([0.4, 0.3, 0.2, 0.1, 0, 0, 0, 0])
    assert support(row, top_k=2, top_p=0.5) == {0}
    assert support(row, top_k=2, top_p=0.6) == {0, 1}
    assert support(row, top_k=3, top_p=0.6) == {0, 1}


@pytest.mark.parametrize("min_p,kept", [(0.0, 8), (0.11, 7), (0.21, 5), (0.35, 4), (0.41, 3),
                                        (0.55, 2), (0.7, 1), (1.0, 1)])
def test_min_p_keeps_tokens_above_fraction_of_max(min_p, kept):
    # Probabilities relative to the max (0.30): 1, .667, .5, .4, .333, .2, .133, .1
    assert support(FLAT, n_draws=800, min_p=min_p) == set(range(kept))


def test_filters_combine():
    assert support(FLAT, n_draws=600, top_k=4, min_p=0.45) == {0, 1, 2}
    assert support(FLAT, n_draws=600, top_k=6, top_p=0.5, min_p=0.1) == {0, 1}


# ------------------------------------------------------------------------- penalties

BASE = [2.0, -1.0, 0.5, -3.0, 1.5, 0.0, 4.0, -0.5]


def test_repetition_penalty_over_prompt_and_output():
    s = Sampler(V)
    r = req(prompt=[0, 1, 1], output=[4, 3], repetition_penalty=2.0)
    exp = list(BASE)
    for t in {0, 1, 4, 3}:
        exp[t] = exp[t] / 2.0 if exp[t] > 0 else exp[t] * 2.0
    assert_same_logits(processed(s, BASE, r), exp)


def test_repetition_penalty_below_one_rewards():
    s = Sampler(V)
    r = req(prompt=[2], output=[7], repetition_penalty=0.5)
    exp = list(BASE)
    exp[2] = 0.5 / 0.5
    exp[7] = -0.5 * 0.5
    assert_same_logits(processed(s, BASE, r), exp)


def test_presence_and_frequency_penalties_over_output_only():
    s = Sampler(V)
    # Token 0 is only in the prompt: untouched. Token 4 twice, 6 three times, 3 once.
    r = req(prompt=[0, 0, 4], output=[4, 6, 6, 4, 6, 3], presence_penalty=0.5,
            frequency_penalty=0.25)
    exp = list(BASE)
    exp[4] -= 0.5 + 2 * 0.25
    exp[6] -= 0.5 + 3 * 0.25
    exp[3] -= 0.5 + 1 * 0.25
    assert_same_logits(processed(s, BASE, r), exp)


def test_negative_presence_penalty_and_no_output():
    s = Sampler(V)
    assert_same_logits(processed(s, BASE, req(output=[5], presence_penalty=-1.0)),
                       [b + (1.0 if i == 5 else 0.0) for i, b in enumerate(BASE)])
    # Nothing generated yet: nothing to penalize, even though the prompt has tokens.
    assert_same_logits(processed(s, BASE, req(prompt=[6, 6], presence_penalty=2.0,
                                               frequency_penalty=2.0)), BASE)


def test_penalties_stack_in_documented_order():
    # logit_bias first, then repetition (sign decided after the bias), then presence/frequency.
    s = Sampler(V)
    r = req(prompt=[1], output=[1, 2], logit_bias={1: 3.0, 2: -1.0}, repetition_penalty=2.0,
            presence_penalty=0.5)
    exp = list(BASE)
    exp[1] = (-1.0 + 3.0) / 2.0 - 0.5
    exp[2] = (0.5 - 1.0) * 2.0 - 0.5
    assert_same_logits(processed(s, BASE, r), exp)


# ----------------------------------------------------------------- bias, min_tokens, procs

def test_logit_bias_forces_and_bans_tokens():
    s = Sampler(V)
    res = s(rows(BASE, BASE, BASE), [req(temperature=0.0, logit_bias={3: 100.0}),
                                     req(temperature=1.0, seed=1, logit_bias={5: 100.0}),
                                     req(temperature=0.0, logit_bias={6: -100.0})])
    assert [r.token_id for r in res] == [3, 5, 0]
    assert support(BASE, logit_bias={6: -100.0, 0: -100.0}, top_k=1) == {4}
    assert_same_logits(processed(s, BASE, req(logit_bias={2: 0.75, 7: -2.0})),
                       [b + {2: 0.75, 7: -2.0}.get(i, 0.0) for i, b in enumerate(BASE)])


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    s = Sampler(V)
    row = [0.0] * V
    row[EOS], row[5], row[2] = 10.0, 9.0, 8.0
    sp = dict(temperature=0.0, min_tokens=3, stop_token_ids=[5])
    assert s(rows(row), [req(output=[1, 1], **sp)])[0].token_id == 2
    assert s(rows(row), [req(output=[1, 1, 1], **sp)])[0].token_id == EOS
    lp = processed(s, row, req(output=[1], **sp))
    assert lp[EOS] == float("-inf") and lp[5] == float("-inf") and lp[2] > float("-inf")
    # Masked for sampled requests too.
    assert support(row, n_draws=200, min_tokens=1, stop_token_ids=[5]) <= set(range(V)) - {5, EOS}


def test_min_tokens_with_ignore_eos_masks_only_stop_ids():
    s = Sampler(V)
    row = [0.0] * V
    row[EOS], row[5], row[2] = 10.0, 9.0, 8.0
    r = req(temperature=0.0, min_tokens=3, stop_token_ids=[5], ignore_eos=True)
    assert s(rows(row), [r])[0].token_id == EOS
    r = req(temperature=0.0, min_tokens=3, stop_token_ids=[EOS, 5], ignore_eos=True)
    assert s(rows(row), [r])[0].token_id == 2  # an explicit stop id is still masked


def test_min_tokens_uses_each_requests_own_eos():
    s = Sampler(V)
    row = [0.0] * V
    row[EOS], row[6], row[1] = 10.0, 9.0, 8.0
    res = s(rows(row, row), [req(temperature=0.0, min_tokens=2, eos=(EOS, 6)),
                             req(temperature=0.0, min_tokens=2, eos=(6,))])
    assert [r.token_id for r in res] == [1, EOS]


def test_logits_processors_are_per_request_and_see_outputs():
    seen = []

    def force_last_plus_one(out_ids, row):
        seen.append(list(out_ids))
        new = torch.full_like(row, float("-inf"))
        new[(out_ids[-1] + 1) % V] = 0.0
        return new

    def ban_argmax(out_ids, row):
        row = row.clone()
        row[row.argmax()] = float("-inf")
        return row

    s = Sampler(V)
    res = s(rows(BASE, BASE, BASE, BASE),
            [req(output=[2, 4], temperature=0.0, logits_processors=[force_last_plus_one]),
             req(temperature=0.0),
             req(temperature=0.0, logits_processors=[ban_argmax, ban_argmax]),
             req(output=[6], temperature=0.9, seed=5, logits_processors=[force_last_plus_one])])
    assert [r.token_id for r in res] == [5, 6, 4, 7]
    assert seen == [[2, 4], [6]]


# -------------------------------------------------------------------------- logprobs

def test_logprobs_of_chosen_token_and_sorted_top_k():
    s = Sampler(V)
    batch = torch.randn(4, V, generator=torch.Generator().manual_seed(7))
    reqs = [req(temperature=0.0, logprobs=3), req(temperature=0.7, seed=1, logprobs=5),
            req(temperature=0.0, logprobs=0), req(temperature=0.0)]
    res = s(batch, reqs)
    ref = torch.log_softmax(batch, dim=-1)
    for i, k in enumerate([3, 5, 0]):
        r = res[i]
        assert r.logprob == pytest.approx(float(ref[i, r.token_id]), abs=1e-6)
        assert len(r.top_logprobs) == k
        vals = [v for _, v in r.top_logprobs]
        assert vals == sorted(vals, reverse=True)
        exp_vals, exp_ids = ref[i].topk(k) if k else (torch.empty(0), torch.empty(0))
        assert [t for t, _ in r.top_logprobs] == exp_ids.tolist()
        torch.testing.assert_close(torch.tensor(vals), exp_vals, atol=1e-6, rtol=0)
    assert res[0].token_id == res[0].top_logprobs[0][0]
    assert res[3].logprob is None and res[3].top_logprobs is None


def test_logprobs_reflect_bias_and_min_tokens_mask():
    s = Sampler(V)
    row = [0.0] * V
    row[EOS] = 5.0
    r = s(rows(row), [req(temperature=0.0, min_tokens=1, logit_bias={3: 2.0}, logprobs=2)])[0]
    assert r.token_id == 3
    exp = torch.log_softmax(torch.tensor([0.0] * 3 + [2.0] + [0.0] * 3 + [float("-inf")]), -1)
    assert r.logprob == pytest.approx(float(exp[3]), abs=1e-6)
    assert r.top_logprobs[0] == (3, pytest.approx(float(exp[3]), abs=1e-6))


# ------------------------------------------------------------------------ seeded draws

def draw_seq(sampler: Sampler, target: Request, row_fn, others=(), n=20, position=0):
    """n draws for `target`, batched with `others` (target at `position`); tokens appended."""
    toks = []
    for step in range(n):
        batch = list(others)
        batch.insert(position, target)
        res = sampler(rows(*[row_fn(step, r) for r in batch]), batch)
        for r, x in zip(batch, res):
            r.output_token_ids.append(x.token_id)
        toks.append(res[position].token_id)
    return toks


def _row(step, r):
    g = torch.Generator().manual_seed(step)
    return torch.randn(V, generator=g) * 0.5


def test_seeded_request_same_tokens_alone_or_in_any_batch():
    sp = dict(seed=1234, temperature=0.9, top_k=6, top_p=0.95, presence_penalty=0.2)
    alone = draw_seq(Sampler(V, seed=0), req(rid="t", **sp), _row)
    others = [req(temperature=1.0),  # unseeded: draws from the sampler's shared generator
              req(temperature=0.0, repetition_penalty=1.3),
              req(temperature=1.5, seed=99, top_p=0.5),
              req(temperature=0.7, min_p=0.2, logprobs=3),
              req(temperature=1.0, top_k=2, logit_bias={1: 3.0})]
    for pos in (0, 3, 5):
        for o in others:
            o.output_token_ids = []
        batched = draw_seq(Sampler(V, seed=pos + 17), req(rid="t", **sp), _row, others,
                           position=pos)
        assert batched == alone
    assert len(set(alone)) > 1


def test_different_seeds_differ_and_same_seed_repeats():
    sp = dict(temperature=1.0)
    a = draw_seq(Sampler(V), req(rid="x", seed=1, **sp), _row)
    b = draw_seq(Sampler(V), req(rid="x", seed=2, **sp), _row)
    a2 = draw_seq(Sampler(V), req(rid="y", seed=1, **sp), _row)
    assert a != b
    assert a == a2


def test_siblings_of_n_get_distinct_streams_and_a_position_its_own_number():
    s = Sampler(V)
    a = draw_seq(s, req(rid="g#0", seed=5, sample_index=0), _row)
    b = draw_seq(s, req(rid="g#1", seed=5, sample_index=1), _row)
    assert a != b
    assert draw_seq(s, req(rid="g#0", seed=5, sample_index=0), _row) == a
    # The number drawn at a position depends on the position alone, not on what was drawn
    # before it (rows verified and thrown away by speculative decoding draw nothing ahead).
    late = req(rid="late", seed=5, sample_index=0)
    late.output_token_ids = list(a[:10])
    assert [s(rows(_row(10, late)), [late])[0].token_id] == a[10:11]


def test_position_uniform_is_uniform():
    from metroline.engine.sampler import position_uniform

    xs = torch.tensor([position_uniform(7, t) for t in range(20000)])
    assert 0 <= float(xs.min()) and float(xs.max()) < 1
    counts = torch.histc(xs, bins=10, min=0, max=1)
    chi2 = float(((counts - 2000) ** 2 / 2000).sum())
    assert chi2 < 27.9  # 9 degrees of freedom, p = 0.001
    assert position_uniform(7, 3) != position_uniform(8, 3) != position_uniform(7, 3, stream=1)


def test_huge_and_negative_seeds_are_accepted():
    for seed in (-1, 2**64 - 1, 2**80 + 3, -(2**70)):
        sp = SamplingParams(seed=seed)
        sp.validate(V)
        r = Request("h", [0], sp, sample_index=3)
        assert 0 <= Sampler(V)(rows(BASE), [r])[0].token_id < V
    # -1 and 2**64 - 1 are the same 64-bit seed.
    assert (draw_seq(Sampler(V), req(rid="a", seed=-1), _row)
            == draw_seq(Sampler(V), req(rid="a", seed=2**64 - 1), _row))


def test_filtered_tokens_never_drawn_over_many_draws():
    # Many draws over a wide vocabulary: a token removed by top-k is never chosen.
    s = Sampler(1000)
    n = 32
    logits = torch.randn(n, 1000, generator=torch.Generator().manual_seed(3))
    allowed = logits.topk(5, dim=-1).indices
    for _ in range(10):
        res = s(logits, [Request(f"w{i}", [0], SamplingParams(top_k=5)) for i in range(n)])
        for i, r in enumerate(res):
            assert r.token_id in allowed[i].tolist()


# ------------------------------------------------------------------------- validation

BAD = [
    (dict(n=0), "n"),
    (dict(n=-1), "n"),
    (dict(n=MAX_N + 1), "n"),
    (dict(n=1.5), "n"),
    (dict(temperature=-1), "temperature"),
    (dict(temperature=-1e-9), "temperature"),
    (dict(temperature=101), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(top_p=-0.5), "top_p"),
    (dict(top_p=1.01), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(min_p=2), "min_p"),
    (dict(min_p=-0.1), "min_p"),
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(repetition_penalty=-1), "repetition_penalty"),
    (dict(repetition_penalty=11), "repetition_penalty"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(presence_penalty=-3), "presence_penalty"),
    (dict(frequency_penalty=2.01), "frequency_penalty"),
    (dict(frequency_penalty=-2.01), "frequency_penalty"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-5), "max_tokens"),
    (dict(max_tokens=3.5), "max_tokens"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=10, max_tokens=5), "min_tokens"),
    (dict(logprobs=MAX_LOGPROBS + 1), "logprobs"),
    (dict(logprobs=-1), "logprobs"),
    (dict(logprobs=1.5), "logprobs"),
    (dict(seed="42"), "seed"),
    (dict(seed=1.0), "seed"),
    (dict(stop=""), "stop"),
    (dict(stop=["ok", ""]), "stop"),
    (dict(stop=[3]), "stop"),
    (dict(stop=[f"s{i}" for i in range(17)]), "stop"),
    (dict(stop_token_ids=[V]), "stop_token_ids"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(stop_token_ids=["3"]), "stop_token_ids"),
    (dict(logit_bias={V: 1.0}), "logit_bias"),
    (dict(logit_bias={-1: 1.0}), "logit_bias"),
    (dict(logit_bias={"3": 1.0}), "logit_bias"),
    (dict(logit_bias={0: 100.5}), "logit_bias"),
    (dict(logit_bias={0: -101}), "logit_bias"),
]


@pytest.mark.parametrize("kwargs,param", BAD, ids=[f"{p}:{k}" for k, p in BAD])
def test_validate_rejects_bad_values_naming_the_param(kwargs, param):
    with pytest.raises(InvalidRequestError) as ei:
        SamplingParams(**kwargs).validate(V)
    assert ei.value.param == param
    assert isinstance(ei.value, ValueError)


@pytest.mark.parametrize("kwargs", [
    dict(), dict(temperature=0), dict(temperature=100), dict(top_k=-1), dict(top_k=V * 10),
    dict(top_p=1.0), dict(top_p=1e-6), dict(min_p=0), dict(min_p=1), dict(max_tokens=None),
    dict(max_tokens=1), dict(min_tokens=5, max_tokens=5), dict(min_tokens=100, max_tokens=None),
    dict(logprobs=0), dict(logprobs=MAX_LOGPROBS), dict(n=MAX_N), dict(seed=0), dict(seed=-3),
    dict(stop="x"), dict(stop=[f"s{i}" for i in range(16)]), dict(stop_token_ids=[0, V - 1]),
    dict(logit_bias={0: 100, V - 1: -100}), dict(repetition_penalty=10),
    dict(presence_penalty=-2, frequency_penalty=2),
])
def test_validate_accepts_boundary_values(kwargs):
    SamplingParams(**kwargs).validate(V)


def test_validate_without_vocab_skips_range_check_and_normalizes():
    sp = SamplingParams(stop="end", stop_token_ids=None, top_k=-1, logit_bias={10**6: 1.0})
    sp.validate()
    assert sp.stop == ["end"] and sp.stop_token_ids == [] and sp.top_k == 0
    with pytest.raises(InvalidRequestError) as ei:
        sp.validate(V)
    assert ei.value.param == "logit_bias"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampling_on_cuda_logits():
    # The generators are CPU ones: noise is drawn on the CPU and moved to the logits' device.
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(0)).cuda()

    def draws(sampler):
        reqs = [req(rid=f"c{i}", seed=i, top_k=3, logprobs=2) for i in range(3)]
        reqs.append(req(rid="c3", temperature=0.0))
        return [[x.token_id for x in sampler(logits, reqs)] for _ in range(10)]

    a, b = draws(Sampler(V)), draws(Sampler(V))
    assert a == b
    allowed = logits.topk(3, dim=-1).indices.tolist()
    for row in a:
        assert all(row[i] in allowed[i] for i in range(3))
        assert row[3] == int(logits[3].argmax())


def test_sampled_frequencies_follow_the_distribution_and_skip_masked_tokens():
    """Inverse-CDF sampling (one uniform per row): 8000 rows of the same logits draw each token
    at its probability (within 4 sigma), a masked token never, and a seeded request the same
    token on every run."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = torch.log(probs).expand(8000, -1).contiguous()  # log 0 = -inf: masked
    s = Sampler(5, seed=3)
    reqs = [req(temperature=1.0) for _ in range(8000)]
    got = torch.tensor([r.token_id for r in s(logits, reqs)])
    freq = torch.bincount(got, minlength=5).double() / 8000
    assert freq[4] == 0
    sigma = (probs * (1 - probs) / 8000).sqrt()
    assert ((freq[:4] - probs[:4]).abs() <= 4 * sigma[:4] + 1e-9).all(), freq
    one = lambda: Sampler(5)(logits[:1], [req(temperature=1.0, seed=42)])[0].token_id  # noqa: E731
    assert len({one() for _ in range(5)}) == 1
