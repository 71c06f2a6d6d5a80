"""Tests of agent.py (§3.3, Eq 9): the agent-token mask both ways (PITFALLS.md 5), symlog/symexp and
twohot against slow re-derivations (PITFALLS.md 11), zero heads at init, MTP targets and masks on a
hand-made episode (PITFALLS.md 9), the Eq 9 loss, the 50/50 mixture sampler, the KV-cached agent step,
the evaluation prompt ladder, a fixed batch that overfits, and the smoke pipeline + resume."""

import json
import math
import os

import numpy as np
import pytest
import torch

import agent as ag
import common
import data
import dynamics as dy
import tokenizer as tk
from conftest import run

CLASSES = [5, 2, 2]  # a categorical move and two buttons


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)


def tiny_agent(window=8, n_tasks=3, mtp=4, seed=0, time_every=4):
    torch.manual_seed(seed)
    dyn = dy.DynamicsModel(latent_tokens=4, latent_dim=6, action_classes=CLASSES, dim=32, depth=4, heads=4,
                           kv_heads=2, registers=2, context=window, mlp_ratio=2.0, k_max=64, time_every=time_every)
    return ag.AgentModel(dyn, n_tasks, head_hidden=16, mtp=mtp, bins=255).eval()


def inputs(B=2, T=5, seed=0):
    """Random agent-model inputs: z̃ (B, T, 4, 6), τ, d on the grid, a_{t−1} with validity, a task per row."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, 4, 6, generator=g)
    tau, d = dy.sample_tau_d((B, T), 64, g)
    acts = torch.stack([torch.randint(0, n, (B, T), generator=g) for n in CLASSES], -1)  # (B, T, A)
    return z, tau, d, acts, torch.randint(0, 3, (B,), generator=g)


# ---------------------------------------------------------------- agent tokens: the mask both ways (PITFALLS.md 5)

def test_agent_space_mask_matches_hand_written_table():
    # 3 world tokens (W: action, (τ, d), latents, registers) then 1 agent token (G).
    expected = torch.tensor([
        # W  W  W  G
        [1, 1, 1, 0],
        [1, 1, 1, 0],
        [1, 1, 1, 0],
        [1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(ag.agent_space_mask(3, 1), expected)


def test_frame_prediction_has_exactly_zero_gradient_from_the_agent_token():
    model = tiny_agent()
    z, tau, d, acts, task = inputs()
    z1, h = model(z, tau, d, *dy.shift_actions(acts), task)
    agent_inputs = [model.agent_base, model.task_embed.weight]  # the agent token = base + task embedding
    v = torch.randn_like(z1)  # a random direction: ∂(v·ẑ₁)/∂(agent input) for every frame at once
    for g in torch.autograd.grad((v * z1).sum(), agent_inputs, allow_unused=True, retain_graph=True):
        assert g is None or torch.count_nonzero(g) == 0  # exactly zero, not merely small
    assert all(float(g.abs().sum()) > 0 for g in torch.autograd.grad(h.sum(), agent_inputs))  # h does see it
    # Another task leaves the frame predictions bit for bit unchanged.
    z1_other, h_other = model(z, tau, d, *dy.shift_actions(acts), (task + 1) % 3)
    assert torch.equal(z1, z1_other) and (h - h_other).abs().max() > 1e-4
    # Control: with the agent column open, the same gradient is not zero (so the test can fail).
    model.space_mask = torch.ones_like(model.space_mask)
    z1, _ = model(z, tau, d, *dy.shift_actions(acts), task)
    assert float(torch.autograd.grad((v * z1).sum(), model.agent_base)[0].abs().sum()) > 0


def test_agent_output_sees_earlier_actions_frames_and_task_causally():
    model = tiny_agent()
    z, tau, d, acts, task = inputs(T=6)
    _, h = model(z, tau, d, *dy.shift_actions(acts), task)
    acts2 = acts.clone()
    acts2[:, 1, 0] = (acts[:, 1, 0] + 1) % 5  # a_1 is taken at frame 1 and leads into frame 2
    _, h2 = model(z, tau, d, *dy.shift_actions(acts2), task)
    assert torch.equal(h[:, :2], h2[:, :2])  # h_0, h_1 cannot know a_1
    assert (h[:, 2] - h2[:, 2]).abs().max() > 1e-4  # h_2 has seen a_1 (DESIGN.md §3)
    z2 = z.clone()
    z2[:, 3] += 1.0
    _, h3 = model(z2, tau, d, *dy.shift_actions(acts), task)
    assert torch.equal(h[:, :3], h3[:, :3]) and (h[:, 3] - h3[:, 3]).abs().max() > 1e-4  # h_t has seen z_t


# ---------------------------------------------------------------- symlog, symexp, twohot (PITFALLS.md 11)

def test_symlog_symexp_match_their_formulas_and_invert_each_other_over_the_full_range():
    x = torch.tensor([-1e8, -5.0, -1.0, -1e-3, 0.0, 1e-3, 1.0, 5.0, 1e8], dtype=torch.float64)
    for xi, s in zip(x.tolist(), ag.symlog(x).tolist()):
        assert s == pytest.approx(math.copysign(math.log(1 + abs(xi)), xi), rel=1e-12)
    y = torch.linspace(-20, 20, 4001)  # the full twohot range in symlog space
    torch.testing.assert_close(ag.symlog(ag.symexp(y)), y, atol=1e-5, rtol=1e-6)
    xs = ag.symexp(y)  # ±4.9e8
    torch.testing.assert_close(ag.symexp(ag.symlog(xs)), xs, atol=1e-5, rtol=1e-5)


def slow_twohot(x: float, bins: list) -> list:
    """The twohot weights of x, written out with python floats: find b_i ≤ symlog(x) ≤ b_{i+1}."""
    y = min(max(math.copysign(math.log1p(abs(x)), x), bins[0]), bins[-1])
    w = [0.0] * len(bins)
    for i in range(len(bins) - 1):
        if bins[i] <= y <= bins[i + 1]:
            w[i], w[i + 1] = (bins[i + 1] - y) / (bins[i + 1] - bins[i]), (y - bins[i]) / (bins[i + 1] - bins[i])
            return w
    raise AssertionError("unreachable")


def test_twohot_bins_encode_and_decode_over_the_full_range():
    bins = ag.twohot_bins(255)
    assert bins.shape == (255,) and float(bins[0]) == -20 and float(bins[-1]) == 20 and float(bins[127]) == 0
    assert torch.equal(bins, -bins.flip(0))  # exactly symmetric
    torch.testing.assert_close(bins.diff(), torch.full((254,), 40 / 254), atol=1e-5, rtol=0)  # linspace(−20, 20)
    x = torch.cat([ag.symexp(torch.linspace(-20, 20, 401)), torch.tensor([0.0, 1.0, -1.0, 0.5, 1e12, -1e12])])
    w = ag.twohot(x, bins)  # (407, 255)
    torch.testing.assert_close(w.sum(-1), torch.ones(len(x)))
    assert ((w > 0).sum(-1) <= 2).all()
    for i in (0, 57, 200, 333, 400, 401, 402, 403, 404):  # against the slow transcription
        torch.testing.assert_close(w[i], torch.tensor(slow_twohot(float(x[i]), bins.tolist())), atol=1e-5, rtol=0)
    inside = x.abs() < 4e8
    torch.testing.assert_close((w * bins).sum(-1)[inside], ag.symlog(x)[inside], atol=1e-4, rtol=0)  # Σ w·b = symlog x
    decoded = ag.twohot_mean(torch.log(w), bins)  # the head's prediction from log-probabilities = twohot
    torch.testing.assert_close(decoded[inside], x[inside], atol=1e-4, rtol=1e-4)
    assert float(decoded[-2]) == pytest.approx(float(ag.symexp(torch.tensor(20.0))), rel=1e-4)  # clamped
    # The NLL is the cross-entropy with the twohot target.
    logits = torch.randn(3, 255)
    nll = ag.twohot_nll(logits, x[[0, 200, 402]], bins)
    for j, i in enumerate((0, 200, 402)):
        ref = -sum(wi * (float(logits[j, k]) - math.log(sum(math.exp(float(v)) for v in logits[j])))
                   for k, wi in enumerate(slow_twohot(float(x[i]), bins.tolist())) if wi)
        assert float(nll[j]) == pytest.approx(ref, rel=1e-4)


def test_heads_output_exactly_zero_reward_and_a_uniform_policy_at_initialisation():
    model = tiny_agent()
    h = torch.randn(3, 5, 32)
    assert torch.equal(model.reward_logits(h), torch.zeros(3, 5, 4, 255))
    assert torch.equal(model.reward(h), torch.zeros(3, 5))  # exactly 0, not a float residue
    lp = ag.action_log_prob(model.policy(h, offset=0), torch.tensor([[[4, 1, 0]] * 5] * 3))
    torch.testing.assert_close(lp, torch.full((3, 5), -math.log(5 * 2 * 2)))


# ---------------------------------------------------------------- the factorised policy

def test_action_log_prob_kl_and_sampling_match_slow_versions():
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(4, 7, generator=g)  # 5 move logits + one logit per button
    logits = ag.split_policy_logits(raw, CLASSES)
    assert [lg.shape[-1] for lg in logits] == [5, 2, 2]
    acts = torch.tensor([[0, 1, 0], [4, 0, 1], [2, 1, 1], [3, 0, 0]])
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    for b in range(4):
        r = raw[b].tolist()
        move = r[acts[b, 0]] - math.log(sum(math.exp(v) for v in r[:5]))
        buttons = sum(math.log(sig(r[5 + j]) if acts[b, 1 + j] else 1 - sig(r[5 + j])) for j in range(2))
        assert float(ag.action_log_prob(logits, acts)[b]) == pytest.approx(move + buttons, rel=1e-5)  # Bernoulli
    other = ag.split_policy_logits(torch.randn(4, 7, generator=g), CLASSES)
    kl = ag.action_kl(logits, other)
    for b in range(4):
        ref = 0.0
        for p, q in zip(logits, other):
            lp, lq = torch.log_softmax(p[b].double(), -1), torch.log_softmax(q[b].double(), -1)
            ref += sum(math.exp(lp[k]) * (lp[k] - lq[k]) for k in range(len(lp)))
        assert float(kl[b]) == pytest.approx(float(ref), rel=1e-4)
    assert torch.allclose(ag.action_kl(logits, logits), torch.zeros(4), atol=1e-6)
    many = ag.sample_action([lg[:1].expand(20000, -1) for lg in logits], torch.Generator().manual_seed(1))
    freq = torch.bincount(many[:, 0], minlength=5).float() / 20000
    torch.testing.assert_close(freq, torch.softmax(raw[0, :5], -1), atol=0.015, rtol=0)
    assert float(many[:, 1].float().mean()) == pytest.approx(sig(float(raw[0, 5])), abs=0.015)


# ---------------------------------------------------------------- MTP targets (PITFALLS.md 9) and Eq 9

def test_mtp_targets_and_masks_on_a_hand_made_episode():
    """frame_0 -a_0-> frame_1 -a_1-> frame_2 -a_2-> frame_3 (reward r_3 = 1: a_2 earned it) -a_3-> …"""
    T, L = 6, 3
    actions = torch.tensor([[[t, t % 2] for t in range(T)]])  # (1, T, 2): a_t = (t, t mod 2)
    rewards = torch.tensor([[0.0, 0, 0, 1, 0, 0]])  # r_3: received on entering frame 3
    tgt = ag.mtp_targets(actions, rewards, L, event=torch.tensor([3]))
    for t in range(T):
        for n in range(L):
            inside = t + n < T
            assert bool(tgt["inside"][0, t, n]) == inside  # offsets past the end are masked
            if inside:
                assert tgt["actions"][0, t, n].tolist() == [t + n, (t + n) % 2]  # h_t predicts a_{t+n}
                assert float(tgt["rewards"][0, t, n]) == float(rewards[0, t + n])  # and r_{t+n}
            assert bool(tgt["bc"][0, t, n]) == (t + n <= 2)  # BC up to a_2, the action that earned r_3
            assert bool(tgt["reward"][0, t, n]) == (inside and (t, n) != (0, 0))  # h_0 never saw r_0's transition
    assert float(tgt["rewards"][0, 3, 0]) == 1 and float(tgt["rewards"][0, 2, 1]) == 1  # r_3 from h_3 and from h_2
    no_event = ag.mtp_targets(actions, rewards, L, event=torch.tensor([-1]))
    assert torch.equal(no_event["bc"], no_event["inside"])


def slow_eq9(pol, rew, actions, rewards, bc_mask, reward_mask, bins):
    """Eq 9 with python loops: masked means of −ln π(a_{t+n} | h_t) and −ln p(r_{t+n} | h_t)."""
    B, T, L, A = actions.shape
    sa = na = sr = nr = 0.0
    for b in range(B):
        for t in range(T):
            for n in range(L):
                if bc_mask[b, t, n]:
                    for c in range(A):
                        lg = pol[c][b, t, n].tolist()
                        sa -= lg[actions[b, t, n, c]] - math.log(sum(math.exp(v) for v in lg))
                    na += 1
                if reward_mask[b, t, n]:
                    lg = rew[b, t, n].tolist()
                    lse = math.log(sum(math.exp(v) for v in lg))
                    sr -= sum(w * (lg[k] - lse) for k, w in enumerate(slow_twohot(float(rewards[b, t, n]),
                                                                                   bins.tolist())) if w)
                    nr += 1
    return sa / na, sr / nr


def test_eq9_loss_matches_slow_transcription():
    g = torch.Generator().manual_seed(0)
    B, T, L = 2, 4, 3
    pol = ag.split_policy_logits(torch.randn(B, T, L, 7, generator=g), CLASSES)
    rew = torch.randn(B, T, L, 255, generator=g)
    actions = torch.stack([torch.randint(0, n, (B, T, L), generator=g) for n in CLASSES], -1)
    rewards = torch.tensor([0.0, 1.0, -3.0, 250.0])[torch.randint(0, 4, (B, T, L), generator=g)]
    bc_mask, reward_mask = torch.rand(B, T, L, generator=g) < 0.6, torch.rand(B, T, L, generator=g) < 0.8
    bins = ag.twohot_bins()
    out = ag.agent_loss(pol, rew, actions, rewards, bc_mask, reward_mask, bins)
    bc, r = slow_eq9(pol, rew, actions, rewards, bc_mask, reward_mask, bins)
    assert float(out["bc"]) == pytest.approx(bc, rel=1e-5) and float(out["reward"]) == pytest.approx(r, rel=1e-5)


# ---------------------------------------------------------------- the data mixture (§3.3)

def synthetic_split(n_eps=6, length=40, n_tasks=3):
    """Episodes whose latent [.., 0, 0] is the global frame index; task 0 in every episode (frame 10),
    task 1 in two (frame 20), task 2 in one (frame 30)."""
    latents = np.zeros((n_eps * length, 2, 2), np.float32)
    latents[:, 0, 0] = np.arange(n_eps * length)
    rewards = np.zeros((n_eps * length, n_tasks), np.float32)
    for e in range(n_eps):
        rewards[e * length + 10, 0] = 1
    rewards[0 * length + 20, 1] = rewards[3 * length + 20, 1] = rewards[5 * length + 30, 2] = 1
    episodes = [{"offset": e * length, "length": length} for e in range(n_eps)]
    return latents, np.zeros((n_eps * length, 2), np.int64), rewards, episodes


def test_mixture_sampler_proportions_and_windows():
    latents, actions, rewards, episodes = synthetic_split()
    s = ag.MixtureSampler(latents, actions, rewards, episodes, seq_len=8, seed=0)
    n = 6000
    b = s.sample(n, n)
    assert b["relevant"].tolist() == [False] * n + [True] * n  # 50/50, uniform rows first
    idx = b["latents"][:, :, 0, 0].long()  # (2n, T) global frame indices
    assert (idx.diff(dim=1) == 1).all() and (idx[:, 0] // 40 == idx[:, -1] // 40).all()  # inside one episode
    rel, uni = slice(n, None), slice(0, n)
    tasks = b["task"][rel]
    for k in range(3):  # tasks uniform among the tasks with events: rare rungs are not drowned out
        assert float((tasks == k).float().mean()) == pytest.approx(1 / 3, abs=0.02)
    ev = b["event"][rel]
    assert (ev >= 1).all()  # the event is inside, with the action that caused it
    assert (b["rewards"][rel][torch.arange(n), ev, tasks] == 1).all()
    for k in range(3):  # uniform prompts for the uniform rows
        assert float((b["task"][uni] == k).float().mean()) == pytest.approx(1 / 3, abs=0.02)
    first = idx[uni, 0]
    assert (first % 40 <= 32).all()  # every valid start (40 − 8 + 1 per episode) …
    counts = torch.bincount(first // 40, minlength=6).float() / n
    torch.testing.assert_close(counts, torch.full((6,), 1 / 6), atol=0.02, rtol=0)  # … equally likely
    assert int(round(ag.Args.batch * ag.Args.relevant_frac)) * 2 == ag.Args.batch  # the default batch is 50/50
    assert b["on_prompt"].all()  # event mode: BC may use every frame before the event


def test_segment_windows_cover_the_frames_the_ladder_prompts_the_task_on():
    """--relevant segment: the ladder prompts task 1 from task 0's reward (frame 10) until its own (frame 20), so
    task-1 windows are exactly those overlapping frames 10…19 and BC may use just those frames; task 2's reward in
    episode 5 comes while the ladder still prompts task 1 (no task-1 reward there): no task-2 segment."""
    latents, actions, rewards, episodes = synthetic_split()
    s = ag.MixtureSampler(latents, actions, rewards, episodes, seq_len=8, seed=0, segment=True)
    assert sorted(s.events) == [0, 1]
    hand = np.concatenate([np.r_[[0] * 10, [1] * 10, [2] * 20] if e in (0, 3) else np.r_[[0] * 10, [1] * 20, [2] * 10]
                           if e == 5 else np.r_[[0] * 10, [1] * 30] for e in range(6)])  # every frame's prompt (the
    # highest reward so far + 1, capped at the last task, as ladder_prompt), written out
    np.testing.assert_array_equal(s.prompt, hand)
    n = 4000
    b = s.sample(0, n)
    idx, task = b["latents"][:, :, 0, 0].long(), b["task"]  # (n, T) global frame indices, (n,)
    one = task == 1
    first = idx[one, 0] % 40
    assert first.min() == 10 - 8 + 1 and first.max() == 19 and len(set(first.tolist())) == 17  # every overlapping start
    assert set((idx[one, 0] // 40).tolist()) == {0, 3}
    torch.testing.assert_close(b["on_prompt"], torch.from_numpy(hand[idx.numpy()]) == task[:, None])
    zero = ~one  # task 0: prompted from frame 0 to its reward at 10; windows start at 0…9
    assert idx[zero, 0].remainder(40).max() == 9 and b["on_prompt"][zero].sum(1).min() >= 1
    event = ag.MixtureSampler(latents, actions, rewards, episodes, seq_len=8, seed=0)
    assert event.events[1] == [(20, 13, 19), (140, 133, 139)]  # event mode: the reward at position ≥ 1
    assert s.events[1] == [(20, 3, 19), (140, 123, 139)]


# ---------------------------------------------------------------- stepping with the KV cache

def test_cached_observe_and_imagine_equal_the_uncached_forward():
    """observe (commit a frame, read h_t) step by step equals one forward over the whole history at τ_ctx,
    beyond the window C; imagine_frame equals the K-step sampler on the uncached history."""
    model = tiny_agent(window=3)
    B, T, k = 2, 6, 4
    z, _, _, acts, task = inputs(B, T + 1)
    tau_c = dy.context_signal_level(0.9, 64)
    gen, gen2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    cache = common.KVCache(model.window)
    with torch.no_grad():
        hs = [ag.observe(model, cache, z[:, t], acts[:, t - 1] if t else None, task, 0.9, gen) for t in range(T)]
        z_new = ag.imagine_frame(model, cache, acts[:, T - 1], task, k, gen)
        assert cache.pos == T  # imagine_frame did not commit anything
        noise = torch.cat([torch.randn(B, 1, 4, 6, generator=gen2) for _ in range(T)], 1)  # the same draws
        hist = dy.corrupt(noise, z[:, :T], tau_c)
        prev, valid = dy.shift_actions(acts[:, :T])
        _, h_full = model(hist, torch.full((B, T), tau_c), torch.full((B, T), 1 / 64), prev, valid, task)
        torch.testing.assert_close(torch.stack(hs, 1), h_full, atol=1e-5, rtol=1e-4)
        prev, valid = dy.shift_actions(acts[:, :T + 1])

        def f(x, tau, d):  # the whole history at τ_ctx, then the frame being denoised
            taus = torch.cat([torch.full((B, T), tau_c), torch.full((B, 1), tau)], 1)
            ds = torch.cat([torch.full((B, T), 1 / 64), torch.full((B, 1), d)], 1)
            return model(torch.cat([hist, x], 1), taus, ds, prev, valid, task)[0][:, -1:]
        ref = dy.sample_frame(f, torch.randn(B, 1, 4, 6, generator=gen2), k)[:, 0]
        torch.testing.assert_close(z_new, ref, atol=1e-5, rtol=1e-4)
        z_step, h_step = ag.step_world_model(model, cache, acts[:, T - 1], task, k, 0.9, gen)
        assert z_step.shape == (B, 4, 6) and h_step.shape == (B, 32) and cache.pos == T + 1


def test_reprompt_rereads_the_cached_context_under_the_new_task():
    """A prompt switch while acting: after reprompt, observe equals an uncached pass over the last C frames (the
    same noisy inputs), all under the new task, as a training window; a row that keeps its prompt keeps its cache
    bit for bit; without reprompt the old task's cached agent tokens change h_t (what reprompt removes)."""
    C, B, T = 4, 2, 7
    model = tiny_agent(window=C, time_every=2)  # two time layers: the window re-read differs from sliding
    z, _, _, acts, _ = inputs(B, T)
    old, new = torch.tensor([0, 1]), torch.tensor([2, 1])  # row 0 switches 0 → 2, row 1 keeps task 1
    gen = torch.Generator().manual_seed(3)
    cache, record = common.KVCache(C), []
    with torch.no_grad():
        for t in range(T - 1):
            ag.observe(model, cache, z[:, t], acts[:, t - 1] if t else None, old, 0.9, gen, record)
        assert len(record) == C - 1 and cache.pos == T - 1
        kept = common.KVCache(C)
        kept.pos, kept.kv = cache.pos, dict(cache.kv)  # the cache without the re-read (tensors are replaced, not written)
        state = gen.get_state()
        ag.reprompt(model, cache, record, new, new != old, 0.9)
        window = list(record)
        h = ag.observe(model, cache, z[:, T - 1], acts[:, T - 2], new, 0.9, gen, record)
        window.append(record[-1])  # the last C frames' inputs
        h_kept = ag.observe(model, kept, z[:, T - 1], acts[:, T - 2], new, 0.9, gen.set_state(state))
        zw, prev, valid = (torch.cat(x, 1) for x in zip(*window))  # (B, C, 4, 6), (B, C, A), (B, C)
        tau_c = dy.context_signal_level(0.9, 64)
        _, h_ref = model(zw, torch.full((B, C), tau_c), torch.full((B, C), 1 / 64), prev, valid, new)  # uncached
    torch.testing.assert_close(h[0], h_ref[0, -1], atol=1e-5, rtol=1e-4)  # row 0: a fresh window under task 2
    assert torch.equal(h[1], h_kept[1])  # row 1 kept its prompt and its cache
    assert not torch.allclose(h_kept[0], h_ref[0, -1], atol=1e-3)  # the stale prompt mattered
    assert not torch.allclose(h_kept[1], h_ref[1, -1], atol=1e-3)  # and sliding ≠ re-read with two time layers


