"""Tests of imagine.py (§3.3, Eqs 10–11): λ-returns against a slow loop and against their definition as a
λ-average of n-step returns, the index convention on a hand-made rollout (PITFALLS.md 9), PMPO against
hand-computed numbers (signs, separate set means, empty sets, the KL direction against a brute-force KL
over the joint action space), the context sampler's mixture and prompts, rollout shapes and causality,
which parameters learn (only the policy and value heads; the prior is frozen), and the smoke pipeline
data → tokenizer → dynamics → agent → imagine with an exact resume."""

import itertools
import json
import math
import os
import types

import numpy as np
import pytest
import torch

import agent as ag
import common
import data
import dynamics as dy
import imagine as im
import tokenizer as tk
from conftest import run

CLASSES = [5, 2, 2]  # a categorical move and two buttons


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)


# ---------------------------------------------------------------- Eq 10: λ-returns

def slow_lambda_returns(r, v, c, gamma, lam):
    """Eq 10 with python floats, one row at a time, in the state indexing of imagine.py."""
    H = len(r) - 1
    R = [0.0] * (H + 1)
    R[H] = v[H]
    for t in range(H - 1, -1, -1):
        R[t] = r[t + 1] + gamma * c[t + 1] * ((1 - lam) * v[t + 1] + lam * R[t + 1])
    return R[:H]


def test_lambda_returns_match_the_slow_loop_with_terminal_states():
    g = torch.Generator().manual_seed(0)
    B, H = 5, 9
    r, v = torch.randn(B, H + 1, generator=g), torch.randn(B, H + 1, generator=g)
    c = (torch.rand(B, H + 1, generator=g) > 0.2).float()  # some terminal states
    out = im.lambda_returns(r, v, c, 0.9, 0.7)
    assert out.shape == (B, H)
    for b in range(B):
        ref = slow_lambda_returns(r[b].tolist(), v[b].tolist(), c[b].tolist(), 0.9, 0.7)
        torch.testing.assert_close(out[b], torch.tensor(ref), atol=1e-5, rtol=1e-5)


def test_lambda_returns_are_the_lambda_average_of_n_step_returns():
    """The definition: R^λ_t = (1 − λ) Σ_{n=1}^{H−t−1} λ^{n−1} G^(n)_t + λ^{H−t−1} G^(H−t)_t, with the n-step
    return G^(n)_t = Σ_{i=1}^{n} γ^{i−1} r_{t+i} + γ^n v_{t+n}  (c = 1). Also λ = 0 is the one-step TD target
    and λ = 1 the discounted sum of rewards bootstrapped from v_H."""
    g = torch.Generator().manual_seed(1)
    H, gamma, lam = 7, 0.97, 0.8
    r, v = torch.randn(1, H + 1, generator=g).double(), torch.randn(1, H + 1, generator=g).double()
    c = torch.ones_like(r)
    def G(t, n):  # the n-step return from state t
        return sum(gamma ** (i - 1) * r[0, t + i] for i in range(1, n + 1)) + gamma ** n * v[0, t + n]
    out = im.lambda_returns(r, v, c, gamma, lam)[0]
    for t in range(H):
        ref = (1 - lam) * sum(lam ** (n - 1) * G(t, n) for n in range(1, H - t)) + lam ** (H - t - 1) * G(t, H - t)
        assert float(out[t]) == pytest.approx(float(ref), rel=1e-9)
    td = im.lambda_returns(r, v, c, gamma, 0.0)[0]
    torch.testing.assert_close(td, r[0, 1:] + gamma * v[0, 1:])  # R_t = r_{t+1} + γ v_{t+1}
    mc = im.lambda_returns(r, v, c, gamma, 1.0)[0]
    for t in range(H):
        assert float(mc[t]) == pytest.approx(float(G(t, H - t)), rel=1e-9)


