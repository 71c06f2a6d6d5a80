"""Tests of imagine.py (§3.3, Eqs 10–11) and imagine_eval.py.

Eq 10: λ-returns against a slow loop, against their definition as a λ-average of n-step returns,
and on a hand-drawn chain that pins the index convention. Eq 11: PMPO against hand-computed
numbers (separate set means, A = 0 counts as positive, empty sets), its gradient's direction, and
its KL against a brute-force reverse KL over the joint action space. Then the context sampler's
mixture and prompts, rollout shapes and causality, which parameters learn, the measuring
instruments, and the smoke pipeline data → tokenizer → dynamics → agent → imagine (a subprocess),
its exact resume, its re-evaluation, the seed table and the GPU mixed-precision path.

Exercises (README "Equation map and exercises"): each accepts any correct implementation.
    Eq 10  imagine.lambda_returns   python -m pytest tests/test_imagine.py -k lambda_returns
    Eq 11  imagine.pmpo_loss        python -m pytest tests/test_imagine.py -k pmpo
"""

import ast
import functools
import itertools
import json
import math
import os
import shutil
import types

import numpy as np
import pytest
import torch

import agent as ag
import common
import data
import dynamics as dy
import imagine as im
import imagine_eval as ie
import tokenizer as tk
from conftest import ROOT, run

CLASSES = [5, 2, 2]  # a categorical move and two buttons


@pytest.fixture(scope="module", autouse=True)
def one_thread_for_the_module():
    """The models are tiny: one thread, also for the module-scoped fixtures (tests/conftest.py says
    why); restores the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- Eq 10: λ-returns

EQ10 = ("Eq 10 in the state indexing of imagine.py: R_t = r_{t+1} + γ·c_{t+1}·((1 − λ)·v_{t+1} "
        "+ λ·R_{t+1}), R_H = v_H, returning R_0 … R_{H−1} (B, H); r_t is the reward of ENTERING "
        "state t, c_t = 0 if state t is terminal, v_t the value of state t")


def slow_lambda_returns(r, v, c, gamma, lam):
    """Eq 10 with python floats, one row at a time, in the state indexing of imagine.py."""
    H = len(r) - 1
    R = [0.0] * (H + 1)
    R[H] = v[H]
    for t in range(H - 1, -1, -1):
        R[t] = r[t + 1] + gamma * c[t + 1] * ((1 - lam) * v[t + 1] + lam * R[t + 1])
    return R[:H]


def literal_lambda_returns(r, v, c, gamma, lam):
    """The paper's printed indexing read literally (r_t, c_t, v_t of state t itself): wrong here."""
    H = len(r) - 1
    R = [0.0] * (H + 1)
    R[H] = v[H]
    for t in range(H - 1, -1, -1):
        R[t] = r[t] + gamma * c[t] * ((1 - lam) * v[t] + lam * R[t + 1])
    return R[:H]


def check_returns(got, r, v, c, gamma, lam, atol=1e-5):
    """Compare lambda_returns' output with the slow loop, row by row; explain a mismatch."""
    B, H = r.shape[0], r.shape[1] - 1
    assert tuple(got.shape) == (B, H), \
        f"expected shape (B, H) = {(B, H)}, got {tuple(got.shape)}. {EQ10}"
    rows = [(r[b].tolist(), v[b].tolist(), c[b].tolist()) for b in range(B)]
    want = torch.tensor([slow_lambda_returns(*row, gamma, lam) for row in rows]).double()
    got = got.detach().double()
    if torch.allclose(got, want, atol=atol, rtol=atol):
        return
    literal = torch.tensor([literal_lambda_returns(*row, gamma, lam) for row in rows])
    hint = ""
    if torch.allclose(got, literal.double(), atol=atol, rtol=atol):
        hint = (" Your returns use r_t, c_t and v_t of state t itself (the paper's formula read "
                "literally); here they belong to the transition INTO state t+1: use index t + 1.")
    raise AssertionError(f"{EQ10}.{hint}\n  γ = {gamma}, λ = {lam}\n  expected {want}\n"
                         f"  got      {got}")


def test_lambda_returns_match_the_slow_loop_with_terminal_states():
    g = torch.Generator().manual_seed(0)
    B, H = 5, 9
    r, v = torch.randn(B, H + 1, generator=g), torch.randn(B, H + 1, generator=g)
    c = (torch.rand(B, H + 1, generator=g) > 0.2).float()  # some terminal states
    check_returns(im.lambda_returns(r, v, c, 0.9, 0.7), r, v, c, 0.9, 0.7)


def n_step_return(r, v, gamma, t, n):
    """G^(n)_t = Σ_{i=1}^{n} γ^{i−1} r_{t+i} + γ^n v_{t+n}  (c = 1), for one row."""
    return sum(gamma ** (i - 1) * r[t + i] for i in range(1, n + 1)) + gamma ** n * v[t + n]


def random_row(seed, H):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(1, H + 1, generator=g).double()
    v = torch.randn(1, H + 1, generator=g).double()
    return r, v, torch.ones_like(r)


def test_lambda_returns_are_the_lambda_average_of_n_step_returns():
    """The definition: R^λ_t = (1 − λ) Σ_{n=1}^{H−t−1} λ^{n−1} G^(n)_t + λ^{H−t−1} G^(H−t)_t."""
    H, gamma, lam = 7, 0.97, 0.8
    r, v, c = random_row(1, H)
    out = im.lambda_returns(r, v, c, gamma, lam)[0]
    rr, vv = r[0].tolist(), v[0].tolist()
    for t in range(H):
        weighted = sum(lam ** (n - 1) * n_step_return(rr, vv, gamma, t, n) for n in range(1, H - t))
        ref = (1 - lam) * weighted + lam ** (H - t - 1) * n_step_return(rr, vv, gamma, t, H - t)
        assert float(out[t]) == pytest.approx(ref, rel=1e-6), \
            (f"R_{t}: expected the λ-average of n-step returns {ref:.6f}, "
             f"got {float(out[t]):.6f}. {EQ10}")