def test_ladder_prompt_follows_the_achievements_of_real_episodes():
    ep = data.rollout(data.ContractorPolicy(3), [data.episode_seed(0, "eval", i) for i in range(4)], 32, 256)
    level, agree = np.full(4, -1), []
    for t in range(256):
        prompt = ag.ladder_prompt(ep["frames"][:, t], level)
        done = ep["rewards"][:, :t + 1].max(1) > 0  # (4, n_tasks): achieved by frame t
        true_level = np.where(done.any(1), len(data.TASKS) - 1 - done[:, ::-1].argmax(1), -1)
        agree.append(prompt == np.minimum(true_level + 1, len(data.TASKS) - 1))
    assert ep["rewards"][:, :, 3].sum() >= 1  # the episodes climb past the first rungs
    assert np.mean(agree) > 0.98, np.mean(agree)  # (wood stolen on the step it was mined can delay it)


def test_reward_auc_against_pairwise_counting():
    assert ag.auc(np.array([0.9, 0.1, 0.3, 0.3]), np.array([True, False, False, True])) == pytest.approx(3.5 / 4)
    g = np.random.default_rng(0)
    s, y = g.integers(0, 5, 300) / 4, g.random(300) < 0.2  # many ties
    pairs = [1.0 if a > b else 0.5 if a == b else 0.0 for a in s[y] for b in s[~y]]
    assert ag.auc(s, y) == pytest.approx(np.mean(pairs))
    assert ag.auc(s, np.zeros(300, bool)) is None