def test_index_convention_on_a_hand_made_rollout():
    """s_0 -a_0-> s_1 -a_1-> s_2 -a_2-> s_3 (r_3 = 1, read by the reward head at h_3) -a_3-> s_4.
    The return of a_2 (taken at s_2) contains r_3 undiscounted, earlier actions see it discounted (by γλ per
    step when v = 0), later ones not at all; with v = 0 the advantage of a_2 is exactly 1."""
    gamma, lam = 0.9, 0.95
    r = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0]])  # (1, H+1): r_t of entering s_t; H = 4
    v = torch.zeros(1, 5)
    R = im.lambda_returns(r, v, torch.ones(1, 5), gamma, lam)[0]  # R_0 … R_3
    torch.testing.assert_close(R, torch.tensor([(gamma * lam) ** 2, gamma * lam, 1.0, 0.0]))
    # A terminal state s_3 (c_3 = 0) cuts everything after it, but keeps the reward of entering it.
    v = torch.tensor([[0.0, 0.0, 0.0, 5.0, 5.0]])
    R = im.lambda_returns(r, v, torch.tensor([[1.0, 1, 1, 0, 1]]), gamma, 0.5)[0]
    assert float(R[2]) == pytest.approx(1.0) and float(R[1]) == pytest.approx(gamma * 0.5 * 1.0)


# ---------------------------------------------------------------- Eq 11: PMPO

def logits_for(probs_rows):
    """Per-component logits whose softmax is exactly the given probabilities."""
    return torch.log(torch.tensor(probs_rows, dtype=torch.float64))


def test_pmpo_matches_a_hand_computed_example_with_separate_set_means():
    # One categorical component with 3 classes; 4 states; known probabilities.
    p = [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.7, 0.2, 0.1]]
    q = [[1 / 3, 1 / 3, 1 / 3]] * 4  # the prior: uniform
    acts = torch.tensor([[0], [1], [2], [0]])  # ln π(a_i): ln 0.5, ln 0.6, ln 0.6, ln 0.7
    adv = torch.tensor([2.0, -1.0, -0.5, -3.0])  # D⁺ = {0}, D⁻ = {1, 2, 3}
    alpha, beta = 0.5, 0.3
    out = im.pmpo_loss([logits_for(p)], [logits_for(q)], acts, adv, alpha, beta)
    kl = [sum(pi * math.log(pi / (1 / 3)) for pi in row) for row in p]  # KL[p ‖ uniform] per state
    neg = (math.log(0.6) + math.log(0.6) + math.log(0.7)) / 3  # the mean over D⁻ alone …
    pos = math.log(0.5)  # … and over D⁺ alone (one element): each set has its own mean
    expected = (1 - alpha) * neg - alpha * pos + beta * sum(kl) / 4
    assert float(out["loss"]) == pytest.approx(expected, rel=1e-6)  # (agent.py computes in float32)
    assert float(out["pos_logp"]) == pytest.approx(pos) and float(out["neg_logp"]) == pytest.approx(neg)
    assert float(out["frac_pos"]) == pytest.approx(0.25)
    # Not the mean over all states with a sign (what a plain advantage-sign policy gradient would do).
    pooled = (-alpha * math.log(0.5) + (1 - alpha) * 3 * neg) / 4 + beta * sum(kl) / 4
    assert abs(float(out["loss"]) - pooled) > 0.1
    # A = 0 counts as positive.
    zero = im.pmpo_loss([logits_for(p)], [logits_for(q)], acts, torch.tensor([0.0, -1, -1, -1]), alpha, beta)
    assert float(zero["loss"]) == pytest.approx(expected, rel=1e-6)


def test_pmpo_empty_sets_contribute_zero():
    p = [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]
    acts = torch.tensor([[0], [1]])
    lp = (math.log(0.5) + math.log(0.6)) / 2
    same = logits_for(p)  # prior = policy: KL = 0
    all_pos = im.pmpo_loss([same], [same], acts, torch.tensor([1.0, 0.0]), 0.25, 0.3)
    assert float(all_pos["loss"]) == pytest.approx(-0.25 * lp) and float(all_pos["neg_logp"]) == 0
    all_neg = im.pmpo_loss([same], [same], acts, torch.tensor([-1.0, -2.0]), 0.25, 0.3)
    assert float(all_neg["loss"]) == pytest.approx(0.75 * lp) and float(all_neg["pos_logp"]) == 0
    assert all(math.isfinite(float(v)) for out in (all_pos, all_neg) for v in out.values())


