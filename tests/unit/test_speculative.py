"""Speculative decoding without a model: the proposers, the k policy, and the statistics of
verification on a tiny synthetic model (a random bigram table), where drafts from a
deliberately poor proposer must leave the sampled distribution exactly the target's."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metroline.engine.request import Request, SamplingParams
from metroline.engine.sampler import Sampler
from metroline.engine.core import make_proposer
from metroline.engine.speculative import Draft, NgramProposer, SpeculationPolicy, SuffixProposer, as_draft, num_taken

_ids = itertools.count()


def req(prompt, output=(), rid=None, **sp) -> Request:
    r = Request(rid or f"r{next(_ids)}", list(prompt), SamplingParams(**sp), eos_token_ids=frozenset())
    r.output_token_ids = list(output)
    return r


# ----------------------------------------------------------------------------- proposers

def brute_ngram(tokens, k, min_n, max_n):
    """The reference: the longest suffix n-gram's latest earlier occurrence, its continuation."""
    L = len(tokens)
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        pat = tokens[L - n:]
        for end in range(L - 2, n - 2, -1):
            if tokens[end - n + 1:end + 1] == pat:
                return tokens[end + 1:end + 1 + k]
    return []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=40), st.lists(st.integers(0, 5), max_size=10),
       st.integers(1, 6))
def test_ngram_equals_brute_force_as_the_output_grows(prompt, output, k):
    """The incremental index gives what a scan of all the tokens gives, step after step."""
    p = NgramProposer(min_n=1, max_n=3)
    r = req(prompt)
    for t in [None, *output]:
        if t is not None:
            r.output_token_ids.append(t)
        assert p.propose(r, k).token_ids == brute_ngram(r.all_token_ids, k, 1, 3)


def test_ngram_copies_what_followed_the_latest_match():
    p = NgramProposer(min_n=2, max_n=4)
    text = [1, 2, 3, 4, 5, 9, 1, 2, 3, 7, 8, 6, 1, 2, 3]
    assert p.propose(req(text), 3).token_ids == [7, 8, 6]  # latest "1 2 3" is followed by 7 8 6
    assert p.propose(req([1, 2, 3, 4]), 3).token_ids == []  # no earlier occurrence
    r = req([5, 6, 7, 8, 5, 6])
    assert p.propose(r, 10).token_ids == [7, 8, 5, 6]  # the continuation runs to the end
    p.request_finished(r)
    assert r.request_id not in p._index


def test_suffix_learns_from_finished_outputs_and_forgets_the_oldest():
    """An agent's repeated call shape: a finished request's output drafts the next request's,
    from the first tokens on; the corpus is bounded, and counts go when their request does."""
    p = SuffixProposer(depth=4, min_match=2, max_corpus_requests=2, match_factor=4.0)
    shape = [50, 51, 52, 53, 54, 55, 56, 57]
    prompt = [9, 8, 7, 40, 41]
    first = req(prompt, shape)
    assert p.propose(req(prompt + [50, 51]), 4).token_ids == []  # nothing learned yet
    p.request_finished(first)
    assert p.propose(req([1, 2, 3, 40, 41]), 4).token_ids == [50, 51, 52, 53]
    assert p.propose(req([1, 2, 3, 40, 41, 50, 51, 52]), 3).token_ids == [53, 54, 55]
    # Two other requests push the first out of the corpus: its continuation is forgotten.
    for i in range(2):
        p.request_finished(req([60 + i, 61 + i], [70 + i, 71 + i, 72 + i]))
    assert p.propose(req([1, 2, 3, 40, 41]), 4).token_ids == []
    assert all(not any(t in rec[3] for t in shape[1:]) for rec in p.corpus.next.values())


def test_suffix_follows_the_most_frequent_continuation_and_its_probability():
    p = SuffixProposer(depth=3, min_match=1, min_prob=0.5, match_factor=8.0)
    for out in ([1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 5, 6]):
        p.request_finished(req([0], out))
    # After "1 2": 3 twice, 5 once -> 3 (p = 2/3), then 4 (p = 1): 2/3 >= 0.5 holds.
    assert p.propose(req([7, 1, 2]), 4).token_ids[:2] == [3, 4]
    strict = SuffixProposer(depth=3, min_match=1, min_prob=0.9, match_factor=8.0)
    strict.corpus, strict._corpus_outputs = p.corpus, p._corpus_outputs
    assert strict.propose(req([7, 1, 2]), 4).token_ids == []  # 2/3 < 0.9: no draft