def test_lambda_returns_with_lambda_zero_are_one_step_td_targets():
    H, gamma = 7, 0.97
    r, v, c = random_row(2, H)
    td = im.lambda_returns(r, v, c, gamma, 0.0)[0]
    want = r[0, 1:] + gamma * v[0, 1:]  # R_t = r_{t+1} + γ v_{t+1}
    assert torch.allclose(td.double(), want, rtol=1e-6, atol=1e-6), \
        f"λ = 0 must give R_t = r_{{t+1}} + γ·v_{{t+1}}: expected {want}, got {td}. {EQ10}"


def test_lambda_returns_with_lambda_one_are_discounted_reward_sums_bootstrapped_from_v_H():
    H, gamma = 7, 0.97
    r, v, c = random_row(3, H)
    mc = im.lambda_returns(r, v, c, gamma, 1.0)[0]
    for t in range(H):
        want = n_step_return(r[0].tolist(), v[0].tolist(), gamma, t, H - t)
        assert float(mc[t]) == pytest.approx(want, rel=1e-6), \
            (f"λ = 1, R_{t}: expected Σ γ^(i−1) r_(t+i) + γ^(H−t) v_H = {want:.6f}, "
             f"got {float(mc[t]):.6f}. {EQ10}")


def test_lambda_returns_index_convention_on_a_hand_drawn_chain():
    """s_0 -a_0-> s_1 -a_1-> s_2 -a_2-> s_3 (r_3 = 1, read by the reward head at h_3) -a_3-> s_4.
    The return of a_2 (taken at s_2) contains r_3 undiscounted, earlier actions see it discounted
    (by γλ per step when v = 0), later ones not at all; with v = 0 the advantage of a_2 is 1."""
    gamma, lam = 0.9, 0.95
    r = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0]])  # (1, H+1): r_t of entering s_t; H = 4
    v = torch.zeros(1, 5)
    R = im.lambda_returns(r, v, torch.ones(1, 5), gamma, lam)[0]  # R_0 … R_3
    want = torch.tensor([(gamma * lam) ** 2, gamma * lam, 1.0, 0.0])
    assert torch.allclose(R.double(), want.double(), atol=1e-6), \
        (f"chain s_0 → … → s_3 (r_3 = 1), v = 0: expected R_0 … R_3 = {want.tolist()} (a_2 leads "
         f"into s_3 and sees r_3 undiscounted), got {R.tolist()}. {EQ10}")


def test_lambda_returns_terminal_state_cuts_the_future_but_keeps_its_entry_reward():
    """A terminal s_3 (c_3 = 0): the return of a_2 is r_3 alone (v_3 = 5 is not bootstrapped)."""
    gamma = 0.9
    r = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0]])
    v = torch.tensor([[0.0, 0.0, 0.0, 5.0, 5.0]])
    R = im.lambda_returns(r, v, torch.tensor([[1.0, 1, 1, 0, 1]]), gamma, 0.5)[0]
    want = [gamma * 0.5 * 1.0, 1.0]
    assert [float(R[1]), float(R[2])] == pytest.approx(want), \
        (f"c_3 = 0 (s_3 terminal): expected R_1, R_2 = {want} (entering s_3 still pays r_3, "
         f"nothing after it counts), got {[float(R[1]), float(R[2])]}. {EQ10}")


# ---------------------------------------------------------------- Eq 11: PMPO

EQ11 = ("Eq 11: L = (1 − α)/|D⁻|·Σ_{D⁻} ln π(a|s) − α/|D⁺|·Σ_{D⁺} ln π(a|s) "
        "+ β/N·Σ KL[π ‖ π_prior], D⁺ = {A ≥ 0}, D⁻ = {A < 0}, each set averaged over its own "
        "size, an empty set gives 0")


def logits_for(probs_rows):
    """Per-component logits whose softmax is exactly the given probabilities."""
    return torch.log(torch.tensor(probs_rows, dtype=torch.float64))


# One categorical component with 3 classes; 4 states; known probabilities; a uniform prior.
P = [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.7, 0.2, 0.1]]
Q = [[1 / 3, 1 / 3, 1 / 3]] * 4
ACTS = torch.tensor([[0], [1], [2], [0]])  # ln π(a_i): ln 0.5, ln 0.6, ln 0.6, ln 0.7
ADV = torch.tensor([2.0, -1.0, -0.5, -3.0])  # D⁺ = {0}, D⁻ = {1, 2, 3}
KL = [sum(pi * math.log(pi / (1 / 3)) for pi in row) for row in P]  # KL[p ‖ uniform] per state
NEG = (math.log(0.6) + math.log(0.6) + math.log(0.7)) / 3  # the mean over D⁻ alone …
POS = math.log(0.5)  # … and over D⁺ alone (one element): each set has its own mean


def hand_loss(alpha, beta):
    return (1 - alpha) * NEG - alpha * POS + beta * sum(KL) / 4


def check_loss(out, want, case, hints=()):
    """Compare pmpo_loss(...)["loss"] with the hand-computed value; name a known mistake."""
    got = float(out["loss"])
    if got == pytest.approx(want, rel=1e-5, abs=1e-6):
        return
    named = [text for value, text in hints if got == pytest.approx(value, rel=1e-5, abs=1e-6)]
    raise AssertionError(f"{case}: expected L = {want:.6f}, got {got:.6f}. "
                         f"{named[0] + ' ' if named else ''}{EQ11}")