def test_pmpo_gradient_raises_positive_and_lowers_negative_actions():
    raw = torch.zeros(2, 5, requires_grad=True)  # two states, uniform over 5 moves
    acts = torch.tensor([[3], [1]])
    out = im.pmpo_loss([raw], [torch.zeros(2, 5)], acts, torch.tensor([1.0, -1.0]), 0.5, 0.0)
    out["loss"].backward()
    step = -raw.grad  # one gradient-descent direction
    assert step[0, 3] > 0 and step[1, 1] < 0  # a_0 (A ≥ 0) becomes likelier, a_1 (A < 0) less likely
    assert torch.all(step[0, [0, 1, 2, 4]] < 0) and torch.all(step[1, [0, 2, 3, 4]] > 0)


def test_pmpo_kl_is_the_reverse_kl_over_the_joint_action_space():
    """KL[π_θ ‖ π_prior] of the factorised policy (categorical move + Bernoulli buttons) equals the KL of the
    two joint distributions over all 5·2·2 actions, computed by brute force; and it is not the forward KL."""
    g = torch.Generator().manual_seed(0)
    pol = ag.split_policy_logits(torch.randn(1, 7, generator=g) * 2, CLASSES)
    pri = ag.split_policy_logits(torch.randn(1, 7, generator=g) * 2, CLASSES)
    probs = lambda logits: [torch.softmax(lg[0].double(), -1).tolist() for lg in logits]  # noqa: E731
    pp, qq = probs(pol), probs(pri)

    def joint_kl(a, b):
        total = 0.0
        for m, u, c in itertools.product(range(5), range(2), range(2)):
            pa, pb = a[0][m] * a[1][u] * a[2][c], b[0][m] * b[1][u] * b[2][c]
            total += pa * math.log(pa / pb)
        return total
    acts = torch.zeros(1, 3, dtype=torch.long)
    out = im.pmpo_loss(pol, pri, acts, torch.tensor([1.0]), 0.5, 0.3)
    assert float(out["kl"]) == pytest.approx(joint_kl(pp, qq), rel=1e-5)  # reverse: KL[π_θ ‖ π_prior]
    assert abs(joint_kl(pp, qq) - joint_kl(qq, pp)) > 0.05  # the forward KL differs: the test can tell
    logp = math.log(pp[0][0] * pp[1][0] * pp[2][0])  # ln π(a) of the joint = Σ over components
    assert float(out["loss"]) == pytest.approx(-0.5 * logp + 0.3 * joint_kl(pp, qq), rel=1e-5)


def bandit(beta, steps=150, seed=0):
    """One-step task: reward 1 iff move = 2 (of 5). Policy, prior and value are agent.MTPHead on random
    states; returns (π(move = 2) after PMPO training, the value head's mean prediction)."""
    torch.manual_seed(seed)
    pol, value = ag.MTPHead(8, 16, 7, 1), ag.MTPHead(8, 16, 255, 1)
    prior = ag.MTPHead(8, 16, 7, 1).requires_grad_(False)  # zero output: the uniform policy
    bins, g = ag.twohot_bins(), torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([*pol.parameters(), *value.parameters()], lr=3e-3)
    for _ in range(steps):
        h = torch.randn(64, 2, 8, generator=g)  # (B, H+1, D): s_0 and the state after the action
        logits = ag.split_policy_logits(pol(h[:, :1], 0), CLASSES)
        act = ag.sample_action([lg.detach() for lg in logits], g)  # (B, 1, A)
        r = torch.zeros(64, 2)
        r[:, 1] = (act[:, 0, 0] == 2).float()  # r_1: reward of entering s_1
        with torch.no_grad():
            v = ag.twohot_mean(value(h, 0), bins)  # (B, 2)
            ret = im.lambda_returns(r, v, torch.tensor([1.0, 0.0]).expand(64, 2), 0.997, 0.95)  # s_1 terminal
        pm = im.pmpo_loss(logits, ag.split_policy_logits(prior(h[:, :1], 0), CLASSES), act, ret - v[:, :1], 0.5, beta)
        loss = pm["loss"] + ag.twohot_nll(value(h[:, :1], 0), ret, bins).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        h = torch.randn(256, 1, 8, generator=g)
        p = torch.softmax(ag.split_policy_logits(pol(h, 0), CLASSES)[0], -1)[..., 2].mean()
        return float(p), float(ag.twohot_mean(value(h, 0), bins).mean())


