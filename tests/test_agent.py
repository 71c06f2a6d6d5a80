"""Tests of agent.py (§3.3, Eq 9) and agent_eval.py, one behaviour each.

Exercises (README "Equation map and exercises"; each accepts any correct implementation), graded
by `python -m pytest tests/test_agent.py -k SELECTOR`:
    Eq 9 agent_loss, mtp_targets        -k "eq9 or mtp_targets"
    §3.3 agent_space_mask                -k "agent_space_mask or zero_gradient"
    reprompt (not in paper)              -k reprompt
    DreamerV3 symlog, symexp, twohot     -k "symlog or twohot"
"""

import json
import math
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import agent as ag
import agent_eval
import common
import data
import environment
import dynamics as dy
import dynamics_eval
import tokenizer as tk
from conftest import run

CLASSES = [5, 2, 2]  # a categorical move and two buttons
TAU_C = dy.context_signal_level(0.9, 64)  # τ_ctx on the K_max = 64 grid of the tiny models

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)


def tiny_agent(window=8, n_tasks=3, mtp=4, seed=0, time_every=4, space_rope_base=0.0):
    torch.manual_seed(seed)
    dyn = dy.DynamicsModel(latent_tokens=4, latent_dim=6, action_classes=CLASSES, dim=32, depth=4,
                           heads=4, kv_heads=2, registers=2, context=window, mlp_ratio=2.0,
                           k_max=64, time_every=time_every, space_rope_base=space_rope_base)
    return ag.AgentModel(dyn, n_tasks, head_hidden=16, mtp=mtp, bins=255).eval()