def test_pmpo_loss_matches_a_hand_computed_example_with_separate_set_means():
    alpha, beta = 0.5, 0.3
    out = im.pmpo_loss([logits_for(P)], [logits_for(Q)], ACTS, ADV, alpha, beta)
    # The mean over all states with a sign (a plain advantage-sign policy gradient) is not Eq 11.
    pooled = (-alpha * POS + (1 - alpha) * 3 * NEG) / 4 + beta * sum(KL) / 4
    forward = hand_loss(alpha, 0) + beta * sum(
        sum(q * math.log(q / p) for p, q in zip(row, Q[0])) for row in P) / 4
    check_loss(out, hand_loss(alpha, beta), "4 states, D⁺ = {0}, D⁻ = {1, 2, 3}, uniform prior",
               [(pooled, "You averaged ln π over all N states; each set needs its own mean."),
                (forward, "Your KL is the forward KL[π_prior ‖ π]; Eq 11 uses KL[π ‖ π_prior].")])


def test_pmpo_advantage_zero_counts_as_positive():
    adv = torch.tensor([0.0, -1, -1, -1])  # A_0 = 0: still in D⁺, so the loss is the same
    out = im.pmpo_loss([logits_for(P)], [logits_for(Q)], ACTS, adv, 0.5, 0.3)
    as_negative = 0.5 * (POS + 3 * NEG) / 4 + 0.3 * sum(KL) / 4  # D⁺ empty, D⁻ = all four
    check_loss(out, hand_loss(0.5, 0.3), "A = (0, −1, −1, −1): A = 0 belongs to D⁺",
               [(as_negative, "You put A = 0 into D⁻.")])


def test_pmpo_reports_its_terms():
    out = im.pmpo_loss([logits_for(P)], [logits_for(Q)], ACTS, ADV, 0.5, 0.3)
    terms = {k: float(out[k]) for k in ("pos_logp", "neg_logp", "kl", "frac_pos")}
    want = {"pos_logp": POS, "neg_logp": NEG, "kl": sum(KL) / 4, "frac_pos": 0.25}
    assert terms == pytest.approx(want, rel=1e-5), \
        (f"the returned terms (mean ln π over D⁺ and D⁻, mean KL, share of D⁺): "
         f"expected {want}, got {terms}")


def test_pmpo_with_an_empty_negative_set_keeps_only_the_positive_term():
    p = [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]
    same = logits_for(p)  # prior = policy: KL = 0
    lp = (math.log(0.5) + math.log(0.6)) / 2
    acts, adv = torch.tensor([[0], [1]]), torch.tensor([1.0, 0.0])
    out = im.pmpo_loss([same], [same], acts, adv, 0.25, 0.3)
    check_loss(out, -0.25 * lp, "A = (1, 0): D⁻ is empty and contributes 0 (α = 0.25, KL = 0)")
    assert float(out["neg_logp"]) == 0 and math.isfinite(float(out["loss"]))


def test_pmpo_with_an_empty_positive_set_keeps_only_the_negative_term():
    p = [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]
    same = logits_for(p)
    lp = (math.log(0.5) + math.log(0.6)) / 2
    acts, adv = torch.tensor([[0], [1]]), torch.tensor([-1.0, -2.0])
    out = im.pmpo_loss([same], [same], acts, adv, 0.25, 0.3)
    check_loss(out, 0.75 * lp, "A = (−1, −2): D⁺ is empty and contributes 0 (α = 0.25, KL = 0)")
    assert float(out["pos_logp"]) == 0 and math.isfinite(float(out["loss"]))


def test_pmpo_gradient_raises_positive_and_lowers_negative_actions():
    raw = torch.zeros(2, 5, requires_grad=True)  # two states, uniform over 5 moves
    acts = torch.tensor([[3], [1]])
    out = im.pmpo_loss([raw], [torch.zeros(2, 5)], acts, torch.tensor([1.0, -1.0]), 0.5, 0.0)
    out["loss"].backward()
    step = -raw.grad  # one gradient-descent direction
    assert step[0, 3] > 0 and step[1, 1] < 0, \
        f"a_0 (A ≥ 0) must become likelier and a_1 (A < 0) less likely; the descent step was {step}"
    assert torch.all(step[0, [0, 1, 2, 4]] < 0) and torch.all(step[1, [0, 2, 3, 4]] > 0), step


def joint_probs(logits):
    return [torch.softmax(lg[0].double(), -1).tolist() for lg in logits]


def joint_kl(a, b):
    """KL of two factorised distributions over all 5·2·2 joint actions, by brute force."""
    total = 0.0
    for m, u, c in itertools.product(range(5), range(2), range(2)):
        pa, pb = a[0][m] * a[1][u] * a[2][c], b[0][m] * b[1][u] * b[2][c]
        total += pa * math.log(pa / pb)
    return total


def test_pmpo_kl_is_the_reverse_kl_over_the_joint_action_space():
    """KL[π_θ ‖ π_prior] of the factorised policy (categorical move + Bernoulli buttons) is the KL
    of the two joint distributions over all 5·2·2 actions; ln π(a) of the joint action is the sum
    over the components. Read from the loss: L = −α·ln π(a) + β·KL for one state in D⁺."""
    g = torch.Generator().manual_seed(0)
    pol = ag.split_policy_logits(torch.randn(1, 7, generator=g) * 2, CLASSES)
    pri = ag.split_policy_logits(torch.randn(1, 7, generator=g) * 2, CLASSES)
    pp, qq = joint_probs(pol), joint_probs(pri)
    assert abs(joint_kl(pp, qq) - joint_kl(qq, pp)) > 0.05  # the forward KL differs: detectable
    acts = torch.zeros(1, 3, dtype=torch.long)
    out = im.pmpo_loss(pol, pri, acts, torch.tensor([1.0]), 0.5, 0.3)
    logp = math.log(pp[0][0] * pp[1][0] * pp[2][0])  # ln π(a) of the joint = Σ over components
    forward = -0.5 * logp + 0.3 * joint_kl(qq, pp)
    check_loss(out, -0.5 * logp + 0.3 * joint_kl(pp, qq), "one state in D⁺, 3 action components",
               [(forward, "Your KL is the forward KL[π_prior ‖ π]; Eq 11 uses KL[π ‖ π_prior].")])