def test_pmpo_and_the_value_head_learn_a_bandit_and_the_kl_holds_the_policy_near_the_prior():
    p_free, v_free = bandit(beta=0.0)
    p_kl, _ = bandit(beta=0.3)
    p_tight, _ = bandit(beta=5.0)
    assert p_free > 0.9 and p_kl > 0.9, (p_free, p_kl)  # from 0.2 (uniform) to the rewarded move
    assert 0.2 < p_tight < 0.5, p_tight  # a large β holds the policy near the uniform prior
    assert v_free > 0.8  # the value head has learned the expected reward of the trained policy


# ---------------------------------------------------------------- contexts: the 50/50 mixture and prompts

def fake_cache(n_eps=4, length=60, n_tasks=3):
    """A LatentCache stand-in: latent [.., 0, 0] = global frame index; a ladder 0 → 1 → 2 at frames 10, 30, 50
    of episode 0, task 0 only (frame 20) in the others."""
    latents = np.zeros((n_eps * length, 2, 2), np.float32)
    latents[:, 0, 0] = np.arange(n_eps * length)
    rewards = np.zeros((n_eps * length, n_tasks), np.float32)
    rewards[[10, 30, 50], [0, 1, 2]] = 1
    for e in range(1, n_eps):
        rewards[e * length + 20, 0] = 1
    episodes = [{"id": f"ep{e:06d}", "offset": e * length, "length": length} for e in range(n_eps)]
    return types.SimpleNamespace(latents=latents, actions=np.zeros((n_eps * length, 3), np.int64), rewards=rewards,
                                 episodes=episodes)