# ---------------------------------------------------------------- learning: one fixed batch overfits

def test_fixed_batch_overfits():
    model = tiny_agent(mtp=2).train()
    g = torch.Generator().manual_seed(0)
    z, tau, d, acts, task = inputs(4, 6)
    rewards = (torch.rand(4, 6, generator=g) < 0.3).float()
    tgt = ag.mtp_targets(acts, rewards, 2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(80):
        _, h = model(z, tau, d, *dy.shift_actions(acts), task)
        out = ag.agent_loss(model.policy(h), model.reward_logits(h), tgt["actions"], tgt["rewards"], tgt["bc"],
                            tgt["reward"], model.bins)
        opt.zero_grad()
        (out["bc"] + out["reward"]).backward()
        opt.step()
        last = (out["bc"].item(), out["reward"].item())
        first = first or last
    assert last[0] < 0.3 * first[0] and last[1] < 0.3 * first[1], (first, last)


# ---------------------------------------------------------------- pipeline: smoke runs, resume, load_agent


@pytest.fixture(scope="module")
def smoke_dynamics(tmp_path_factory):
    """data → tokenizer → dynamics at --preset smoke, in-process (faster than three interpreters)."""
    tmp = tmp_path_factory.mktemp("agent")
    d, tok, dyn = str(tmp / "data"), str(tmp / "tok"), str(tmp / "dyn")
    data.main(["--preset", "smoke", "--out", d])
    tk.train(common.parse_args(tk.Args, tk.PRESETS, ["--preset", "smoke", "--data", d, "--out", tok,
                                                     "--lpips-weight", "0"]))
    dy.train(common.parse_args(dy.Args, dy.PRESETS, ["--preset", "smoke", "--tokenizer", os.path.join(tok, "ckpt.pt"),
                                                     "--out", dyn, "--eval-seqs", "0"]))
    return tmp, os.path.join(dyn, "ckpt.pt")


def agent_args(*argv):
    return common.parse_args(ag.Args, ag.PRESETS, ["--preset", "smoke", *argv])


def test_smoke_pipeline_summary_pictures_baseline_and_exact_resume(smoke_dynamics):
    tmp, dyn = smoke_dynamics
    scratch, full, part = str(tmp / "scratch"), str(tmp / "full"), str(tmp / "part")
    s0 = ag.train(agent_args("--dynamics", dyn, "--out", scratch, "--from-scratch", "--no-baselines"))
    assert s0["policy"] == "BC (scratch)" and "BC (scratch)" in s0["success"]
    run("agent.py", "--preset", "smoke", "--dynamics", dyn, "--out", full,
        "--compare", os.path.join(scratch, "summary.json"))
    for f in ("ckpt.pt", "args.json", "metrics.jsonl", "summary.json", "success.png", "reward_trace.png"):
        assert os.path.exists(os.path.join(full, f)), f
    s = json.load(open(os.path.join(full, "summary.json")))
    for key in ("stage", "preset", "device", "steps", "wall_s", "steps_per_s", "frames_per_s", "peak_mem_gb",
                "reward_precision", "reward_recall", "heldout_bc_nll", "success"):
        assert key in s, key
    assert s["stage"] == "agent" and s["steps"] == 6 and s["policy"] == "WM+BC"
    assert set(s["success"]) == {"WM+BC", "BC (scratch)", "random", "contractors"}
    assert set(s["success"]["WM+BC"]) == set(data.TASKS)
    rows = [json.loads(line) for line in open(os.path.join(full, "metrics.jsonl"))]
    assert {"video", "bc", "reward"} <= set(rows[-1])
    seg = ag.train(agent_args("--dynamics", dyn, "--out", str(tmp / "seg"), "--eval-episodes", "0", "--relevant", "segment"))
    assert math.isfinite(seg["heldout_bc_nll"]) and json.load(open(str(tmp / "seg" / "args.json")))["relevant"] == "segment"
    # The checkpoint chains to the dynamics checkpoint; load_agent rebuilds the same model.
    ckpt = torch.load(os.path.join(full, "ckpt.pt"), weights_only=True)
    assert ckpt["parent"]["stage"] == "dynamics" and ckpt["parent"]["weights_used"] and ckpt["format_version"] == 1
    model, _ = ag.load_agent(os.path.join(full, "ckpt.pt"))
    assert model.mtp == 8 and model.n_tasks == len(data.TASKS)
    # Interrupted at step 3, resumed: the same weights as the uninterrupted run.
    ag.train(agent_args("--dynamics", dyn, "--out", part, "--eval-episodes", "0", "--stop-at", "3"))
    ag.train(agent_args("--dynamics", dyn, "--out", part, "--eval-episodes", "0", "--resume"))
    b = torch.load(os.path.join(part, "ckpt.pt"), weights_only=True)
    assert b["step"] == 6
    for k in ckpt["model"]:
        torch.testing.assert_close(ckpt["model"][k], b["model"][k], atol=1e-6, rtol=1e-5)
    # The scratch baseline did not start from the world model.
    sc = torch.load(os.path.join(scratch, "ckpt.pt"), weights_only=True)
    dyn_w = torch.load(dyn, weights_only=True)["model"]["latent_in.weight"]
    assert not sc["parent"]["weights_used"] and not torch.allclose(sc["model"]["dyn.latent_in.weight"], dyn_w)


def test_missing_dynamics_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="python dynamics.py"):
        ag.train(agent_args("--dynamics", str(tmp_path / "no.pt"), "--out", str(tmp_path / "o")))