@functools.lru_cache(maxsize=None)
def bandit(beta, steps=150, seed=0):
    """One-step task: reward 1 iff move = 2 (of 5). Policy, prior and value are agent.MTPHead on
    random states; returns (π(move = 2) after PMPO training, the value head's mean prediction)."""
    torch.manual_seed(seed)
    pol, value = ag.MTPHead(8, 16, 7, 1), ag.MTPHead(8, 16, 255, 1)
    prior = ag.MTPHead(8, 16, 7, 1).requires_grad_(False)  # zero output: the uniform policy
    bins, g = ag.twohot_bins(), torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([*pol.parameters(), *value.parameters()], lr=3e-3)
    cont = torch.tensor([1.0, 0.0]).expand(64, 2)  # s_1 terminal
    for _ in range(steps):
        h = torch.randn(64, 2, 8, generator=g)  # (B, H+1, D): s_0 and the state after the action
        logits = ag.split_policy_logits(pol(h[:, :1], 0), CLASSES)
        act = ag.sample_action([lg.detach() for lg in logits], g)  # (B, 1, A)
        r = torch.zeros(64, 2)
        r[:, 1] = (act[:, 0, 0] == 2).float()  # r_1: reward of entering s_1
        with torch.no_grad():
            v = ag.twohot_mean(value(h, 0), bins)  # (B, 2)
            ret = im.lambda_returns(r, v, cont, 0.997, 0.95)
        prior_logits = ag.split_policy_logits(prior(h[:, :1], 0), CLASSES)
        pm = im.pmpo_loss(logits, prior_logits, act, ret - v[:, :1], 0.5, beta)
        loss = pm["loss"] + ag.twohot_nll(value(h[:, :1], 0), ret, bins).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        h = torch.randn(256, 1, 8, generator=g)
        p = torch.softmax(ag.split_policy_logits(pol(h, 0), CLASSES)[0], -1)[..., 2].mean()
        return float(p), float(ag.twohot_mean(value(h, 0), bins).mean())


def test_pmpo_learns_the_rewarded_action_of_a_bandit():
    p_free, p_kl = bandit(beta=0.0)[0], bandit(beta=0.3)[0]
    assert p_free > 0.9 and p_kl > 0.9, \
        (f"π(rewarded move) after 150 PMPO steps from 0.2 (uniform): β = 0 {p_free:.2f}, "
         f"β = 0.3 {p_kl:.2f}")


def test_pmpo_kl_holds_the_policy_near_the_prior_on_a_bandit():
    p_tight = bandit(beta=5.0)[0]
    assert 0.2 < p_tight < 0.5, \
        f"β = 5 should hold π(rewarded move) near the uniform 0.2: {p_tight:.2f}"


def test_value_head_learns_the_expected_reward_of_the_trained_bandit_policy():
    v_free = bandit(beta=0.0)[1]
    assert v_free > 0.8, v_free


# ---------------------------------------------------------------- contexts: 50/50 mixture, prompts

def fake_cache(n_eps=4, length=60, n_tasks=3):
    """A LatentCache stand-in: latent [.., 0, 0] = global frame index; a ladder 0 → 1 → 2 at frames
    10, 30, 50 of episode 0, task 0 only (frame 20) in the others."""
    latents = np.zeros((n_eps * length, 2, 2), np.float32)
    latents[:, 0, 0] = np.arange(n_eps * length)
    rewards = np.zeros((n_eps * length, n_tasks), np.float32)
    rewards[[10, 30, 50], [0, 1, 2]] = 1
    for e in range(1, n_eps):
        rewards[e * length + 20, 0] = 1
    episodes = [{"id": f"ep{e:06d}", "offset": e * length, "length": length} for e in range(n_eps)]
    actions = np.zeros((n_eps * length, 3), np.int64)
    return types.SimpleNamespace(latents=latents, actions=actions, rewards=rewards,
                                 episodes=episodes)


N_CTX, T_CTX, H_CTX = 3000, 6, 8


@pytest.fixture(scope="module")
def contexts():
    """3000 uniform and 3000 relevant contexts of 6 frames, horizon 8, from the fake cache."""
    cache = fake_cache()
    s = im.ContextSampler(cache, T_CTX, H_CTX, seed=0)
    return torch.from_numpy(cache.rewards), s.sample(N_CTX, N_CTX)


def test_context_sampler_returns_uniform_rows_first_then_relevant_ones(contexts):
    _, b = contexts
    assert b["latents"].shape == (2 * N_CTX, T_CTX, 2, 2)
    assert b["actions"].shape == (2 * N_CTX, T_CTX, 3)
    assert b["relevant"].tolist() == [False] * N_CTX + [True] * N_CTX