def inputs(B=2, T=5, seed=0):
    """Random model inputs: z̃ (B, T, 4, 6), τ, d on the grid, actions (B, T, A), tasks (B,)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, 4, 6, generator=g)
    tau, d = dy.sample_tau_d((B, T), 64, g)
    acts = torch.stack([torch.randint(0, n, (B, T), generator=g) for n in CLASSES], -1)
    return z, tau, d, acts, torch.randint(0, 3, (B,), generator=g)


def at_ctx(B, T):
    """τ and d of frames at the context level τ_ctx (what the heads read when acting)."""
    return torch.full((B, T), TAU_C), torch.full((B, T), 1 / 64)


# ---- §3.3 agent tokens: the attention mask both ways ---------------------------------------------

def test_agent_space_mask_matches_hand_written_table():
    # 3 world tokens (W: action, (τ, d), latents, registers) then 1 agent token (G);
    # row = query, column = key, True = may attend.
    expected = torch.tensor([
        # W  W  W  G
        [1, 1, 1, 0],  # W
        [1, 1, 1, 0],  # W
        [1, 1, 1, 0],  # W
        [1, 1, 1, 1],  # G
    ], dtype=torch.bool)
    got = ag.agent_space_mask(3, 1)
    assert got.dtype == torch.bool, f"expected a bool mask (True = may attend), got {got.dtype}"
    assert torch.equal(got, expected), (
        f"rows are queries, columns keys: the agent token (last) reads every token, no world "
        f"token reads it.\nexpected\n{expected.int()}\ngot\n{got.int()}")


@pytest.mark.parametrize("n_world,n_agent", [(5, 1), (9, 2)])
def test_agent_space_mask_world_tokens_never_attend_to_agent_tokens(n_world, n_agent):
    mask = ag.agent_space_mask(n_world, n_agent)
    assert mask.shape == (n_world + n_agent,) * 2, f"expected (N, N), got {tuple(mask.shape)}"
    assert not mask[:n_world, n_world:].any(), \
        f"world rows (queries) must not see the agent columns:\n{mask.int()}"


@pytest.mark.parametrize("n_world,n_agent", [(5, 1), (9, 2)])
def test_agent_space_mask_agent_tokens_attend_to_every_token(n_world, n_agent):
    mask = ag.agent_space_mask(n_world, n_agent)
    assert mask[n_world:].all(), f"agent rows must see every token (§3.3):\n{mask.int()}"


@pytest.mark.parametrize("n_world,n_agent", [(5, 1), (9, 2)])
def test_agent_space_mask_world_tokens_attend_to_each_other(n_world, n_agent):
    mask = ag.agent_space_mask(n_world, n_agent)
    assert mask[:n_world, :n_world].all(), \
        f"the world model's own attention stays as in stage 1b:\n{mask.int()}"


def test_frame_prediction_has_exactly_zero_gradient_from_the_agent_token():
    model = tiny_agent()
    z, tau, d, acts, task = inputs()
    z1, _ = model(z, tau, d, *dy.shift_actions(acts), task)
    v = torch.randn_like(z1)  # a random direction: ∂(v·ẑ₁)/∂(agent input), every frame at once
    agent_inputs = [model.agent_base, model.task_embed.weight]  # agent token = base + task
    grads = torch.autograd.grad((v * z1).sum(), agent_inputs, allow_unused=True)
    for name, g in zip(("agent_base", "task_embed"), grads):
        assert g is None or torch.count_nonzero(g) == 0, \
            f"ẑ₁ depends on {name}: a world token attends to the agent token (check the mask)"


def test_zero_gradient_check_detects_an_open_agent_column():
    """Control: with the agent column open, the same gradient is not zero (the check can fail)."""
    model = tiny_agent()
    model.space_mask = torch.ones_like(model.space_mask)
    z, tau, d, acts, task = inputs()
    z1, _ = model(z, tau, d, *dy.shift_actions(acts), task)
    v = torch.randn_like(z1)
    assert float(torch.autograd.grad((v * z1).sum(), model.agent_base)[0].abs().sum()) > 0


def test_frame_prediction_equals_the_world_models_own_with_space_rope():
    """The agent token is invisible to the world tokens, so the agent model predicts the frames
    exactly as its world model does, also one with 2-D RoPE in the space layers (the cpu
    preset's): stage 2 finetunes and stage 3 dreams in the model stage 1b trained."""
    model = tiny_agent(space_rope_base=10.0)
    z, tau, d, acts, task = inputs()
    prev = dy.shift_actions(acts)
    with torch.no_grad():
        z1, _ = model(z, tau, d, *prev, task)
        want = model.dyn(z, tau, d, *prev)  # (B, T, N_z, C_z) the world model alone
    err = float((z1 - want).abs().max())
    assert err < 1e-5, f"the agent model's ẑ₁ differs from its world model's by {err:.2e}"


def test_frame_prediction_check_detects_a_dropped_space_rope():
    """Control: without the world model's space positions the same check fails."""
    model = tiny_agent(space_rope_base=10.0)
    model.space_pos = None
    z, tau, d, acts, task = inputs()
    prev = dy.shift_actions(acts)
    with torch.no_grad():
        z1, _ = model(z, tau, d, *prev, task)
        assert float((z1 - model.dyn(z, tau, d, *prev)).abs().max()) > 1e-3


def test_agent_space_mask_keeps_frame_predictions_independent_of_the_task():
    model = tiny_agent()
    z, tau, d, acts, task = inputs()
    z1, _ = model(z, tau, d, *dy.shift_actions(acts), task)
    z1_other, _ = model(z, tau, d, *dy.shift_actions(acts), (task + 1) % 3)
    assert torch.equal(z1, z1_other), "another task prompt changed the frame prediction ẑ₁"


def test_agent_output_depends_on_the_task():
    model = tiny_agent()
    z, tau, d, acts, task = inputs()
    _, h = model(z, tau, d, *dy.shift_actions(acts), task)
    _, h_other = model(z, tau, d, *dy.shift_actions(acts), (task + 1) % 3)
    assert (h - h_other).abs().max() > 1e-4


def test_agent_output_does_not_see_the_action_taken_at_its_frame():
    model = tiny_agent()
    z, tau, d, acts, task = inputs(T=6)
    _, h = model(z, tau, d, *dy.shift_actions(acts), task)
    acts2 = acts.clone()
    acts2[:, 1, 0] = (acts[:, 1, 0] + 1) % 5  # a_1 is taken at frame 1 and leads into frame 2
    _, h2 = model(z, tau, d, *dy.shift_actions(acts2), task)
    assert torch.equal(h[:, :2], h2[:, :2])  # h_0, h_1 cannot know a_1


def test_agent_output_sees_the_previous_action():
    model = tiny_agent()
    z, tau, d, acts, task = inputs(T=6)
    _, h = model(z, tau, d, *dy.shift_actions(acts), task)
    acts2 = acts.clone()
    acts2[:, 1, 0] = (acts[:, 1, 0] + 1) % 5
    _, h2 = model(z, tau, d, *dy.shift_actions(acts2), task)
    assert (h[:, 2] - h2[:, 2]).abs().max() > 1e-4  # h_2 has seen a_1 (docs/conventions.md)


def test_agent_output_sees_its_frame_and_no_later_frame():
    model = tiny_agent()
    z, tau, d, acts, task = inputs(T=6)
    _, h = model(z, tau, d, *dy.shift_actions(acts), task)
    z2 = z.clone()
    z2[:, 3] += 1.0
    _, h3 = model(z2, tau, d, *dy.shift_actions(acts), task)
    assert torch.equal(h[:, :3], h3[:, :3]) and (h[:, 3] - h3[:, 3]).abs().max() > 1e-4


# ---- DreamerV3 symlog, symexp, twohot ------------------------------------------------------------

X = [-1e8, -5.0, -1.0, -1e-3, 0.0, 1e-3, 1.0, 5.0, 1e8]


def test_symlog_matches_its_formula():
    got = ag.symlog(torch.tensor(X, dtype=torch.float64)).tolist()
    for x, s in zip(X, got):
        want = math.copysign(math.log(1 + abs(x)), x)
        assert s == pytest.approx(want, rel=1e-12), \
            f"symlog({x}) = sign(x)·ln(1 + |x|) = {want}, got {s}"


def test_symexp_matches_its_formula():
    y = [-20.0, -3.0, -1e-3, 0.0, 1e-3, 3.0, 20.0]
    got = ag.symexp(torch.tensor(y, dtype=torch.float64)).tolist()
    for v, s in zip(y, got):
        want = math.copysign(math.expm1(abs(v)), v)
        assert s == pytest.approx(want, rel=1e-12), \
            f"symexp({v}) = sign(x)·(e^|x| − 1) = {want}, got {s}"


def test_symlog_and_symexp_invert_each_other_over_the_twohot_range():
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
            w[i] = (bins[i + 1] - y) / (bins[i + 1] - bins[i])
            w[i + 1] = (y - bins[i]) / (bins[i + 1] - bins[i])
            return w
    raise AssertionError("unreachable")


def values():
    """Rewards over the whole range, exact bin centres, small values, and two beyond the ends."""
    special = torch.tensor([0.0, 1.0, -1.0, 0.5, 1e12, -1e12])
    return torch.cat([ag.symexp(torch.linspace(-20, 20, 401)), special])  # (407,)


def test_twohot_bins_span_linspace_minus_20_to_20():
    bins = ag.twohot_bins(255)
    assert bins.shape == (255,), f"expected 255 bins, got {tuple(bins.shape)}"
    torch.testing.assert_close(bins, torch.linspace(-20, 20, 255), atol=1e-5, rtol=0,
                               msg="bins are linspace(−20, 20, 255) in symlog space (DreamerV3)")


def test_twohot_weights_sum_to_one_on_at_most_two_bins():
    w = ag.twohot(values(), ag.twohot_bins(255))  # (407, 255)
    torch.testing.assert_close(w.sum(-1), torch.ones(len(w)), msg="twohot weights must sum to 1")
    assert ((w.abs() > 1e-6).sum(-1) <= 2).all(), "twohot puts weight on at most two bins"


def test_twohot_matches_a_slow_transcription():
    bins = ag.twohot_bins(255)
    x = values()
    w = ag.twohot(x, bins)
    for i in (0, 57, 200, 333, 400, 401, 402, 403, 404, 405, 406):
        want = torch.tensor(slow_twohot(float(x[i]), bins.tolist()))
        torch.testing.assert_close(w[i], want, atol=1e-5, rtol=0,
                                   msg=f"twohot({float(x[i]):.4g}): symlog(x) is split linearly "
                                       f"between its two neighbouring bins")


def test_twohot_interpolates_symlog_x():
    bins = ag.twohot_bins(255)
    x = values()
    inside = x.abs() < 4e8
    w = ag.twohot(x, bins)
    torch.testing.assert_close((w * bins).sum(-1)[inside], ag.symlog(x)[inside], atol=1e-4, rtol=0,
                               msg="Σ_i w_i·b_i must equal symlog(x) (in symlog space, not x)")


def test_twohot_clamps_values_beyond_the_outer_bins():
    bins = ag.twohot_bins(255)
    w = ag.twohot(torch.tensor([1e12, -1e12]), bins)
    assert float(w[0, -1]) == pytest.approx(1.0) and float(w[1, 0]) == pytest.approx(1.0), \
        "values beyond ±symexp(20) belong wholly to the outer bin"


def test_twohot_mean_decodes_twohot_weights():
    bins = ag.twohot_bins(255)
    x = values()
    inside = x.abs() < 4e8
    logits = torch.log(ag.twohot(x, bins).clamp_min(1e-30))  # probabilities = the twohot weights
    decoded = ag.twohot_mean(logits, bins)
    torch.testing.assert_close(decoded[inside], x[inside], atol=1e-4, rtol=1e-4,
                               msg="twohot_mean = symexp(Σ_i softmax(logits)_i·b_i)")
    clamped = float(ag.symexp(torch.tensor(20.0)))
    assert float(decoded[-2]) == pytest.approx(clamped, rel=1e-4)


def test_twohot_nll_is_the_cross_entropy_with_the_twohot_target():
    bins = ag.twohot_bins()
    x = values()[[0, 200, 402]]
    logits = torch.randn(3, 255, generator=torch.Generator().manual_seed(0))
    nll = ag.twohot_nll(logits, x, bins)
    for j in range(3):
        row = logits[j].tolist()
        lse = math.log(sum(math.exp(v) for v in row))
        target = slow_twohot(float(x[j]), bins.tolist())
        want = -sum(w * (row[k] - lse) for k, w in enumerate(target))
        assert float(nll[j]) == pytest.approx(want, rel=1e-4), \
            f"−ln p(x) = −Σ_i twohot(x)_i·log_softmax(logits)_i = {want}, got {float(nll[j])}"


# exact zeros (outside the exercise: a numerical property, not the equation)

def test_bins_are_exactly_symmetric_around_an_exact_zero():
    bins = ag.twohot_bins(255)
    assert float(bins[127]) == 0 and float(bins[0]) == -20 and float(bins[-1]) == 20
    assert torch.equal(bins, -bins.flip(0))


def test_heads_predict_exactly_zero_reward_at_initialisation():
    model = tiny_agent()
    h = torch.randn(3, 5, 32)
    assert torch.equal(model.reward_logits(h), torch.zeros(3, 5, 4, 255))
    assert torch.equal(model.reward(h), torch.zeros(3, 5))  # exactly 0, not a float residue


def test_heads_start_as_a_uniform_policy():
    model = tiny_agent()
    lp = ag.action_log_prob(model.policy(torch.randn(3, 5, 32), offset=0),
                            torch.tensor([[[4, 1, 0]] * 5] * 3))
    torch.testing.assert_close(lp, torch.full((3, 5), -math.log(5 * 2 * 2)))


# ---- The factorised policy -----------------------------------------------------------------------

def sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def policy_logits(seed=0):
    raw = torch.randn(4, 7, generator=torch.Generator().manual_seed(seed))  # 5 moves + 2 buttons
    return raw, ag.split_policy_logits(raw, CLASSES)


def test_split_policy_logits_gives_one_tensor_per_component():
    _, logits = policy_logits()
    assert [lg.shape for lg in logits] == [(4, 5), (4, 2), (4, 2)]


def test_action_log_prob_sums_a_categorical_and_bernoulli_buttons():
    raw, logits = policy_logits()
    acts = torch.tensor([[0, 1, 0], [4, 0, 1], [2, 1, 1], [3, 0, 0]])
    got = ag.action_log_prob(logits, acts)
    for b in range(4):
        r = raw[b].tolist()
        move = r[acts[b, 0]] - math.log(sum(math.exp(v) for v in r[:5]))
        buttons = sum(math.log(sigmoid(r[5 + j]) if acts[b, 1 + j] else 1 - sigmoid(r[5 + j]))
                      for j in range(2))
        assert float(got[b]) == pytest.approx(move + buttons, rel=1e-5)


def test_action_kl_matches_a_slow_sum():
    _, p = policy_logits(0)
    _, q = policy_logits(1)
    kl = ag.action_kl(p, q)
    for b in range(4):
        ref = 0.0
        for lp, lq in zip(p, q):
            lp, lq = torch.log_softmax(lp[b].double(), -1), torch.log_softmax(lq[b].double(), -1)
            ref += sum(math.exp(lp[k]) * (lp[k] - lq[k]) for k in range(len(lp)))
        assert float(kl[b]) == pytest.approx(float(ref), rel=1e-4)


def test_action_kl_of_a_policy_with_itself_is_zero():
    _, p = policy_logits()
    assert torch.allclose(ag.action_kl(p, p), torch.zeros(4), atol=1e-6)


def test_sample_action_follows_the_categorical_probabilities():
    raw, logits = policy_logits()
    many = ag.sample_action([lg[:1].expand(20000, -1) for lg in logits],
                            torch.Generator().manual_seed(1))
    freq = torch.bincount(many[:, 0], minlength=5).float() / 20000
    torch.testing.assert_close(freq, torch.softmax(raw[0, :5], -1), atol=0.015, rtol=0)


def test_sample_action_follows_the_bernoulli_probabilities():
    raw, logits = policy_logits()
    many = ag.sample_action([lg[:1].expand(20000, -1) for lg in logits],
                            torch.Generator().manual_seed(1))
    assert float(many[:, 1].float().mean()) == pytest.approx(sigmoid(float(raw[0, 5])), abs=0.015)


# ---- Eq 9: MTP targets and masks on a hand-made episode, and the loss ----------------------------

def hand_episode():
    """frame_0 -a_0-> frame_1 -a_1-> frame_2 -a_2-> frame_3 (r_3 = 1: a_2 earned it) -a_3-> …
    a_t = (t, t mod 2); T = 6, L = 3; the task's event is at window position 3."""
    T = 6
    actions = torch.tensor([[[t, t % 2] for t in range(T)]])  # (1, T, 2)
    rewards = torch.tensor([[0.0, 0, 0, 1, 0, 0]])  # r_3: received on entering frame 3
    return actions, rewards, ag.mtp_targets(actions, rewards, 3, event=torch.tensor([3]))


def test_mtp_targets_gather_a_t_plus_n_and_r_t_plus_n():
    actions, rewards, tgt = hand_episode()
    for t in range(6):
        for n in range(3):
            if t + n < 6:  # entries past the end are masked: any value is accepted there
                assert tgt["actions"][0, t, n].tolist() == [t + n, (t + n) % 2], \
                    f"h_{t} at offset {n} predicts a_{t + n} (the action taken at frame {t + n})"
                assert float(tgt["rewards"][0, t, n]) == float(rewards[0, t + n]), \
                    f"h_{t} at offset {n} predicts r_{t + n} (received on entering frame {t + n})"


def test_mtp_targets_mask_offsets_past_the_window_end():
    _, _, tgt = hand_episode()
    for t in range(6):
        for n in range(3):
            assert bool(tgt["inside"][0, t, n]) == (t + n < 6), \
                f"inside[t={t}, n={n}] must be t + n < T (masked past the end, never padded)"


def test_mtp_targets_bc_mask_stops_at_the_event():
    _, _, tgt = hand_episode()
    for t in range(6):
        for n in range(3):
            assert bool(tgt["bc"][0, t, n]) == (t + n <= 2), \
                f"bc[t={t}, n={n}]: BC runs up to a_2, the action that earned r_3 (t + n < event)"


def test_mtp_targets_bc_mask_without_an_event_is_every_inside_offset():
    actions, rewards, _ = hand_episode()
    tgt = ag.mtp_targets(actions, rewards, 3, event=torch.tensor([-1]))
    assert torch.equal(tgt["bc"].bool(), tgt["inside"].bool()), "event −1: no event, BC everywhere"


def test_mtp_targets_reward_mask_drops_only_r0_of_the_first_frame():
    _, _, tgt = hand_episode()
    for t in range(6):
        for n in range(3):
            want = t + n < 6 and (t, n) != (0, 0)
            assert bool(tgt["reward"][0, t, n]) == want, \
                f"reward[t={t}, n={n}]: inside, except r_0 (h_0 never saw the step into frame 0)"


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
                    w = slow_twohot(float(rewards[b, t, n]), bins.tolist())
                    sr -= sum(wk * (lg[k] - lse) for k, wk in enumerate(w) if wk)
                    nr += 1
    return sa / na, sr / nr


def eq9_case():
    g = torch.Generator().manual_seed(0)
    B, T, L = 2, 4, 3
    pol = ag.split_policy_logits(torch.randn(B, T, L, 7, generator=g), CLASSES)
    rew = torch.randn(B, T, L, 255, generator=g)
    actions = torch.stack([torch.randint(0, n, (B, T, L), generator=g) for n in CLASSES], -1)
    rewards = torch.tensor([0.0, 1.0, -3.0, 250.0])[torch.randint(0, 4, (B, T, L), generator=g)]
    bc_mask = torch.rand(B, T, L, generator=g) < 0.6
    reward_mask = torch.rand(B, T, L, generator=g) < 0.8
    case = (pol, rew, actions, rewards, bc_mask, reward_mask, ag.twohot_bins())
    return ag.agent_loss(*case), slow_eq9(*case)


def test_eq9_bc_term_matches_slow_transcription():
    out, (bc, _) = eq9_case()
    assert float(out["bc"]) == pytest.approx(bc, rel=1e-5), \
        f"bc = masked mean over (row, t, n) of −Σ_c ln p_c(a_{{t+n}} | h_t): want {bc}"


def test_eq9_reward_term_matches_slow_transcription():
    out, (_, r) = eq9_case()
    assert float(out["reward"]) == pytest.approx(r, rel=1e-5), \
        f"reward = masked mean of the twohot NLL of r_{{t+n}}: want {r}"


# ---- The data mixture (§3.3) ---------------------------------------------------------------------

def synthetic_split(n_eps=6, length=40, n_tasks=3):
    """Episodes whose latent [.., 0, 0] is the global frame index; task 0 in every episode (frame
    10), task 1 in two (frame 20), task 2 in one (frame 30)."""
    latents = np.zeros((n_eps * length, 2, 2), np.float32)
    latents[:, 0, 0] = np.arange(n_eps * length)
    rewards = np.zeros((n_eps * length, n_tasks), np.float32)
    for e in range(n_eps):
        rewards[e * length + 10, 0] = 1
    rewards[0 * length + 20, 1] = rewards[3 * length + 20, 1] = rewards[5 * length + 30, 2] = 1
    episodes = [{"offset": e * length, "length": length} for e in range(n_eps)]
    return latents, np.zeros((n_eps * length, 2), np.int64), rewards, episodes


N = 6000


@pytest.fixture(scope="module")
def mixture():
    """A sampler over the synthetic split and one big batch: N uniform rows, N relevant rows."""
    s = ag.MixtureSampler(*synthetic_split(), seq_len=8, seed=0)
    b = s.sample(N, N)
    return s, b, b["latents"][:, :, 0, 0].long()  # (2N, T) global frame indices


def test_mixture_sampler_puts_uniform_rows_first_then_relevant(mixture):
    _, b, _ = mixture
    assert b["relevant"].tolist() == [False] * N + [True] * N


def test_mixture_sampler_windows_are_contiguous_inside_one_episode(mixture):
    _, _, idx = mixture
    assert (idx.diff(dim=1) == 1).all() and (idx[:, 0] // 40 == idx[:, -1] // 40).all()


def test_mixture_sampler_relevant_tasks_are_uniform_among_tasks_with_events(mixture):
    _, b, _ = mixture
    tasks = b["task"][N:]  # rare rungs are not drowned out
    for k in range(3):
        assert float((tasks == k).float().mean()) == pytest.approx(1 / 3, abs=0.02)


def test_mixture_sampler_relevant_windows_hold_the_event_at_position_1_or_later(mixture):
    _, b, _ = mixture
    ev, tasks = b["event"][N:], b["task"][N:]
    assert (ev >= 1).all()  # the event is inside, with the action that caused it
    assert (b["rewards"][N:][torch.arange(N), ev, tasks] == 1).all()


def test_mixture_sampler_uniform_rows_get_uniform_prompts(mixture):
    _, b, _ = mixture
    for k in range(3):
        assert float((b["task"][:N] == k).float().mean()) == pytest.approx(1 / 3, abs=0.02)


def test_mixture_sampler_uniform_windows_cover_every_start_equally(mixture):
    _, _, idx = mixture
    first = idx[:N, 0]
    assert (first % 40 <= 32).all()  # every valid start (40 − 8 + 1 per episode) …
    counts = torch.bincount(first // 40, minlength=6).float() / N
    torch.testing.assert_close(counts, torch.full((6,), 1 / 6), atol=0.02, rtol=0)  # … equally


def test_mixture_sampler_event_windows_are_the_starts_holding_it_at_position_1_or_later(mixture):
    s, _, _ = mixture
    assert s.events[1] == [(20, 13, 19), (140, 133, 139)]  # (event frame, first start, last start)


def test_default_batch_is_half_uniform_half_relevant():
    assert int(round(ag.Args.batch * ag.Args.relevant_frac)) * 2 == ag.Args.batch


# ---- Stepping with the KV cache ------------------------------------------------------------------

def stepped(model, B=2, T=6, k=4):
    """observe T frames one by one (generator seed 5), then imagine frame T; returns everything
    needed to redo the same steps without the cache."""
    z, _, _, acts, task = inputs(B, T + 1)
    gen = torch.Generator().manual_seed(5)
    cache = common.KVCache(model.window)
    with torch.no_grad():
        hs = [ag.observe(model, cache, z[:, t], acts[:, t - 1] if t else None, task, 0.9, gen)
              for t in range(T)]
        z_new = ag.imagine_frame(model, cache, acts[:, T - 1], task, k, gen)
    return z, acts, task, cache, torch.stack(hs, 1), z_new


def history(z, T, B=2):
    """The noisy history the cached steps saw: the same draws from a generator seeded 5."""
    gen = torch.Generator().manual_seed(5)
    noise = torch.cat([torch.randn(B, 1, 4, 6, generator=gen) for _ in range(T)], 1)
    return dy.corrupt(noise, z[:, :T], TAU_C), gen


def test_cached_observe_equals_the_uncached_forward_beyond_the_window():
    model = tiny_agent(window=3)
    z, acts, task, _, hs, _ = stepped(model)
    hist, _ = history(z, 6)
    with torch.no_grad():
        _, h_full = model(hist, *at_ctx(2, 6), *dy.shift_actions(acts[:, :6]), task)
    torch.testing.assert_close(hs, h_full, atol=1e-5, rtol=1e-4)


def test_imagine_frame_equals_the_sampler_on_the_uncached_history():
    model = tiny_agent(window=3)
    z, acts, task, _, _, z_new = stepped(model)
    hist, gen = history(z, 6)
    prev, valid = dy.shift_actions(acts[:, :7])

    def f(x, tau, d):  # the whole history at τ_ctx, then the frame being denoised
        taus = torch.cat([torch.full((2, 6), TAU_C), torch.full((2, 1), tau)], 1)
        ds = torch.cat([torch.full((2, 6), 1 / 64), torch.full((2, 1), d)], 1)
        return model(torch.cat([hist, x], 1), taus, ds, prev, valid, task)[0][:, -1:]

    with torch.no_grad():
        ref = dy.sample_frame(f, torch.randn(2, 1, 4, 6, generator=gen), 4)[:, 0]
    torch.testing.assert_close(z_new, ref, atol=1e-5, rtol=1e-4)


def test_imagine_frame_does_not_commit_to_the_cache():
    _, _, _, cache, _, _ = stepped(tiny_agent(window=3))
    assert cache.pos == 6


def test_step_world_model_commits_one_frame_and_returns_it_with_h():
    model = tiny_agent(window=3)
    _, acts, task, cache, _, _ = stepped(model)
    with torch.no_grad():
        z_step, h_step = ag.step_world_model(model, cache, acts[:, 5], task, 4, 0.9,
                                             torch.Generator().manual_seed(0))
    assert z_step.shape == (2, 4, 6) and h_step.shape == (2, 32) and cache.pos == 7


# ---- reprompt: a prompt switch while acting (not in paper) ---------------------------------------

C, OLD, NEW = 4, torch.tensor([0, 1]), torch.tensor([2, 1])  # row 0 switches 0 → 2, row 1 keeps 1


def before_switch():
    """Two rows observed for 6 frames under OLD with a record; the cache and a deep copy of it.
    Two time layers: re-reading a window differs from sliding it (so the check has power)."""
    model = tiny_agent(window=C, time_every=2)
    z, _, _, acts, _ = inputs(2, 7)
    gen = torch.Generator().manual_seed(3)
    cache, record = common.KVCache(C), []
    with torch.no_grad():
        for t in range(6):
            ag.observe(model, cache, z[:, t], acts[:, t - 1] if t else None, OLD, 0.9, gen, record)
    kept = common.KVCache(C)  # the cache as it was, whatever reprompt does to `cache`
    kept.pos = cache.pos
    kept.kv = {i: (k.clone(), v.clone()) for i, (k, v) in cache.kv.items()}
    return model, z, acts, gen, cache, record, kept


def next_step(model, cache, z, acts, gen, record=None):
    """observe frame 6 under NEW with a copy of `gen` (the same noise for every variant)."""
    g = torch.Generator().manual_seed(0)
    g.set_state(gen.get_state())
    with torch.no_grad():
        return ag.observe(model, cache, z[:, 6], acts[:, 5], NEW, 0.9, g, record)


def fresh_window(model, record):
    """h of the last frame of an uncached pass over the last C frames' inputs, all under NEW."""
    zw, prev, valid = (torch.cat(x, 1) for x in zip(*record))  # (B, C, 4, 6), (B, C, A), (B, C)
    with torch.no_grad():
        return model(zw, *at_ctx(2, C), prev, valid, NEW)[1][:, -1]


def test_reprompt_makes_observe_equal_a_fresh_window_under_the_new_task():
    model, z, acts, gen, cache, record, _ = before_switch()
    with torch.no_grad():
        ag.reprompt(model, cache, record, NEW, NEW != OLD, 0.9)
    window = list(record)
    h = next_step(model, cache, z, acts, gen, record)
    window.append(record[-1])
    torch.testing.assert_close(h[0], fresh_window(model, window)[0], atol=1e-5, rtol=1e-4,
                               msg="after reprompt, the switched row's h_t must equal an uncached "
                                   "pass over the last C frames (same noisy inputs) under the new "
                                   "task, at the same absolute positions")


def test_reprompt_keeps_the_cache_of_rows_whose_prompt_did_not_switch():
    model, z, acts, gen, cache, record, kept = before_switch()
    with torch.no_grad():
        ag.reprompt(model, cache, record, NEW, NEW != OLD, 0.9)
    h = next_step(model, cache, z, acts, gen)
    h_kept = next_step(model, kept, z, acts, gen)
    assert torch.equal(h[1], h_kept[1]), "row 1 kept its prompt: its cache must stay bit for bit"


def test_reprompt_without_a_switch_leaves_the_cache_unchanged():
    model, _, _, _, cache, record, kept = before_switch()
    with torch.no_grad():
        ag.reprompt(model, cache, record, OLD, torch.zeros(2, dtype=torch.bool), 0.9)
    assert cache.pos == kept.pos
    for i, (k, v) in kept.kv.items():
        assert torch.equal(cache.kv[i][0], k) and torch.equal(cache.kv[i][1], v)


def test_reprompt_is_needed_the_stale_prompt_changes_h():
    """Control: without reprompt, the old task's cached agent tokens change h_t of row 0."""
    model, z, acts, gen, _, record, kept = before_switch()
    window = list(record)
    h_kept = next_step(model, kept, z, acts, gen, record)
    window.append(record[-1])
    assert not torch.allclose(h_kept[0], fresh_window(model, window)[0], atol=1e-3)


def test_reprompt_check_has_power_sliding_differs_from_rereading():
    """Control: row 1 (no switch) slides its cache; with two time layers that differs from a
    re-read window, so keeping a row's cache is a real choice the reprompt tests can see."""
    model, z, acts, gen, _, record, kept = before_switch()
    window = list(record)
    h_kept = next_step(model, kept, z, acts, gen, record)
    window.append(record[-1])
    assert not torch.allclose(h_kept[1], fresh_window(model, window)[1], atol=1e-3)


# ---- Acting: the evaluation prompt ladder (Table 6) ----------------------------------------------

def test_ladder_prompt_follows_the_achievements_of_real_episodes():
    seeds = [environment.episode_seed(0, "eval", i) for i in range(4)]
    ep = environment.rollout(environment.ContractorPolicy(3), seeds, 32, 256)
    assert ep["rewards"][:, :, 3].sum() >= 1  # precondition: episodes climb past the first rungs
    level, agree = np.full(4, -1), []
    for t in range(256):
        prompt = ag.ladder_prompt(ep["frames"][:, t], level)
        done = ep["rewards"][:, :t + 1].max(1) > 0  # (4, n_tasks): achieved by frame t
        true_level = np.where(done.any(1), len(environment.TASKS) - 1 - done[:, ::-1].argmax(1), -1)
        agree.append(prompt == np.minimum(true_level + 1, len(environment.TASKS) - 1))
    assert np.mean(agree) > 0.98, np.mean(agree)  # (wood stolen on the step it was mined: a delay)


# ---- agent_eval: reward-event AUC ----------------------------------------------------------------

def test_auc_of_a_hand_made_example():
    scores, labels = np.array([0.9, 0.1, 0.3, 0.3]), np.array([True, False, False, True])
    assert agent_eval.auc(scores, labels) == pytest.approx(3.5 / 4)


def test_auc_counts_ties_half_as_pairwise_counting_does():
    g = np.random.default_rng(0)
    s, y = g.integers(0, 5, 300) / 4, g.random(300) < 0.2  # many ties
    pairs = [1.0 if a > b else 0.5 if a == b else 0.0 for a in s[y] for b in s[~y]]
    assert agent_eval.auc(s, y) == pytest.approx(np.mean(pairs))


def test_auc_is_none_without_events():
    assert agent_eval.auc(np.linspace(0, 1, 300), np.zeros(300, bool)) is None


def test_reward_events_per_task_against_a_hand_made_table(monkeypatch):
    """Two tasks, one episode of 6 frames; r̂ of frames 1…5 fixed by hand. Task a: events at
    frames 2 and 4, predicted (r̂ > 0.5) at 2 and 3 → recall 1/2, precision 1/2; its AUC from the
    scores by hand: events (0.9, 0.2) vs non-events (0.1, 0.6, 0.1) → (3 + 2) / 6. Task b: no
    event → recall and AUC n/a; nothing predicted → precision n/a."""
    r_hat = torch.tensor([[0.0, 0.1, 0.9, 0.6, 0.2, 0.1],
                          [0.0, 0.3, 0.1, 0.2, 0.4, 0.0]])  # (n_tasks, T): frame 0 is not scored
    monkeypatch.setattr(agent_eval, "predict_rewards", lambda *args: r_hat)
    rewards = np.zeros((6, 2), np.float32)
    rewards[[2, 4], 0] = 1.0
    held = SimpleNamespace(episodes=[{"offset": 0, "length": 6}], meta={"tasks": ["a", "b"]},
                           latents=np.zeros((6, 4, 2), np.float32),
                           actions=np.zeros((6, 1), np.int64), rewards=rewards)
    out = agent_eval.reward_events(SimpleNamespace(bins=torch.zeros(1)), held, 0.9, None)
    assert out["reward_recall_per_task"] == {"a": 0.5, "b": None}
    assert out["reward_precision_per_task"] == {"a": 0.5, "b": None}
    assert out["reward_auc_per_task"]["a"] == pytest.approx(5 / 6)
    assert out["reward_auc_per_task"]["b"] is None


# ---- Learning: one fixed batch overfits ----------------------------------------------------------

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
        out = ag.agent_loss(model.policy(h), model.reward_logits(h), tgt["actions"],
                            tgt["rewards"], tgt["bc"], tgt["reward"], model.bins)
        opt.zero_grad()
        (out["bc"] + out["reward"]).backward()
        opt.step()
        last = (out["bc"].item(), out["reward"].item())
        first = first or last
    assert last[0] < 0.3 * first[0] and last[1] < 0.3 * first[1], (first, last)


def test_history_stream_video_pass_matches_the_world_models_cached_pass():
    """Phase 2 keeps a --ctx-stream world model's video loss in its stage-1b layout: a loss frame
    of the agent's two-stream pass (one more token per frame, the agent's) gets the world model's
    cached sampling output — the agent token does not leak into the latents."""
    model = tiny_agent()
    T, t = 4, 2
    hist, z = torch.tanh(torch.randn(1, T, 4, 6)), torch.randn(1, T, 4, 6)
    acts = torch.stack([torch.randint(0, n, (1, T)) for n in CLASSES], -1)  # (1, T, A)
    prev, valid = dy.shift_actions(acts)
    tau, d = torch.full((1, T), 0.25), torch.full((1, T), 0.25)
    *x, layout = dy.history_stream(z, tau, d, hist, prev, valid, None, TAU_C, 64, 8,
                                   2 + 4 + 2 + 1)
    two = model(*x, torch.zeros(1, dtype=torch.long), time_layout=layout)[0][:, T:]
    cache = common.KVCache(8)
    model.dyn(hist[:, :t], torch.full((1, t), TAU_C), torch.full((1, t), 1 / 64), prev[:, :t],
              valid[:, :t], cache=cache, commit=True)
    one = model.dyn(z[:, t:t + 1], tau[:, t:t + 1], d[:, t:t + 1], prev[:, t:t + 1],
                    valid[:, t:t + 1], cache=cache)
    torch.testing.assert_close(two[:, t], one[:, 0], atol=1e-5, rtol=1e-4)


# ---- Pipeline: smoke runs, resume, load_agent, re-evaluation -------------------------------------


@pytest.fixture(scope="module")
def smoke_dynamics(tmp_path_factory):
    """data → tokenizer → dynamics at --preset smoke, in-process (faster than 3 interpreters)."""
    tmp = tmp_path_factory.mktemp("agent")
    d, tok, dyn = str(tmp / "data"), str(tmp / "tok"), str(tmp / "dyn")
    data.main(["--preset", "smoke", "--out", d])
    tk.train(common.parse_args(tk.Args, tk.PRESETS, ["--preset", "smoke", "--data", d, "--out", tok,
                                                     "--lpips-weight", "0"]))
    dy.train(common.parse_args(dy.Args, dy.PRESETS, [
        "--preset", "smoke", "--tokenizer", os.path.join(tok, "ckpt.pt"), "--out", dyn,
        "--eval-seqs", "0"]))
    return tmp, os.path.join(dyn, "ckpt.pt")


def agent_args(*argv):
    return common.parse_args(ag.Args, ag.PRESETS, ["--preset", "smoke", *argv])


@pytest.fixture(scope="module")
def smoke_runs(smoke_dynamics):
    """The BC baseline (in-process), WM+BC beside it (as a user runs it), and WM+BC interrupted at
    step 3 then resumed."""
    tmp, dyn = smoke_dynamics
    runs = {k: str(tmp / k) for k in ("scratch", "full", "part")}
    ag.train(agent_args("--dynamics", dyn, "--out", runs["scratch"], "--from-scratch",
                        "--no-baselines"))
    run("agent.py", "--preset", "smoke", "--dynamics", dyn, "--out", runs["full"],
        "--compare", os.path.join(runs["scratch"], "summary.json"))
    ag.train(agent_args("--dynamics", dyn, "--out", runs["part"], "--eval-episodes", "0",
                        "--stop-at", "3"))
    ag.train(agent_args("--dynamics", dyn, "--out", runs["part"], "--eval-episodes", "0",
                        "--resume"))
    return dyn, runs


def summary_of(folder):
    return json.load(open(os.path.join(folder, "summary.json")))


def test_smoke_run_writes_checkpoint_metrics_summary_and_pictures(smoke_runs):
    _, runs = smoke_runs
    for f in ("ckpt.pt", "args.json", "metrics.jsonl", "summary.json", "success.png",
              "reward_trace.png"):
        assert os.path.exists(os.path.join(runs["full"], f)), f


def test_smoke_summary_holds_the_headline_and_diagnostic_figures(smoke_runs):
    s = summary_of(smoke_runs[1]["full"])
    for key in ("stage", "preset", "device", "steps", "wall_s", "steps_per_s", "frames_per_s",
                "peak_mem_gb", "reward_precision", "reward_recall", "reward_auc",
                "heldout_bc_nll", "heldout_move_acc", "success"):
        assert key in s, key
    assert s["stage"] == "agent" and s["steps"] == 6 and s["policy"] == "WM+BC"
    assert set(s["success"]["WM+BC"]) == set(environment.TASKS)


def test_smoke_summary_shows_every_policy_column(smoke_runs):
    s = summary_of(smoke_runs[1]["full"])
    assert set(s["success"]) == {"WM+BC", "BC (scratch)", "random", "contractors"}


def test_from_scratch_run_is_the_bc_column(smoke_runs):
    s = summary_of(smoke_runs[1]["scratch"])
    assert s["policy"] == "BC (scratch)" and set(s["success"]) == {"BC (scratch)"}  # no baselines


def test_metrics_log_every_loss_term(smoke_runs):
    rows = [json.loads(line) for line in open(os.path.join(smoke_runs[1]["full"], "metrics.jsonl"))]
    assert {"video", "bc", "reward", "move_acc"} <= set(rows[-1])


def test_agent_trains_on_a_history_stream_world_model(smoke_dynamics):
    """A --ctx-stream world model: phase 2's video loss runs in its two-stream layout."""
    tmp, _ = smoke_dynamics
    dyn, out = str(tmp / "dyn_ctx_stream"), str(tmp / "agent_ctx_stream")
    dy.train(common.parse_args(dy.Args, dy.PRESETS, [
        "--preset", "smoke", "--tokenizer", str(tmp / "tok" / "ckpt.pt"), "--out", dyn,
        "--ctx-stream", "--steps", "2", "--eval-seqs", "0"]))
    ag.train(agent_args("--dynamics", os.path.join(dyn, "ckpt.pt"), "--out", out, "--steps", "2",
                        "--eval-episodes", "0", "--no-baselines"))
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert math.isfinite(rows[-1]["video"]) and rows[-1]["video"] > 0


def test_phase_2_video_loss_keeps_the_world_models_milestone_and_inventory_rows(smoke_dynamics):
    """A world model trained with --event-frac and --inventory-frac: phase 2's video loss adds the
    same shares of its uniform half (smoke: 2 uniform rows, 1 + 1 more), and none without them."""
    tmp, _ = smoke_dynamics
    dyn, out = str(tmp / "dyn_rows"), str(tmp / "agent_rows")
    dy.train(common.parse_args(dy.Args, dy.PRESETS, [
        "--preset", "smoke", "--tokenizer", str(tmp / "tok" / "ckpt.pt"), "--out", dyn,
        "--event-frac", "0.5", "--inventory-frac", "0.5", "--steps", "2", "--eval-seqs", "0"]))
    for flag, rows in (("--event-rows", 4), ("--no-event-rows", 2)):
        ag.train(agent_args("--dynamics", os.path.join(dyn, "ckpt.pt"), "--out", out, flag,
                            "--steps", "2", "--eval-episodes", "0", "--no-baselines"))
        s = summary_of(out)
        assert (s["video_rows"], s["video_event_rows"]) == (rows, rows - 2)
        assert math.isfinite(s["heldout_bc_nll"])


def test_event_rows_say_so_when_the_world_model_has_none_to_keep(smoke_dynamics, capsys):
    tmp, dyn = smoke_dynamics  # the smoke world model: no milestone or inventory rows
    ag.train(agent_args("--dynamics", dyn, "--out", str(tmp / "agent_no_rows"), "--event-rows",
                        "--steps", "1", "--eval-episodes", "0", "--no-baselines"))
    assert "--event-rows has nothing to keep" in capsys.readouterr().out
    assert summary_of(str(tmp / "agent_no_rows"))["video_event_rows"] == 0


def test_checkpoint_chains_to_the_dynamics_checkpoint(smoke_runs):
    dyn, runs = smoke_runs
    ckpt = torch.load(os.path.join(runs["full"], "ckpt.pt"), weights_only=True)
    assert ckpt["parent"]["stage"] == "dynamics" and ckpt["parent"]["weights_used"]
    assert ckpt["parent"]["path"] == os.path.abspath(dyn) and ckpt["format_version"] == 1


def test_load_agent_rebuilds_the_trained_model(smoke_runs):
    path = os.path.join(smoke_runs[1]["full"], "ckpt.pt")
    model, _ = ag.load_agent(path)
    assert model.mtp == 8 and model.n_tasks == len(environment.TASKS)
    saved = torch.load(path, weights_only=True)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_resume_continues_to_the_weights_of_an_uninterrupted_run(smoke_runs):
    _, runs = smoke_runs
    a = torch.load(os.path.join(runs["full"], "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(runs["part"], "ckpt.pt"), weights_only=True)
    assert b["step"] == 6
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-6, rtol=1e-5)


def test_from_scratch_does_not_start_from_the_world_model(smoke_runs):
    dyn, runs = smoke_runs
    sc = torch.load(os.path.join(runs["scratch"], "ckpt.pt"), weights_only=True)
    dyn_w = torch.load(dyn, weights_only=True)["model"]["latent_in.weight"]
    assert not sc["parent"]["weights_used"]
    assert not torch.allclose(sc["model"]["dyn.latent_in.weight"], dyn_w)


def test_agent_eval_reproduces_the_summary_of_a_finished_run(smoke_runs, tmp_path):
    _, runs = smoke_runs
    copy = str(tmp_path / "full")
    shutil.copytree(runs["full"], copy)
    run("agent_eval.py", copy)
    timing = ("wall_s", "steps_per_s", "frames_per_s", "peak_mem_gb", "eval_s")
    before, after = summary_of(runs["full"]), summary_of(copy)
    for key in set(before) | set(after):
        if key not in timing:
            assert before.get(key) == after.get(key), key


def test_agent_eval_flags_override_the_run_arguments(smoke_runs, tmp_path):
    _, runs = smoke_runs
    copy = str(tmp_path / "full")
    shutil.copytree(runs["full"], copy)
    agent_eval.main([copy, "--eval-episodes", "0", "--no-reprompt"])
    s = summary_of(copy)
    assert "success" not in s and "compared_with" not in s and not s["reprompt"]
    assert s["eval_episodes"] == 0 and s["steps"] == 6  # the training keys stay


def test_agent_eval_without_episodes_removes_the_old_pictures(smoke_runs, tmp_path):
    copy = str(tmp_path / "full")
    shutil.copytree(smoke_runs[1]["full"], copy)
    agent_eval.main([copy, "--eval-episodes", "0"])
    assert not os.path.exists(os.path.join(copy, "success.png"))
    assert not os.path.exists(os.path.join(copy, "reward_trace.png"))


def test_phase_2_world_model_holding_the_stage_1b_weights_scores_as_stage_1b(smoke_runs,
                                                                            tmp_path):
    """dynamics_eval --weights reads the world model out of an agent checkpoint: given one whose
    `dyn.` weights are the dynamics run's own, it reproduces the run's figures."""
    dyn, runs = smoke_runs
    agent_ckpt = torch.load(os.path.join(runs["full"], "ckpt.pt"), weights_only=True)
    stage_1b, _ = dy.load_dynamics(dyn)  # the EMA weights agent.py starts from
    for k, v in stage_1b.state_dict().items():
        agent_ckpt["model"]["dyn." + k] = v
    fake = str(tmp_path / "agent" / "ckpt.pt")
    os.makedirs(os.path.dirname(fake))
    torch.save(agent_ckpt, fake)
    run_dir = os.path.dirname(dyn)
    own = dynamics_eval.main([run_dir, "--eval-seqs", "2", "--out", str(tmp_path / "own")])
    read = dynamics_eval.main([run_dir, "--eval-seqs", "2", "--weights", fake])
    assert read["psnr_k4"] == own["psnr_k4"]
    assert read["action_shuffle_gap_db"] == own["action_shuffle_gap_db"]


def test_phase_2_world_model_is_measured_into_the_agent_folder(smoke_runs):
    dyn, runs = smoke_runs
    before = open(os.path.join(os.path.dirname(dyn), "summary.json")).read()
    dynamics_eval.main([os.path.dirname(dyn), "--eval-seqs", "2",
                        "--weights", os.path.join(runs["full"], "ckpt.pt")])
    s = summary_of(os.path.join(runs["full"], "world_model"))
    assert s["weights_stage"] == "agent (phase 2)" and s["weights_step"] == 6
    assert math.isfinite(s["psnr_k4"]) and os.path.exists(
        os.path.join(runs["full"], "world_model", "rollout.png"))
    assert open(os.path.join(os.path.dirname(dyn), "summary.json")).read() == before


def test_missing_dynamics_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="python dynamics.py"):
        ag.train(agent_args("--dynamics", str(tmp_path / "no.pt"), "--out", str(tmp_path / "o")))