def test_context_sampler_mixture_windows_and_prompts():
    cache, T, H = fake_cache(), 6, 8
    s = im.ContextSampler(cache, T, H, seed=0)
    n = 3000
    b = s.sample(n, n)
    assert b["latents"].shape == (2 * n, T, 2, 2) and b["actions"].shape == (2 * n, T, 3)
    assert b["relevant"].tolist() == [False] * n + [True] * n
    idx = b["latents"][:, :, 0, 0].long()  # (2n, T) global frame indices
    assert (idx.diff(dim=1) == 1).all() and (idx[:, 0] // 60 == idx[:, -1] // 60).all()  # inside one episode
    assert torch.equal(idx[:, -1], b["end"])
    rew = torch.from_numpy(cache.rewards)
    for i in range(n, 2 * n):  # relevant: the prompted task's event lies 1 … H steps after the context
        k, e = int(b["task"][i]), int(b["end"][i])
        assert rew[e + 1:e + H + 1, k].sum() == 1 and rew[e - (e % 60):e + 1, k].sum() == 0
    for k in range(3):  # tasks uniform among the tasks with events
        assert float((b["task"][n:] == k).float().mean()) == pytest.approx(1 / 3, abs=0.04)
    for i in range(n):  # uniform: prompt = the first task not yet achieved in the episode (the ladder)
        e = int(b["end"][i])
        done = rew[e - (e % 60):e + 1].sum(0) > 0
        expected = 2 if bool(done.all()) else int(torch.nonzero(~done)[0])
        assert int(b["task"][i]) == expected
    assert set(b["task"][:n].tolist()) == {0, 1, 2}


# ---------------------------------------------------------------- rollouts with a tiny agent

def tiny_agent(window=4, n_tasks=3, seed=0):
    torch.manual_seed(seed)
    dyn = dy.DynamicsModel(latent_tokens=4, latent_dim=6, action_classes=CLASSES, dim=32, depth=4, heads=4,
                           kv_heads=2, registers=2, context=window, mlp_ratio=2.0, k_max=64)
    model = ag.AgentModel(dyn, n_tasks, head_hidden=16, mtp=3, bins=255).eval()
    for head in (model.policy_head, model.reward_head):  # non-zero outputs, so that every path is exercised
        for layer in head.out:
            torch.nn.init.normal_(layer.weight, std=0.5)
    return model


def context(B=3, T=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    acts = torch.stack([torch.randint(0, n, (B, T), generator=g) for n in CLASSES], -1)
    return torch.rand(B, T, 4, 6, generator=g) * 2 - 1, acts, torch.randint(0, 3, (B,), generator=g)


def test_rollout_shapes_indexing_and_causality():
    model = tiny_agent(window=4)
    clean, acts, task = context()
    B, H = 3, 6  # H beyond the window C = 4: the cache trims, the rollout goes on
    script = torch.stack([torch.randint(0, n, (B, H)) for n in CLASSES], -1)  # (B, H, A)
    roll = im.imagine_rollout(model, clean, acts, task, H, 4, 0.9, torch.Generator().manual_seed(3),
                              im.scripted_policy(script, CLASSES), keep_latents=True)
    assert roll["h"].shape == (B, H + 1, 32) and roll["rewards"].shape == (B, H + 1)
    assert roll["actions"].shape == (B, H, 3) and roll["latents"].shape == (B, H, 4, 6)
    assert torch.equal(roll["actions"], script)  # a_t is the action taken at state t
    assert torch.all(roll["rewards"][:, 0] == 0)  # r_0: not part of the rollout
    torch.testing.assert_close(roll["rewards"][:, 1:], model.reward(roll["h"][:, 1:], 0))  # r_t read at h_t
    # Changing a_2 changes h_3 on, never h_0 … h_2 (same noise: same generator seed).
    other = script.clone()
    other[:, 2, 0] = (script[:, 2, 0] + 1) % 5
    roll2 = im.imagine_rollout(model, clean, acts, task, H, 4, 0.9, torch.Generator().manual_seed(3),
                               im.scripted_policy(other, CLASSES))
    assert torch.equal(roll["h"][:, :3], roll2["h"][:, :3])
    assert torch.equal(roll["rewards"][:, :3], roll2["rewards"][:, :3])
    assert (roll["h"][:, 3] - roll2["h"][:, 3]).abs().max() > 1e-4


def test_observe_context_in_one_pass_equals_frame_by_frame_observe():
    model = tiny_agent(window=8)
    clean, acts, task = context(T=5)
    with torch.no_grad():  # clean context (τ_ctx = 1): no noise, so the two paths must agree exactly
        c1, c2 = common.KVCache(model.window), common.KVCache(model.window)
        h = im.observe_context(model, c1, clean, acts, task, 1.0)
        for t in range(5):
            h_t = ag.observe(model, c2, clean[:, t], acts[:, t - 1] if t else None, task, 1.0)
    torch.testing.assert_close(h, h_t, atol=1e-5, rtol=1e-4)
    assert c1.pos == c2.pos == 5


def test_only_the_policy_and_value_heads_learn_and_the_prior_stays_frozen():
    model = tiny_agent()
    value, prior = im.build_heads(model)
    h = torch.randn(2, 5, 32)
    assert torch.equal(im.value_of(value, h, model.bins), torch.zeros(2, 5))  # zero-initialised value head
    torch.testing.assert_close(ag.split_policy_logits(prior(h, 0), CLASSES)[0], model.policy(h, 0)[0])  # prior = BC
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prior_before = {k: v.clone() for k, v in prior.state_dict().items()}
    params = list(model.policy_head.parameters()) + list(value.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    a = im.Args(horizon=3, batch=3)
    clean, acts, task = context()
    for step in range(3):
        roll = im.imagine_rollout(model, clean, acts, task, a.horizon, 4, 0.9, torch.Generator().manual_seed(step))
        roll["rewards"][:, 2] += 1.0  # a reward, so that the value head has something to learn
        terms = im.imagination_loss(model, value, prior, roll, a)
        opt.zero_grad()
        terms["loss"].backward()
        trainable = {id(p) for p in params}
        for name, p in list(model.named_parameters()) + list(prior.named_parameters()):
            if id(p) not in trainable:
                assert not p.requires_grad and p.grad is None, name
        assert all(p.grad is not None for p in value.parameters())
        assert model.policy_head.out[0].weight.grad is not None and model.policy_head.out[1].weight.grad is None
        opt.step()
    after = model.state_dict()
    for k in before:  # the transformer, tokens, agent token and reward head: bit for bit unchanged
        changed = not torch.equal(before[k], after[k])
        assert changed == (k.startswith("policy_head.trunk") or k.startswith("policy_head.out.0")), k
    assert all(torch.equal(prior_before[k], v) for k, v in prior.state_dict().items())
    assert float(terms["kl"]) > 0  # the policy has moved away from the prior
    assert float(im.value_of(value, roll["h"], model.bins).detach().abs().max()) > 0  # the value head has learned


def test_rank_agreement_counts_pairs_ordered_like_reality():
    probe = lambda real, ret: {"t": {"real": real, "imagined_return": ret}}  # noqa: E731
    probes = {"a": probe(0.5, 2.0), "b": probe(0.2, 1.0), "c": probe(0.2, 3.0)}
    # pairs with different real success: (a, b) ordered right, (a, c) wrong; (b, c) is a real tie: not counted
    assert im.rank_agreement(probes) == {"agree": 1, "pairs": 2, "share": 0.5}


def test_reward_center_is_a_running_mean_that_resumes_exactly():
    c = im.RewardCenter(decay=0.9)
    assert c.update(torch.tensor([1.0, 3.0])) == pytest.approx(2.0)  # the first batch sets it
    assert c.update(torch.tensor([4.0])) == pytest.approx(0.9 * 2.0 + 0.1 * 4.0)
    d = im.RewardCenter()
    d.load_state_dict(c.state_dict())
    assert d.update(torch.tensor([0.0])) == c.update(torch.tensor([0.0]))


def test_reward_head_quality_auc():
    q = im.reward_head_quality(np.array([0.9, 0.1, 0.3, 0.3]), np.array([1.0, 0.0, 0.0, 1.0]))
    assert q["auc"] == pytest.approx((1 + 1 + 1 + 0.5) / 4) and q["events"] == 2  # a tie counts one half
    assert q["mean_at_events"] == pytest.approx(0.6) and q["mean_elsewhere"] == pytest.approx(0.2)


# ---------------------------------------------------------------- pipeline: data → … → imagine, resume, the table


@pytest.fixture(scope="module")
def smoke_agent(tmp_path_factory):
    """data → tokenizer → dynamics → agent (and the BC-from-scratch baseline) at --preset smoke, in-process."""
    tmp = tmp_path_factory.mktemp("imagine")
    d, tok, dyn, agent, scratch = (str(tmp / n) for n in ("data", "tok", "dyn", "agent", "scratch"))
    data.main(["--preset", "smoke", "--out", d])
    tk.train(common.parse_args(tk.Args, tk.PRESETS, ["--preset", "smoke", "--data", d, "--out", tok,
                                                     "--lpips-weight", "0"]))
    dy.train(common.parse_args(dy.Args, dy.PRESETS, ["--preset", "smoke", "--tokenizer", os.path.join(tok, "ckpt.pt"),
                                                     "--out", dyn, "--eval-seqs", "0"]))
    ag_args = ["--preset", "smoke", "--dynamics", os.path.join(dyn, "ckpt.pt"), "--no-baselines"]
    ag.train(common.parse_args(ag.Args, ag.PRESETS, [*ag_args, "--out", scratch, "--from-scratch"]))
    ag.train(common.parse_args(ag.Args, ag.PRESETS, [*ag_args, "--out", agent, "--eval-episodes", "0"]))
    return tmp, os.path.join(agent, "ckpt.pt"), os.path.join(scratch, "summary.json")


def imagine_args(*argv):
    return common.parse_args(im.Args, im.PRESETS, ["--preset", "smoke", *argv])


def test_smoke_pipeline_summary_pictures_table_and_exact_resume(smoke_agent):
    tmp, agent, scratch = smoke_agent
    full, part, table = str(tmp / "full"), str(tmp / "part"), str(tmp / "table")
    run("imagine.py", "--preset", "smoke", "--agent", agent, "--out", full, "--compare", scratch)
    for f in ("ckpt.pt", "args.json", "metrics.jsonl", "summary.json", "success.png", "success_curve.png",
              "imagined_vs_real.png", "rollout.png"):
        assert os.path.exists(os.path.join(full, f)), f
    s = json.load(open(os.path.join(full, "summary.json")))
    for key in ("stage", "preset", "device", "steps", "wall_s", "steps_per_s", "frames_per_s", "peak_mem_gb",
                "success", "curve", "imagined_vs_real"):
        assert key in s, key
    assert s["stage"] == "imagine" and s["steps"] == 4
    assert list(s["success"]) == ["random", "contractors", "BC (scratch)", "WM+BC", "Dreamer 4"]
    assert [c["step"] for c in s["curve"]] == [0, 2, 4]
    assert set(s["imagined_vs_real"]) == {"contractor replay", "random", "WM+BC", "Dreamer 4"}
    assert 0 <= s["rank_agreement"]["share"] <= 1
    for v in s["imagined_vs_real"]["contractor replay"].values():  # replaying the recorded actions in the same
        assert v["real"] == 1.0  # world reproduces the dataset: the reward arrives (checks the replay itself)
    rows = [json.loads(line) for line in open(os.path.join(full, "metrics.jsonl"))]
    assert {"pmpo", "value", "kl", "frac_pos", "return"} <= set(rows[-1])
    # The checkpoint chains to the agent; load_imagine rebuilds the trained policy and the value head.
    ckpt = torch.load(os.path.join(full, "ckpt.pt"), weights_only=True)
    assert ckpt["parent"]["stage"] == "agent" and ckpt["format_version"] == 1 and ckpt["step"] == 4
    model, value, _ = im.load_imagine(os.path.join(full, "ckpt.pt"))
    parent, _ = ag.load_agent(agent)
    pk, mk = parent.state_dict(), model.state_dict()
    for k in pk:  # only the policy head (its trunk and offset-0 output layer) differs from the stage-2 agent
        assert torch.equal(pk[k], mk[k]) != k.startswith(("policy_head.trunk", "policy_head.out.0")), k
    # Interrupted at step 2, resumed: the same heads as the uninterrupted run (curve points off: same RNG use).
    quiet = ["--agent", agent, "--eval-every", "0", "--eval-episodes", "0", "--probe-starts", "0"]
    im.train(imagine_args(*quiet, "--out", str(tmp / "ref")))
    im.train(imagine_args(*quiet, "--out", part, "--stop-at", "2"))
    im.train(imagine_args(*quiet, "--out", part, "--resume"))
    ref, b = (torch.load(os.path.join(p, "ckpt.pt"), weights_only=True) for p in (str(tmp / "ref"), part))
    assert b["step"] == 4
    for k in ("model", "value"):
        for name in ref[k]:
            torch.testing.assert_close(ref[k][name], b[k][name], atol=1e-6, rtol=1e-5)
    # The README table: mean ± std over runs (here: the same run twice, so std = 0).
    t = im.train(imagine_args("--table", f"{full},{full}", "--out", table))
    assert os.path.exists(os.path.join(table, "table.md")) and os.path.exists(os.path.join(table, "table.png"))
    assert t["Dreamer 4"]["collect_wood"]["std"] == 0
    wood = s["success"]["Dreamer 4"]["collect_wood"]["rate"]
    assert t["Dreamer 4"]["collect_wood"]["mean"] == pytest.approx(100 * wood)


def test_the_gpu_mixed_precision_path_trains_and_evaluates_every_stage(smoke_agent, monkeypatch):
    """On a GPU every stage runs under bf16 autocast (common.autocast); CI has no GPU. Forcing the same
    autocast on the CPU runs that code path: dynamics training and its cached rollouts, agent finetuning
    with the real-environment evaluation, imagination rollouts and PMPO — no dtype clash, finite figures."""
    tmp, agent, scratch = smoke_agent
    monkeypatch.setattr(common, "autocast", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
    dyn, ag_out, im_out = (str(tmp / n) for n in ("bf16_dyn", "bf16_agent", "bf16_im"))
    d = dy.train(common.parse_args(dy.Args, dy.PRESETS, ["--preset", "smoke", "--out", dyn, "--eval-seqs", "2",
                                                         "--tokenizer", str(tmp / "tok" / "ckpt.pt")]))
    assert math.isfinite(d["psnr_k4"]) and math.isfinite(d["probe_mse_true"]) and d["gen_fps"] > 0
    a = ag.train(common.parse_args(ag.Args, ag.PRESETS, ["--preset", "smoke", "--out", ag_out, "--no-baselines",
                                                         "--dynamics", os.path.join(dyn, "ckpt.pt")]))
    assert math.isfinite(a["heldout_bc_nll"]) and 0 <= a["reward_auc"] <= 1
    i = im.train(imagine_args("--agent", os.path.join(ag_out, "ckpt.pt"), "--out", im_out, "--compare", scratch))
    assert 0 <= i["success"]["Dreamer 4"]["collect_wood"]["rate"] <= 1
    last = [json.loads(line) for line in open(os.path.join(im_out, "metrics.jsonl"))][-1]
    assert all(math.isfinite(last[k]) for k in ("pmpo", "value", "kl", "return"))


def test_missing_agent_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="python agent.py"):
        im.train(imagine_args("--agent", str(tmp_path / "no.pt"), "--out", str(tmp_path / "o")))