def test_suffix_draft_length_follows_the_match_length():
    p = SuffixProposer(depth=6, min_match=1, match_factor=1.0)
    p.request_finished(req([0], list(range(100, 120))))
    assert len(p.propose(req([5, 119 - 10]), 8).token_ids) == 1  # matched 1 token: 1 draft
    assert len(p.propose(req([100, 101, 102, 103]), 8).token_ids) == 4  # matched 4: 4 drafts


def test_policy_adapts_k_probes_and_stops_above_max_batch():
    pol = SpeculationPolicy(k_max=5, max_batch=4, probe_every=3)
    r = req([1, 2])
    assert pol.num_drafts(r, batch_size=1) == pol.best_k(pol.prior) > 0
    assert pol.num_drafts(r, batch_size=5) == 0  # the batch is too large to pay
    for _ in range(8):  # every draft rejected
        r.num_spec_drafted += 5
        pol.observe(r)
    assert pol.acceptance(r.request_id) < 0.15
    assert [pol.num_drafts(r, 1) for _ in range(6)] == [0, 0, 1, 0, 0, 1]  # probes now and then
    for _ in range(8):  # then everything accepted
        r.num_spec_drafted += 5
        r.num_spec_accepted += 5
        pol.observe(r)
    assert pol.acceptance(r.request_id) > 0.9 and pol.num_drafts(r, 1) == 5
    pol.forget(r.request_id)
    assert pol._stats == {} and pol._seen == {}
    assert SpeculationPolicy(k_max=3, adaptive=False, max_batch=None).num_drafts(r, 100) == 3


def test_best_k_maximizes_tokens_per_cost():
    """k maximizes (1 + a + ... + a^k) / (1 + step_cost * k): none when a draft is less likely
    to be accepted than it costs, more the likelier it is."""
    pol = SpeculationPolicy(k_max=8, step_cost=0.14)
    assert pol.best_k(0.1) == 0 and pol.best_k(0.3) == 1
    ks = [pol.best_k(a / 10) for a in range(11)]
    assert ks == sorted(ks) and ks[-1] == 8
    for a in (0.5, 0.8):
        rate = [sum(a ** i for i in range(k + 1)) / (1 + 0.14 * k) for k in range(9)]
        assert pol.best_k(a) == max(range(9), key=rate.__getitem__)
    # In a batch a draft costs more relative to what the step yields: fewer drafts.
    assert pol.draft_cost(8) == pytest.approx(0.14 * 8 / 2.4)
    assert pol.best_k(0.6, batch_size=8) < pol.best_k(0.6) and pol.best_k(0.3, batch_size=8) == 0
    assert pol.best_k(0.97, batch_size=8) > 2


def test_make_proposer_and_num_taken():
    assert isinstance(make_proposer("ngram"), NgramProposer)
    assert isinstance(make_proposer("suffix"), SuffixProposer)
    with pytest.raises(ValueError, match="unknown speculative method"):
        make_proposer("magic")
    assert as_draft([1, 2]).token_ids == [1, 2] and as_draft(Draft([3])).token_ids == [3]
    assert num_taken([4, 9], [4]) == 2  # draft accepted, then the bonus token
    assert num_taken([5, 9], [4]) == 1  # rejected: the sampled token replaces it
    assert num_taken([7], []) == 1


# ------------------------------------------------------- exactness of the verification

V = 6
TABLE = torch.randn(V, V, generator=torch.Generator().manual_seed(3)) * 1.2  # bigram logits
Q_POOR = torch.tensor([0.55, 0.25, 0.1, 0.05, 0.03, 0.02])  # the draft's q: far from any p row


def target_logits(context: list[int]) -> torch.Tensor:
    return TABLE[context[-1]]


def exact_joint(first: int, temperature: float) -> torch.Tensor:
    """p(t1, t2) of the target after `first`: [V * V]."""
    p1 = torch.softmax(TABLE[first] / temperature, -1)
    return torch.stack([p1[a] * torch.softmax(TABLE[a] / temperature, -1) for a in range(V)]).flatten()