def test_context_sampler_windows_are_consecutive_frames_of_one_episode(contexts):
    _, b = contexts
    idx = b["latents"][:, :, 0, 0].long()  # (2n, T) global frame indices
    assert (idx.diff(dim=1) == 1).all()
    assert (idx[:, 0] // 60 == idx[:, -1] // 60).all()  # inside one episode
    assert torch.equal(idx[:, -1], b["end"])


def test_relevant_contexts_end_one_to_H_steps_before_an_event_of_their_task(contexts):
    rew, b = contexts
    for i in range(N_CTX, 2 * N_CTX):
        k, e = int(b["task"][i]), int(b["end"][i])
        assert rew[e + 1:e + H_CTX + 1, k].sum() == 1 and rew[e - (e % 60):e + 1, k].sum() == 0


def test_relevant_contexts_draw_their_task_uniformly_among_tasks_with_events(contexts):
    _, b = contexts
    for k in range(3):
        assert float((b["task"][N_CTX:] == k).float().mean()) == pytest.approx(1 / 3, abs=0.04)


def test_uniform_contexts_are_prompted_with_the_first_task_not_yet_achieved(contexts):
    rew, b = contexts
    for i in range(N_CTX):
        e = int(b["end"][i])
        done = rew[e - (e % 60):e + 1].sum(0) > 0
        expected = 2 if bool(done.all()) else int(torch.nonzero(~done)[0])
        assert int(b["task"][i]) == expected
    assert set(b["task"][:N_CTX].tolist()) == {0, 1, 2}


# ---------------------------------------------------------------- rollouts with a tiny agent

def tiny_agent(window=4, n_tasks=3, seed=0):
    torch.manual_seed(seed)
    dyn = dy.DynamicsModel(latent_tokens=4, latent_dim=6, action_classes=CLASSES, dim=32, depth=4,
                           heads=4, kv_heads=2, registers=2, context=window, mlp_ratio=2.0,
                           k_max=64)
    model = ag.AgentModel(dyn, n_tasks, head_hidden=16, mtp=3, bins=255).eval()
    # non-zero outputs, so that every path is exercised
    for head in (model.policy_head, model.reward_head):
        for layer in head.out:
            torch.nn.init.normal_(layer.weight, std=0.5)
    return model


def context(B=3, T=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    acts = torch.stack([torch.randint(0, n, (B, T), generator=g) for n in CLASSES], -1)
    clean = torch.rand(B, T, 4, 6, generator=g) * 2 - 1
    return clean, acts, torch.randint(0, 3, (B,), generator=g)


B_ROLL, H_ROLL = 3, 6  # H beyond the window C = 4: the cache trims, the rollout goes on


@pytest.fixture(scope="module")
def scripted_rollouts():
    """Two rollouts of a tiny agent with the same noise, whose scripted actions differ in a_2."""
    model = tiny_agent(window=4)
    clean, acts, task = context()
    script = torch.stack([torch.randint(0, n, (B_ROLL, H_ROLL)) for n in CLASSES], -1)  # (B, H, A)
    other = script.clone()
    other[:, 2, 0] = (script[:, 2, 0] + 1) % 5
    rolls = [im.imagine_rollout(model, clean, acts, task, H_ROLL, 4, 0.9,
                                torch.Generator().manual_seed(3),
                                ie.scripted_policy(s, CLASSES), keep_latents=True)
             for s in (script, other)]
    return model, script, rolls


def test_rollout_shapes(scripted_rollouts):
    _, _, (roll, _) = scripted_rollouts
    assert roll["h"].shape == (B_ROLL, H_ROLL + 1, 32)
    assert roll["rewards"].shape == (B_ROLL, H_ROLL + 1)
    assert roll["actions"].shape == (B_ROLL, H_ROLL, 3)
    assert roll["latents"].shape == (B_ROLL, H_ROLL, 4, 6)


def test_rollout_action_t_is_the_action_taken_at_state_t(scripted_rollouts):
    _, script, (roll, _) = scripted_rollouts
    assert torch.equal(roll["actions"], script)


def test_rollout_reward_t_is_read_at_h_t_and_r_0_is_not_part_of_the_rollout(scripted_rollouts):
    model, _, (roll, _) = scripted_rollouts
    assert torch.all(roll["rewards"][:, 0] == 0)
    torch.testing.assert_close(roll["rewards"][:, 1:], model.reward(roll["h"][:, 1:], 0))


def test_rollout_action_changes_only_the_states_after_it(scripted_rollouts):
    """Changing a_2 changes h_3 on, never h_0 … h_2 (same noise: same generator seed)."""
    _, _, (roll, roll2) = scripted_rollouts
    assert torch.equal(roll["h"][:, :3], roll2["h"][:, :3])
    assert torch.equal(roll["rewards"][:, :3], roll2["rewards"][:, :3])
    assert (roll["h"][:, 3] - roll2["h"][:, 3]).abs().max() > 1e-4


def test_observe_context_in_one_pass_equals_frame_by_frame_observe(monkeypatch):
    model = tiny_agent(window=8)
    clean, acts, task = context(T=5)
    # The two paths draw their context noise in different shapes; without the corruption
    # (τ_ctx = 1 maps to 63/64, not to clean) they must agree exactly.
    for module in (im, ag):
        monkeypatch.setattr(module, "corrupt", lambda noise, clean, tau: clean)
    with torch.no_grad():
        c1, c2 = common.KVCache(model.window), common.KVCache(model.window)
        h = im.observe_context(model, c1, clean, acts, task, 1.0)
        for t in range(5):
            h_t = ag.observe(model, c2, clean[:, t], acts[:, t - 1] if t else None, task, 1.0)
    torch.testing.assert_close(h, h_t, atol=1e-5, rtol=1e-4)
    assert c1.pos == c2.pos == 5


# ---------------------------------------------------------------- which parameters learn

def test_the_value_head_starts_at_zero():
    model = tiny_agent()
    value, _ = im.build_heads(model)
    assert torch.equal(im.value_of(value, torch.randn(2, 5, 32), model.bins), torch.zeros(2, 5))


def test_the_prior_starts_as_the_behaviour_cloned_policy():
    model = tiny_agent()
    _, prior = im.build_heads(model)
    h = torch.randn(2, 5, 32)
    prior_move = ag.split_policy_logits(prior(h, 0), CLASSES)[0]
    torch.testing.assert_close(prior_move, model.policy(h, 0)[0])


@pytest.fixture(scope="module")
def three_updates():
    """Three imagination updates of a tiny agent; the states before and the grads of each step."""
    model = tiny_agent()
    value, prior = im.build_heads(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prior_before = {k: v.clone() for k, v in prior.state_dict().items()}
    params = list(model.policy_head.parameters()) + list(value.parameters())
    trainable = {id(p) for p in params}
    opt = torch.optim.Adam(params, lr=1e-2)
    a = im.Args(horizon=3, batch=3)
    clean, acts, task = context()
    frozen_with_grad, heads_without_grad = [], []
    for step in range(3):
        roll = im.imagine_rollout(model, clean, acts, task, a.horizon, 4, 0.9,
                                  torch.Generator().manual_seed(step))
        roll["rewards"][:, 2] += 1.0  # a reward, so that the value head has something to learn
        terms = im.imagination_loss(model, value, prior, roll, a)
        opt.zero_grad()
        terms["loss"].backward()
        for name, p in list(model.named_parameters()) + list(prior.named_parameters()):
            if id(p) not in trainable and (p.requires_grad or p.grad is not None):
                frozen_with_grad.append(name)
        heads_without_grad += [n for n, p in value.named_parameters() if p.grad is None]
        if model.policy_head.out[0].weight.grad is None:
            heads_without_grad.append("policy_head.out.0")
        if model.policy_head.out[1].weight.grad is not None:  # offset 1: not trained here
            frozen_with_grad.append("policy_head.out.1")
        opt.step()
    return types.SimpleNamespace(model=model, value=value, prior=prior, before=before,
                                 prior_before=prior_before, roll=roll, terms=terms,
                                 frozen_with_grad=frozen_with_grad,
                                 heads_without_grad=heads_without_grad)


def test_only_the_policy_and_value_heads_get_gradients(three_updates):
    assert three_updates.frozen_with_grad == []
    assert three_updates.heads_without_grad == []


def test_imagination_training_changes_only_the_policy_head_of_the_agent(three_updates):
    after = three_updates.model.state_dict()
    for k, v in three_updates.before.items():  # transformer, tokens, agent token, reward head
        changed = not torch.equal(v, after[k])
        assert changed == k.startswith(("policy_head.trunk", "policy_head.out.0")), k


def test_the_prior_stays_frozen(three_updates):
    prior = three_updates.prior.state_dict()
    assert all(torch.equal(three_updates.prior_before[k], v) for k, v in prior.items())


def test_the_policy_moves_away_from_the_prior_and_the_value_head_learns(three_updates):
    t = three_updates
    assert float(t.terms["kl"]) > 0
    assert float(im.value_of(t.value, t.roll["h"], t.model.bins).detach().abs().max()) > 0


def test_reward_center_is_a_running_mean_set_by_the_first_batch():
    c = im.RewardCenter(decay=0.9)
    assert c.update(torch.tensor([1.0, 3.0])) == pytest.approx(2.0)  # the first batch sets it
    assert c.update(torch.tensor([4.0])) == pytest.approx(0.9 * 2.0 + 0.1 * 4.0)


def test_reward_center_resumes_exactly_from_its_state_dict():
    c = im.RewardCenter(decay=0.9)
    c.update(torch.tensor([1.0, 3.0]))
    d = im.RewardCenter()
    d.load_state_dict(c.state_dict())
    assert d.update(torch.tensor([0.0])) == c.update(torch.tensor([0.0]))


# ---------------------------------------------------------------- imagine_eval.py

def test_rank_agreement_counts_pairs_ordered_like_reality():
    def probe(real, ret):
        return {"t": {"real": real, "imagined_return": ret}}
    probes = {"a": probe(0.5, 2.0), "b": probe(0.2, 1.0), "c": probe(0.2, 3.0)}
    # pairs with different real success: (a, b) right, (a, c) wrong; (b, c) a real tie: not counted
    assert ie.rank_agreement(probes) == {"agree": 1, "pairs": 2, "share": 0.5}


def test_rank_agreement_separated_counts_only_pairs_whose_real_difference_is_clear():
    def probe(hits, ret):
        return {"t": {"real": float(np.mean(hits)), "imagined_return": ret, "real_hits": hits}}
    probes = {"a": probe([1] * 8, 2.0), "b": probe([0] * 8, 1.0), "c": probe([1] * 7 + [0], 3.0)}
    # (a, b) 8 of 8 starts apart, ordered right; (b, c) 7 apart, right; (a, c) one start apart:
    # ordered wrong, but its interval reaches 0, so only the plain count holds it against the model
    r = ie.rank_agreement(probes)
    assert (r["agree"], r["pairs"]) == (2, 3)
    assert r["separated"] == {"agree": 2, "pairs": 2, "share": 1.0}


def test_reward_head_auc_counts_a_tie_as_one_half():
    q = ie.reward_head_quality(np.array([0.9, 0.1, 0.3, 0.3]), np.array([1.0, 0.0, 0.0, 1.0]))
    assert q["auc"] == pytest.approx((1 + 1 + 1 + 0.5) / 4) and q["events"] == 2


def test_reward_head_quality_reports_the_mean_prediction_at_and_away_from_events():
    q = ie.reward_head_quality(np.array([0.9, 0.1, 0.3, 0.3]), np.array([1.0, 0.0, 0.0, 1.0]))
    assert q["mean_at_events"] == pytest.approx(0.6) and q["mean_elsewhere"] == pytest.approx(0.2)


def test_imagine_does_not_import_its_evaluation_module_at_import_time():
    tree = ast.parse(open(os.path.join(ROOT, "imagine.py")).read())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name for n in top for a in n.names} | {n.module for n in top
                                                       if isinstance(n, ast.ImportFrom)}
    assert "imagine_eval" not in names


# ---------------------------------------------------------------- pipeline: data → … → imagine


@pytest.fixture(scope="module")
def smoke_agent(tmp_path_factory):
    """data → tokenizer → dynamics → agent (and the BC-from-scratch baseline) at --preset smoke."""
    tmp = tmp_path_factory.mktemp("imagine")
    d, tok, dyn, agent, scratch = (str(tmp / n) for n in ("data", "tok", "dyn", "agent", "scratch"))
    data.main(["--preset", "smoke", "--out", d])
    tk.train(common.parse_args(tk.Args, tk.PRESETS, ["--preset", "smoke", "--data", d, "--out", tok,
                                                     "--lpips-weight", "0"]))
    dy.train(common.parse_args(dy.Args, dy.PRESETS, ["--preset", "smoke", "--out", dyn,
                                                     "--tokenizer", os.path.join(tok, "ckpt.pt"),
                                                     "--eval-seqs", "0"]))
    ag_args = ["--preset", "smoke", "--dynamics", os.path.join(dyn, "ckpt.pt"), "--no-baselines"]
    ag.train(common.parse_args(ag.Args, ag.PRESETS, [*ag_args, "--out", scratch, "--from-scratch"]))
    ag.train(common.parse_args(ag.Args, ag.PRESETS, [*ag_args, "--out", agent,
                                                     "--eval-episodes", "0"]))
    return tmp, os.path.join(agent, "ckpt.pt"), os.path.join(scratch, "summary.json")


def imagine_args(*argv):
    return common.parse_args(im.Args, im.PRESETS, ["--preset", "smoke", *argv])


@pytest.fixture(scope="module")
def smoke_run(smoke_agent):
    """`python imagine.py --preset smoke` as a user runs it, beside the BC-from-scratch run."""
    tmp, agent, scratch = smoke_agent
    full = str(tmp / "full")
    run("imagine.py", "--preset", "smoke", "--agent", agent, "--out", full, "--compare", scratch)
    return full, json.load(open(os.path.join(full, "summary.json")))


PICTURES = ("success.png", "success_curve.png", "imagined_vs_real.png", "rollout.png")


def test_smoke_run_writes_its_checkpoint_logs_summary_and_pictures(smoke_run):
    full, _ = smoke_run
    for f in ("ckpt.pt", "args.json", "metrics.jsonl", "summary.json", *PICTURES):
        assert os.path.exists(os.path.join(full, f)), f


def test_smoke_summary_has_the_training_and_evaluation_keys(smoke_run):
    _, s = smoke_run
    for key in ("stage", "preset", "device", "steps", "wall_s", "steps_per_s", "frames_per_s",
                "peak_mem_gb", "success", "curve", "imagined_vs_real", "rank_agreement"):
        assert key in s, key
    assert s["stage"] == "imagine" and s["steps"] == 4


def test_smoke_success_has_the_table_7_columns_in_order(smoke_run):
    _, s = smoke_run
    assert list(s["success"]) == ["random", "contractors", "BC (scratch)", "WM+BC", "Dreamer 4"]


def test_smoke_success_curve_has_a_point_every_eval_every_steps(smoke_run):
    _, s = smoke_run
    assert [c["step"] for c in s["curve"]] == [0, 2, 4]


def test_smoke_imagined_vs_real_probes_four_policies_and_ranks_them(smoke_run):
    _, s = smoke_run
    assert set(s["imagined_vs_real"]) == {"contractor replay", "random", "WM+BC", "Dreamer 4"}
    assert 0 <= s["rank_agreement"]["share"] <= 1


def test_replaying_the_contractor_actions_reproduces_the_recorded_reward(smoke_run):
    """The same world and the recorded actions reproduce the dataset (checks the replay itself)."""
    _, s = smoke_run
    for v in s["imagined_vs_real"]["contractor replay"].values():
        assert v["real"] == 1.0


def test_smoke_metrics_log_the_policy_and_value_loss_terms(smoke_run):
    full, _ = smoke_run
    rows = [json.loads(line) for line in open(os.path.join(full, "metrics.jsonl"))]
    assert {"pmpo", "value", "kl", "frac_pos", "return"} <= set(rows[-1])


def test_the_checkpoint_chains_to_the_agent(smoke_run):
    full, _ = smoke_run
    ckpt = torch.load(os.path.join(full, "ckpt.pt"), weights_only=True)
    assert ckpt["parent"]["stage"] == "agent" and ckpt["format_version"] == 1 and ckpt["step"] == 4


def test_load_imagine_differs_from_the_stage_2_agent_only_in_its_policy_head(smoke_agent,
                                                                            smoke_run):
    full, _ = smoke_run
    model, value, _ = im.load_imagine(os.path.join(full, "ckpt.pt"))
    parent, _ = ag.load_agent(smoke_agent[1])
    pk, mk = parent.state_dict(), model.state_dict()
    for k in pk:  # only the trunk and offset-0 output layer of the policy head differ
        changed = not torch.equal(pk[k], mk[k])
        assert changed == k.startswith(("policy_head.trunk", "policy_head.out.0")), k


def test_an_interrupted_and_resumed_run_equals_an_uninterrupted_one(smoke_agent):
    """Interrupted at step 2, resumed: the same heads (curve points off: the same RNG use)."""
    tmp, agent, _ = smoke_agent
    part, ref = str(tmp / "part"), str(tmp / "ref")
    quiet = ["--agent", agent, "--eval-every", "0", "--eval-episodes", "0", "--probe-starts", "0"]
    im.train(imagine_args(*quiet, "--out", ref))
    im.train(imagine_args(*quiet, "--out", part, "--stop-at", "2"))
    im.train(imagine_args(*quiet, "--out", part, "--resume"))
    a, b = (torch.load(os.path.join(p, "ckpt.pt"), weights_only=True) for p in (ref, part))
    assert b["step"] == 4
    for k in ("model", "value"):
        for name in a[k]:
            torch.testing.assert_close(a[k][name], b[k][name], atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def reevaluated(smoke_agent, smoke_run):
    """A copy of the smoke run without its pictures, re-evaluated by `imagine_eval.py RUN_DIR`."""
    full, _ = smoke_run
    copy = str(smoke_agent[0] / "reeval")
    shutil.copytree(full, copy)
    for f in PICTURES:
        os.remove(os.path.join(copy, f))
    ie.main([copy])
    return copy, json.load(open(os.path.join(copy, "summary.json")))


def test_reevaluating_a_run_reproduces_its_summary(smoke_run, reevaluated):
    _, before = smoke_run
    _, after = reevaluated
    assert list(after) == list(before)
    for k in before:
        if k != "eval_s":
            assert after[k] == before[k], k


def test_reevaluating_a_run_redraws_its_pictures(reevaluated):
    copy, _ = reevaluated
    for f in PICTURES:
        assert os.path.exists(os.path.join(copy, f)), f


def test_the_seed_table_gives_mean_and_std_over_runs(smoke_agent, smoke_run):
    """`imagine_eval.py --table`: here the same run twice, so std = 0 and the mean is its rate."""
    full, s = smoke_run
    table = str(smoke_agent[0] / "table")
    run("imagine_eval.py", "--table", f"{full},{full}", "--out", table)
    for f in ("table.md", "table.json", "table.png"):
        assert os.path.exists(os.path.join(table, f)), f
    saved = json.load(open(os.path.join(table, "table.json")))
    t = saved["table"]
    assert t["Dreamer 4"]["collect_wood"]["std"] == 0
    wood = s["success"]["Dreamer 4"]["collect_wood"]["rate"]
    assert t["Dreamer 4"]["collect_wood"]["mean"] == pytest.approx(100 * wood)
    ci = t["Dreamer 4"]["collect_wood"]["ci95"]
    assert ci["lo"] <= 100 * wood <= ci["hi"]
    # a policy against itself: difference 0 on every world, never a claim
    same = saved["claims"]["Dreamer 4 − WM+BC: collect_wood"]
    assert same["separated"] == (same["lo"] > 0 or same["hi"] < 0)


def test_the_seed_table_prints_the_commands_that_made_its_runs(smoke_agent, smoke_run):
    """table.md ends with the chain of commands behind each run, parents first, each with the
    run's own flags: tokenizer, world model, BC baseline, WM+BC agent, imagination, the table."""
    tmp, agent, scratch = smoke_agent
    full, _ = smoke_run
    table = str(tmp / "table_cmds")
    ie.main(["--table", full, "--out", table])
    md = open(os.path.join(table, "table.md")).read()
    tok, dyn = str(tmp / "tok"), str(tmp / "dyn")
    order = [f"python tokenizer.py --preset smoke --data {tmp / 'data'}",
             f"python dynamics.py --preset smoke --tokenizer {tok}/ckpt.pt",
             f"python agent.py --preset smoke --dynamics {dyn}/ckpt.pt --from-scratch",
             f"python agent.py --preset smoke --dynamics {dyn}/ckpt.pt --eval-episodes 0",
             f"python imagine.py --preset smoke --agent {agent}",
             f"python imagine_eval.py --table {full} --out {table}"]
    at = [md.find(c) for c in order]
    assert all(i >= 0 for i in at), [c for c, i in zip(order, at) if i < 0]
    assert at == sorted(at)


def test_the_seed_table_prints_a_reevaluation_that_only_changed_the_baseline(smoke_agent,
                                                                              smoke_run):
    """A run re-evaluated on its own worlds beside another BC baseline (`imagine_eval.py RUN
    --compare S`) needs that command to be remade: the table prints it after the run's own."""
    tmp, _, scratch = smoke_agent
    full, s = smoke_run
    copy, other = str(tmp / "rebaselined"), str(tmp / "other_scratch.json")
    shutil.copytree(full, copy)
    shutil.copy(scratch, other)
    ie.main([copy, "--compare", other])
    table = str(tmp / "table_rebaselined")
    ie.main(["--table", copy, "--out", table])
    md = open(os.path.join(table, "table.md")).read()
    again = f"python imagine_eval.py {copy} --eval-episodes {s['eval_episodes']} --compare {other}"
    assert again in md
    assert md.find(again) > md.find("python imagine.py --preset smoke")


def test_the_gpu_mixed_precision_path_trains_and_evaluates_every_stage(smoke_agent, monkeypatch):
    """On a GPU every stage runs under bf16 autocast (common.autocast); CI has no GPU. Forcing the
    same autocast on the CPU runs that code path: dynamics training and its cached rollouts, agent
    finetuning with the real-environment evaluation, imagination rollouts and PMPO — no dtype
    clash, finite figures."""
    tmp, agent, scratch = smoke_agent

    def bf16_autocast(device):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    monkeypatch.setattr(common, "autocast", bf16_autocast)
    dyn, ag_out, im_out = (str(tmp / n) for n in ("bf16_dyn", "bf16_agent", "bf16_im"))
    d = dy.train(common.parse_args(dy.Args, dy.PRESETS, ["--preset", "smoke", "--out", dyn,
                                                         "--eval-seqs", "2", "--tokenizer",
                                                         str(tmp / "tok" / "ckpt.pt")]))
    assert math.isfinite(d["psnr_k4"]) and math.isfinite(d["probe_mse_true"]) and d["gen_fps"] > 0
    a = ag.train(common.parse_args(ag.Args, ag.PRESETS, ["--preset", "smoke", "--out", ag_out,
                                                         "--no-baselines", "--dynamics",
                                                         os.path.join(dyn, "ckpt.pt")]))
    assert math.isfinite(a["heldout_bc_nll"]) and 0 <= a["reward_auc"] <= 1
    i = im.train(imagine_args("--agent", os.path.join(ag_out, "ckpt.pt"), "--out", im_out,
                              "--compare", scratch))
    assert 0 <= i["success"]["Dreamer 4"]["collect_wood"]["rate"] <= 1
    last = [json.loads(line) for line in open(os.path.join(im_out, "metrics.jsonl"))][-1]
    assert all(math.isfinite(last[k]) for k in ("pmpo", "value", "kl", "return"))


def test_a_missing_agent_checkpoint_names_the_command_that_makes_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="python agent.py"):
        im.train(imagine_args("--agent", str(tmp_path / "no.pt"), "--out", str(tmp_path / "o")))