def sample_pairs(n: int, k: int, with_probs: bool, temperature: float = 1.0, seed: int = 0) -> torch.Tensor:
    """n sequences of two tokens from the synthetic model, each generated through speculative
    verification of k drafts from the poor draft distribution Q_POOR (as the engine runs it:
    one sampler call per verification step over the rows [], [d0], ..., then num_taken)."""
    rng = random.Random(seed)
    sampler = Sampler(V, seed=seed)
    counts = torch.zeros(V * V)
    for i in range(n):
        r = req([0], rid=f"s{i}", temperature=temperature, seed=seed * 1_000_000 + i)
        while r.num_output_tokens < 2:
            drafts = rng.choices(range(V), weights=Q_POOR.tolist(), k=k)
            r.spec_token_ids = drafts
            ctx = r.all_token_ids
            logits = torch.stack([target_logits(ctx + drafts[:j]) for j in range(k + 1)])
            q = [Q_POOR if with_probs else None] * k + [None]
            res = sampler(logits, [r] * (k + 1), [drafts[:j] for j in range(k + 1)], q)
            toks = [x.token_id for x in res]
            r.output_token_ids += toks[:num_taken(toks, drafts)]
            r.spec_token_ids = []
        a, b = r.output_token_ids[:2]
        counts[a * V + b] += 1
    return counts


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square test of counts against probabilities (cells with expectation < 5
    pooled), its p-value from the regularized upper incomplete gamma function."""
    n = float(counts.sum())
    exp = probs.double() * n
    obs = counts.double()
    small = exp < 5
    if bool(small.any()):
        exp = torch.cat([exp[~small], exp[small].sum().view(1)])
        obs = torch.cat([obs[~small], obs[small].sum().view(1)])
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = len(exp) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


N = 3000


@pytest.mark.parametrize("with_probs", [False, True], ids=["one-hot drafts", "drafts with q"])
def test_speculative_sampling_keeps_the_target_distribution(with_probs):
    """3000 two-token sequences with k = 3 poor drafts per step: the joint distribution of the
    two tokens (36 cells) matches the target's exactly computed one (p > 0.001). The broken
    rules below, run on the same samples count, are rejected at p < 1e-6: that is the
    test's power against the mistakes it guards."""
    counts = sample_pairs(N, 3, with_probs)
    assert chi2_pvalue(counts, exact_joint(0, 1.0)) > 1e-3


def _broken_check(accept, on_reject):
    """A replacement for Sampler._check_drafts with its own acceptance rule `accept(u, p_d, q_d)`
    and what a rejected row gets (`on_reject(p)`: a token, or None to keep the row's sample)."""
    def check(self, tokens, probs, sample_rows, reqs, positions, checks):
        for k, i in enumerate(sample_rows):
            d = self._draft_at(reqs[i], positions[i])
            q = checks.get(i)
            if q is None or d is None:
                continue
            p = probs[k].double()
            if accept(self._uniform(reqs[i], positions[i]), float(p[d]), float(q[d])):
                tokens[i] = d
            elif on_reject is not None:
                tokens[i] = on_reject(p)
    return check


def test_broken_acceptance_rules_are_caught(monkeypatch):
    """Power: two classic mistakes give distributions the chi-square test rejects outright."""
    want = exact_joint(0, 1.0)
    # 1. Resampling from p instead of the residual (p - q)+ after a rejected draft with q.
    monkeypatch.setattr(Sampler, "_check_drafts", _broken_check(lambda u, p, q: u * q < p,
                                                                 lambda p: int(torch.multinomial(p, 1))))
    assert chi2_pvalue(sample_pairs(N, 3, True), want) < 1e-6
    # 2. Accepting with min(1, q/p) (the ratio upside down).
    monkeypatch.setattr(Sampler, "_check_drafts", _broken_check(lambda u, p, q: u * p < q, None))
    assert chi2_pvalue(sample_pairs(N, 3, True), want) < 1e-6


def test_seeded_speculative_sampling_repeats_and_equals_plain_sampling():
    """With one-hot drafts a seeded request draws, at each position, the token plain sampling
    draws there: the same output with or without speculation, whatever the drafts."""
    plain = sample_pairs(200, 0, False, seed=5)
    assert torch.equal(sample_pairs(200, 3, False, seed=5), plain)
    assert torch.equal(sample_pairs(200, 2, False, seed=5), plain)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.integers(0, 4), min_size=2, max_size=12), min_size=1, max_size=6), st.integers(0, 5))
def test_suffix_counts_match_a_recount(seqs, drop):
    """The kept totals and leaders equal a count from scratch, after adding sequences and
    removing some again."""
    from metroline.engine.speculative import _Counts

    c = _Counts(3)
    for s_ in seqs:
        c.add(s_, 1)
    for s_ in seqs[:drop]:
        c.add(s_, 1, sign=-1)
    want: dict = {}
    for s_ in seqs[drop:]:
        for i in range(1, len(s_)):
            for n in range(1, min(3, i) + 1):
                d = want.setdefault(tuple(s_[i - n:i]), {})
                d[s_[i]] = d.get(s_[i], 0) + 1
    assert {k: rec[3] for k, rec in c.next.items()} == want
    for k, rec in c.next.items():
        assert rec[0] == sum(want[k].values()) and rec[2] == max(want[k].values()) == want[k][rec[1]]
