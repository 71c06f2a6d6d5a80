"""Tests of dynamics.py: Eqs 2, 4, 6, 7, 8 against slow re-derivations, the sampler against an oracle,
a 1-D toy flow, the KV-cached rollout, action conditioning, and the smoke pipeline + resume
(PITFALLS.md 1-4, 8, 12)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import dynamics as dy
from conftest import ROOT, run

K_MAX = 64


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)


def tiny_model(window=4, action_classes=(5, 2, 2), seed=0):
    torch.manual_seed(seed)
    return dy.DynamicsModel(latent_tokens=4, latent_dim=6, action_classes=list(action_classes), dim=32, depth=4,
                            heads=4, kv_heads=2, registers=2, context=window, mlp_ratio=2.0, k_max=K_MAX).eval()


def toy_f(z, tau, d, rows=None):
    """A fixed nonlinear per-frame function standing in for the network: ẑ₁ = f(z, τ, d) (rows: unused)."""
    g = torch.Generator().manual_seed(123)
    W = torch.randn(z.shape[-1], z.shape[-1], generator=g) / math.sqrt(z.shape[-1])
    tau = torch.as_tensor(tau, dtype=z.dtype)
    d = torch.as_tensor(d, dtype=z.dtype)
    if tau.dim() == 2:
        tau, d = tau[..., None, None], d[..., None, None]
    return torch.tanh(z @ W + 0.7 * tau - 0.3 * torch.log2(d))


# ---------------------------------------------------------------- conventions (PITFALLS.md 1)

def test_corrupt_uses_the_paper_convention():
    clean, noise = torch.randn(2, 3, 4, 6), torch.randn(2, 3, 4, 6)
    assert torch.equal(dy.corrupt(noise, clean, torch.ones(2, 3)), clean)  # τ = 1 is clean data
    assert torch.equal(dy.corrupt(noise, clean, torch.zeros(2, 3)), noise)  # τ = 0 is pure noise
    tau = torch.tensor([[0.25, 0.5, 0.75]] * 2)
    torch.testing.assert_close(dy.corrupt(noise, clean, tau)[:, 1], 0.5 * noise[:, 1] + 0.5 * clean[:, 1])
    torch.testing.assert_close(dy.corrupt(noise, clean, tau)[:, 2], 0.25 * noise[:, 2] + 0.75 * clean[:, 2])


def test_ramp_weight_favours_clean_frames_and_velocity_identity():
    assert float(dy.ramp_weight(torch.tensor(1.0))) == pytest.approx(1.0)
    assert float(dy.ramp_weight(torch.tensor(0.0))) == pytest.approx(0.1)
    w = dy.ramp_weight(torch.linspace(0, 1, 11))
    assert (w[1:] > w[:-1]).all()
    clean, noise = torch.randn(1, 1, 4, 6), torch.randn(1, 1, 4, 6)
    z = dy.corrupt(noise, clean, 0.3)
    torch.testing.assert_close(dy.x_to_velocity(clean, z, 0.3), clean - noise)  # v = z₁ − z₀
    # ‖x̂₁ − x₁‖² = (1 − τ)²·‖v̂ − v‖²  (PAPER.md §4.2)
    x_hat = torch.randn(1, 1, 4, 6)
    lhs = (x_hat - clean).pow(2).sum()
    rhs = (1 - 0.3) ** 2 * (dy.x_to_velocity(x_hat, z, 0.3) - (clean - noise)).pow(2).sum()
    torch.testing.assert_close(lhs, rhs)


def test_context_signal_level_is_mostly_clean_and_on_the_grid():
    tau_c = dy.context_signal_level(dy.Args.ctx_tau, K_MAX)
    assert tau_c >= 0.9 and tau_c < 1  # 10 % noise, not 90 % (PAPER.md §9)
    assert tau_c * K_MAX == round(tau_c * K_MAX)  # on the d_min grid
    assert dy.context_signal_level(1.0, K_MAX) == 1.0  # the clean-context option


def test_shift_actions_follows_the_data_contract():
    actions = torch.tensor([[[1, 0], [2, 1], [3, 0], [4, 1]]])  # a_t taken at frame t, (1, 4, 2)
    prev, valid = dy.shift_actions(actions)
    assert torch.equal(prev[0, 1:], actions[0, :-1])  # the token of step t carries a_{t−1}
    assert valid.tolist() == [[False, True, True, True]]  # step 0: the base "no action" embedding


# ---------------------------------------------------------------- Eq 4 (PITFALLS.md 3, 12)

def test_tau_d_lie_on_the_eq4_grid_with_the_right_frequencies():
    gen = torch.Generator().manual_seed(0)
    tau, d = dy.sample_tau_d((400, 500), K_MAX, gen)
    levels = [2.0 ** -e for e in range(7)]  # 1, 1/2, …, 1/64
    assert set(d.unique().tolist()) == set(levels)
    for v in levels:  # d uniform over the 7 powers of two
        assert float((d == v).float().mean()) == pytest.approx(1 / 7, abs=0.005)
    j = tau / d
    assert torch.equal(j, j.round()) and (tau >= 0).all()
    assert (1 - tau >= d).all()  # τ ≤ 1 − d: no division by ~0 in Eq 7, τ = 1 never drawn
    for v in (0.5, 0.25, 1 / 64):  # τ uniform on {0, d, …, 1 − d} given d
        counts = torch.bincount((tau[d == v] / v).long(), minlength=round(1 / v)).float()
        assert len(counts) == round(1 / v)
        assert float((counts / counts.mean() - 1).abs().max()) < 0.15
    assert float(tau[d == 1].max()) == 0.0  # d = 1 is trained, from pure noise
    # τ and d are per frame (diffusion forcing), not per sequence or per batch.
    assert (d.std(dim=1) > 0).all() and (tau.std(dim=1) > 0).all()
    # --k-min 4 keeps d ∈ {1/4, …, 1/64}, still uniform, τ still on each d's grid.
    tau, d = dy.sample_tau_d((400, 500), K_MAX, gen, k_min=4)
    assert set(d.unique().tolist()) == set(levels[2:])
    for v in levels[2:]:
        assert float((d == v).float().mean()) == pytest.approx(1 / 5, abs=0.005)
    assert torch.equal(tau / d, (tau / d).round()) and (1 - tau >= d).all()


def test_flow_frac_sets_the_share_of_flow_frames_and_keeps_the_grid():
    """--flow-frac 0.75: 75 % of rows (so of frames) at d = d_min, the rest uniform over {1/k_min, …, 2/K_max}."""
    gen = torch.Generator().manual_seed(1)
    tau, d = dy.sample_tau_d((4000, 50), K_MAX, gen, k_min=4, flow_frac=0.75)
    assert float((d == 1 / K_MAX).float().mean()) == pytest.approx(0.75, abs=0.02)  # 4,000 rows: σ ≈ 0.007
    boot = d[d > 1 / K_MAX]
    for v in (1 / 4, 1 / 8, 1 / 16, 1 / 32):  # the other four step sizes share the rest equally
        assert float((boot == v).float().mean()) == pytest.approx(1 / 4, abs=0.01)
    assert set(d.unique().tolist()) == {2.0 ** -e for e in range(2, 7)}
    assert torch.equal(tau / d, (tau / d).round()) and (1 - tau >= d).all()
    counts = torch.bincount((tau[d == 1 / K_MAX] * K_MAX).long(), minlength=K_MAX).float()  # τ uniform given d
    assert float((counts / counts.mean() - 1).abs().max()) < 0.1
    flow_rows = (d == 1 / K_MAX).all(dim=1)  # a row is all flow frames or has none
    assert not (d[~flow_rows] == 1 / K_MAX).any()
    assert float(flow_rows.float().mean()) == pytest.approx(0.75, abs=0.02)
    assert (d[~flow_rows].std(dim=1) > 0).all()  # the bootstrap rows still draw d per frame


# ---------------------------------------------------------------- sampler (PITFALLS.md 2)

@pytest.mark.parametrize("K", [1, 2, 4, 64])
def test_oracle_sampler_follows_the_interpolation_path(K):
    clean, noise = torch.randn(2, 1, 4, 6), torch.randn(2, 1, 4, 6)
    seen = []

    def oracle(z, tau, d):
        seen.append((tau, d))
        # every intermediate z lies exactly on z_τ = (1 − τ)·noise + τ·clean
        torch.testing.assert_close(z, dy.corrupt(noise, clean, tau), atol=1e-5, rtol=1e-5)
        return clean

    out = dy.sample_frame(oracle, noise, K)
    assert [s[0] for s in seen] == [i / K for i in range(K)]  # τ = 0, d, …, 1 − d: no off-by-one
    assert all(s[1] == 1 / K for s in seen)
    torch.testing.assert_close(out, clean, atol=1e-5, rtol=1e-5)  # K = 1, 2, 4, 64 all land on z₁


# ---------------------------------------------------------------- Eq 7 (PITFALLS.md 3)

def slow_eq7(f, clean, noise, tau, d, k_max):
    """Eq 7 + Eq 8 transcribed frame by frame with python floats (PAPER.md §4.3)."""
    B, T = tau.shape
    per_frame, total = torch.zeros(B, T), 0.0
    for b in range(B):
        for t in range(T):
            ta, dd = float(tau[b, t]), float(d[b, t])
            x1, x0 = clean[b, t], noise[b, t]
            zt = (1 - ta) * x0 + ta * x1
            z1_hat = f(zt, ta, dd)
            if dd == 1 / k_max:
                L = ((z1_hat - x1) ** 2).mean()
            else:
                b1 = (f(zt, ta, dd / 2) - zt) / (1 - ta)
                zp = zt + b1 * dd / 2
                b2 = (f(zp, ta + dd / 2, dd / 2) - zp) / (1 - (ta + dd / 2))
                L = (1 - ta) ** 2 * (((z1_hat - zt) / (1 - ta) - (b1 + b2) / 2) ** 2).mean()
            per_frame[b, t] = L
            total += (0.9 * ta + 0.1) * float(L)
    return total / (B * T), per_frame


def flow_and_boot_batch(B=6, T=5):
    gen = torch.Generator().manual_seed(3)
    tau, d = dy.sample_tau_d((B, T), K_MAX, gen)
    d[0, 0], tau[0, 0] = 1 / K_MAX, 63 / 64  # the extremes of the grid are in the batch
    d[0, 1], tau[0, 1] = 1.0, 0.0
    d[1, 0], tau[1, 0] = 1 / 32, 31 / 32
    clean, noise = torch.randn(B, T, 4, 6, generator=gen), torch.randn(B, T, 4, 6, generator=gen)
    return clean, noise, tau, d


def test_eq7_matches_slow_per_frame_transcription():
    clean, noise, tau, d = flow_and_boot_batch()
    assert (d == 1 / K_MAX).any() and (d > 1 / K_MAX).any()
    terms = dy.shortcut_forcing_loss(toy_f, clean, noise, tau, d, K_MAX)
    slow_total, slow_frames = slow_eq7(toy_f, clean, noise, tau, d, K_MAX)
    torch.testing.assert_close(terms["per_frame"], slow_frames, atol=1e-5, rtol=1e-4)
    assert float(terms["loss"]) == pytest.approx(slow_total, rel=1e-4)
    assert float(terms["flow"] + terms["boot"]) == pytest.approx(float(terms["loss"]), rel=1e-5)


def test_half_steps_on_bootstrap_rows_only_equal_the_row_by_row_loss():
    """With --flow-frac most rows are all flow; Eq 7's half-step passes run only on the other rows
    (the actions and start-frame flags of exactly those rows). Same per-frame loss as row by row."""
    model = tiny_model().train()
    gen = torch.Generator().manual_seed(5)
    fb = dy.forcing_batch(torch.tanh(torch.randn(8, 5, 8, 3, generator=gen)), torch.randint(0, 2, (8, 5, 3)),
                          K_MAX, 0.25, gen, flow_frac=0.5)
    flow_rows = (fb["d"] == 1 / K_MAX).all(1)
    assert 0 < int(flow_rows.sum()) < 8 and fb["independent"].any()
    calls = []

    def f(z, t, d, rows=None):
        calls.append(len(z))
        return model(z, t, d, *dy.row_select(fb, rows))
    batched = dy.shortcut_forcing_loss(f, fb["clean"], fb["noise"], fb["tau"], fb["d"], K_MAX)["per_frame"]
    assert calls == [8, 8 - int(flow_rows.sum()), 8 - int(flow_rows.sum())]  # the half steps skip flow rows
    for b in range(8):
        one = {k: v if v is None else v[b:b + 1] for k, v in fb.items()}
        g = lambda z, t, d, rows=None: model(z, t, d, *dy.row_select(one, rows))  # noqa: E731
        row = dy.shortcut_forcing_loss(g, one["clean"], one["noise"], one["tau"], one["d"], K_MAX)["per_frame"]
        torch.testing.assert_close(batched[b:b + 1], row, atol=1e-5, rtol=1e-4)


def test_no_ramp_weighs_every_frame_equally():
    """--no-ramp (an experiment): the same per-frame Eq 7 terms, averaged with w = 1 instead of Eq 8."""
    clean, noise, tau, d = flow_and_boot_batch()
    ramp = dy.shortcut_forcing_loss(toy_f, clean, noise, tau, d, K_MAX)
    flat = dy.shortcut_forcing_loss(toy_f, clean, noise, tau, d, K_MAX, ramp=False)
    torch.testing.assert_close(flat["per_frame"], ramp["per_frame"])
    assert float(flat["loss"]) == pytest.approx(float(ramp["per_frame"].mean()), rel=1e-5)
    assert float(ramp["loss"]) == pytest.approx(float((ramp["per_frame"] * (0.9 * tau + 0.1)).mean()), rel=1e-5)


def test_ctx_frac_rows_hold_their_history_at_the_context_level():
    """--ctx-frac (an experiment): in that share of the sequence rows every frame but the last sits at
    τ_ctx (snapped, d = d_min) as when sampling; the last frame keeps its Eq 4 draw; start-frame rows never."""
    lat, acts = torch.rand(400, 6, 8, 3) * 2 - 1, torch.randint(0, 2, (400, 6, 3))
    base = dy.forcing_batch(lat, acts, K_MAX, 0.3, torch.Generator().manual_seed(0))
    fb = dy.forcing_batch(lat, acts, K_MAX, 0.3, torch.Generator().manual_seed(0), ctx_frac=0.5, ctx_tau=0.9)
    hist = (fb["tau"][:, :-1] == 58 / 64).all(1) & (fb["d"][:, :-1] == 1 / K_MAX).all(1)  # (B,)
    assert not (hist & fb["independent"]).any()
    share = float(hist[~fb["independent"]].float().mean())
    assert 0.4 < share < 0.6  # half of the 280 sequence rows
    torch.testing.assert_close(fb["tau"][:, -1], base["tau"][:, -1])  # the last frame: the same Eq 4 draw
    torch.testing.assert_close(fb["tau"][~hist], base["tau"][~hist])  # other rows untouched


def test_bootstrap_term_equals_its_x_space_form():
    """(1 − τ)²·‖v̂ − sg(b′ + b″)/2‖² = ‖ẑ₁ − sg(z̃ + (1 − τ)·(b′ + b″)/2)‖² (PAPER.md §4.3)."""
    clean, noise, tau, d = flow_and_boot_batch()
    terms = dy.shortcut_forcing_loss(toy_f, clean, noise, tau, d, K_MAX)
    t4 = lambda x: x[..., None, None]  # noqa: E731
    zt = (1 - t4(tau)) * noise + t4(tau) * clean
    b1 = (toy_f(zt, tau, d / 2) - zt) / (1 - t4(tau))
    zp = zt + b1 * t4(d) / 2
    b2 = (toy_f(zp, tau + d / 2, d / 2) - zp) / (1 - t4(tau + d / 2))
    x_target = zt + (1 - t4(tau)) * (b1 + b2) / 2
    x_space = (toy_f(zt, tau, d) - x_target).pow(2).mean((-2, -1))  # (B, T)
    boot = d > 1 / K_MAX
    torch.testing.assert_close(terms["per_frame"][boot], x_space[boot], atol=1e-5, rtol=1e-4)


def test_loss_is_finite_at_every_grid_point_and_gradients_reach_tau_d_and_actions():
    model = tiny_model().train()
    pairs = [(j * 2.0 ** -e, 2.0 ** -e) for e in range(7) for j in range(2 ** e)]  # all 127 (τ, d)
    assert len(pairs) == 127
    tau = torch.tensor([[p[0]] for p in pairs])
    d = torch.tensor([[p[1]] for p in pairs])  # (127, 1): one frame per row
    clean, noise = torch.tanh(torch.randn(127, 1, 4, 6)), torch.randn(127, 1, 4, 6)
    acts = torch.randint(0, 2, (127, 2, 3))
    prev, valid = dy.shift_actions(acts)
    def f(z, t, dd, rows=None):  # frame 0 a copy of the frame, so the action a_0 reaches frame 1
        p, v = (prev, valid) if rows is None else (prev[rows], valid[rows])
        return model(z.repeat(1, 2, 1, 1), t.repeat(1, 2), dd.repeat(1, 2), p, v)[:, 1:]
    terms = dy.shortcut_forcing_loss(f, clean, noise, tau, d, K_MAX)
    assert torch.isfinite(terms["per_frame"]).all() and torch.isfinite(terms["loss"])
    terms["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    for p in (model.tau_embed.weight, model.d_embed.weight, model.action_embed[0].weight):
        assert float(p.grad.abs().sum()) > 0  # conditioning reaches the loss (PITFALLS.md 8)


# ---------------------------------------------------------------- model: actions, start frames

def test_prediction_changes_when_the_action_changes_and_only_after_it():
    model = tiny_model(window=8)
    z, tau = torch.randn(2, 5, 4, 6), torch.full((2, 5), 0.5)
    d = torch.full((2, 5), 0.25)
    acts = torch.randint(0, 2, (2, 5, 3))
    out = model(z, tau, d, *dy.shift_actions(acts))
    acts2 = acts.clone()
    acts2[:, 2, 0] = 4  # a different move at frame 2: it leads into frame 3
    out2 = model(z, tau, d, *dy.shift_actions(acts2))
    torch.testing.assert_close(out[:, :3], out2[:, :3], atol=0, rtol=0)  # frames ≤ 2 cannot know a_2
    assert (out[:, 3] - out2[:, 3]).abs().max() > 1e-4  # frame 3 does
    # Unlabelled clips use the base embedding alone, the same as "no valid action".
    torch.testing.assert_close(model(z, tau, d), model(z, tau, d, acts, torch.zeros(2, 5, dtype=torch.bool)))


def test_forcing_batch_start_frames_and_packing():
    gen = torch.Generator().manual_seed(0)
    lat, acts = torch.rand(10, 6, 8, 3) * 2 - 1, torch.randint(0, 2, (10, 6, 3))
    fb = dy.forcing_batch(lat, acts, K_MAX, 0.3, gen)
    assert fb["clean"].shape == (10, 6, 4, 6)  # App A: N_b × D_b → N_b/2 × 2·D_b
    assert int(fb["independent"].sum()) == 3  # 30 % of the sequences are independent images
    assert not fb["act_valid"][fb["independent"]].any() and not fb["act_valid"][:, 0].any()
    assert fb["act_valid"][~fb["independent"], 1:].all()
    # An independent sequence's frames equal the same frames run one by one as frame-0 sequences.
    model = tiny_model()
    ind = torch.tensor([True, False])
    z, tau, d = fb["noise"][:2], fb["tau"][:2], fb["d"][:2]
    valid = fb["act_valid"][:2].clone()
    valid[0] = False
    out = model(z, tau, d, fb["prev_actions"][:2], valid, independent=ind)
    for t in range(6):
        single = model(z[:1, t:t + 1], tau[:1, t:t + 1], d[:1, t:t + 1])
        torch.testing.assert_close(out[0, t], single[0, 0], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- KV cache (PITFALLS.md 4)

@pytest.mark.parametrize("Tc,H,window", [(1, 2, 4), (3, 6, 4), (2, 5, 2), (0, 3, 4)])
def test_cached_rollout_equals_uncached_recompute(Tc, H, window):
    model = tiny_model(window=window)
    context = torch.tanh(torch.randn(2, Tc, 4, 6))
    acts = torch.randint(0, 2, (2, Tc + H, 3))
    fast = dy.rollout(model, context, acts, H, 4, 0.9, torch.Generator().manual_seed(1), use_cache=True)
    slow = dy.rollout(model, context, acts, H, 4, 0.9, torch.Generator().manual_seed(1), use_cache=False)
    assert fast.shape == (2, H, 4, 6)
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)  # also beyond the window C


def test_rollout_depends_on_actions_and_accepts_powers_of_two_only():
    model = tiny_model()
    ctx, acts = torch.tanh(torch.randn(2, 2, 4, 6)), torch.randint(0, 2, (2, 5, 3))
    a = dy.rollout(model, ctx, acts, 3, 4, 0.9, torch.Generator().manual_seed(0))
    acts2 = acts.clone()
    acts2[:, 1, 0] = (acts[:, 1, 0] + 1) % 5  # a_1 leads into frame 2, the first generated one
    b = dy.rollout(model, ctx, acts2, 3, 4, 0.9, torch.Generator().manual_seed(0))
    assert (a - b).abs().max() > 1e-4
    with pytest.raises(AssertionError):
        dy.rollout(model, ctx, acts, 3, 3, 0.9, torch.Generator())


# ---------------------------------------------------------------- learning: a 1-D toy with a known flow

class ToyNet(nn.Module):
    """ẑ₁ = f(z, τ, d) for 1-D data: τ·z + (1 − τ)·MLP(z, τ, embedding of d).

    The skip term τ·z is only a preconditioning (at τ → 1 the clean value is z itself); the output
    is still an x-prediction.
    """

    def __init__(self, width=64):
        super().__init__()
        self.d_embed = nn.Embedding(7, 8)
        self.net = nn.Sequential(nn.Linear(10, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, 1))

    def forward(self, z, tau, d, rows=None):  # z (B, 1, 1, 1); tau, d (B, 1) tensors or floats (the sampler)
        B = z.shape[0]
        tau, d = (torch.as_tensor(v, dtype=z.dtype).reshape(-1, 1).expand(B, 1) for v in (tau, d))
        e = self.d_embed(torch.round(-torch.log2(d)).long()[:, 0])  # (B, 8)
        x = z.view(B, 1)
        return (tau * x + (1 - tau) * self.net(torch.cat([x, tau, e], -1))).view(B, 1, 1, 1)


def toy_data(n, gen):
    """Two modes: ±U(0.3, 0.9), inside the tanh range like the tokenizer's latents."""
    return (torch.randint(0, 2, (n, 1, 1, 1), generator=gen) * 2 - 1) * (0.3 + 0.6 * torch.rand(n, 1, 1, 1, generator=gen))


def test_one_d_toy_few_step_samples_match_many_step_samples():
    """Shortcut forcing on a 1-D toy (K_max = 64): K = 4 samples match K = 64 samples in
    distribution, and both keep the two modes (a broken bootstrap or sampler collapses K = 4 onto
    the mean 0, as one-step x-prediction of a plain flow model does)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    net = ToyNet()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for step in range(1500):
        tau, d = dy.sample_tau_d((256, 1), K_MAX, gen)
        noise = torch.randn(256, 1, 1, 1, generator=gen)
        loss = dy.shortcut_forcing_loss(net, toy_data(256, gen), noise, tau, d, K_MAX, x_clip=1.0)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        noise = torch.randn(4000, 1, 1, 1, generator=gen)
        s = {K: dy.sample_frame(net, noise, K).flatten() for K in (1, 4, 64)}
        data = toy_data(4000, gen).flatten()
    w1 = lambda a, b: float((a.sort().values - b.sort().values).abs().mean())  # noqa: E731  1-D Wasserstein
    report = {K: (round(w1(s[K], data), 3), round(float((s[K].abs() > 0.2).float().mean()), 3)) for K in s}
    assert w1(s[4], s[64]) < 0.1, report
    for K in (1, 4, 64):
        assert w1(s[K], data) < 0.3, report  # collapsing onto the mean 0 would be at distance 0.6
        assert float((s[K].abs() > 0.2).float().mean()) > 0.6, report  # two modes, not their mean
        assert 0.35 < float((s[K] > 0).float().mean()) < 0.65, report  # both modes


def test_fixed_batch_overfits():
    model = tiny_model().train()
    gen = torch.Generator().manual_seed(0)
    fb = dy.forcing_batch(torch.tanh(torch.randn(4, 4, 8, 3, generator=gen)), torch.randint(0, 2, (4, 4, 3)),
                          K_MAX, 0.25, gen)
    f = lambda z, t, d, rows=None: model(z, t, d, *dy.row_select(fb, rows))  # noqa: E731
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = dy.shortcut_forcing_loss(f, fb["clean"], fb["noise"], fb["tau"], fb["d"], K_MAX)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.3 * losses[0], losses[::10]


# ---------------------------------------------------------------- pipeline: smoke run + resume


@pytest.fixture(scope="module")
def smoke_tokenizer(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dyn")
    data_dir, tok = str(tmp / "data"), str(tmp / "tok")
    run("data.py", "--preset", "smoke", "--out", data_dir)
    run("tokenizer.py", "--preset", "smoke", "--data", data_dir, "--out", tok, "--lpips-weight", "0")
    return tmp, os.path.join(tok, "ckpt.pt")


def test_smoke_run_writes_summary_pictures_and_resumes_exactly(smoke_tokenizer):
    tmp, tok = smoke_tokenizer
    full, part = str(tmp / "full"), str(tmp / "part")
    run("dynamics.py", "--preset", "smoke", "--tokenizer", tok, "--out", full)
    for f in ("ckpt.pt", "args.json", "metrics.jsonl", "summary.json", "rollout.png", "rollout.gif",
              "rollout_psnr.png", "loss_tau_d.png"):
        assert os.path.exists(os.path.join(full, f)), f
    s = json.load(open(os.path.join(full, "summary.json")))
    for key in ("stage", "preset", "device", "steps", "wall_s", "steps_per_s", "frames_per_s", "peak_mem_gb",
                "psnr_k4", "psnr_k64", "psnr_repeat_last", "action_shuffle_gap_db", "gen_fps",
                "cache_speedup_ctx32", "psnr_k4_per_horizon", "loss_by_d", "probe_mse_true", "probe_mse_shuffled",
                "probe_mse_copy", "probe_action_cost"):
        assert key in s, key
    assert s["stage"] == "dynamics" and s["steps"] == 6 and len(s["psnr_k4_per_horizon"]) == 3
    # Rollout figures: PSNR of the mean squared error per horizon (tokenizer.psnr_of_mean_mse), averaged
    # over the horizons; the mean of per-frame PSNRs, which exact copies inflate, is kept beside it.
    assert abs(s["psnr_k4"] - sum(s["psnr_k4_per_horizon"]) / 3) < 1e-4
    assert "psnr_repeat_last_frame_mean" in s and "psnr_k4_frame_mean" in s
    # The built-in data can be replayed: the environment itself, stepped with the true and the shuffled
    # actions, is scored like a rollout (what a perfect world model would reach).
    assert len(s["psnr_simulator_per_horizon"]) == 3 and "psnr_simulator_shuffled" in s
    assert s["action_shuffle_gap_simulator_db"] == s["psnr_simulator"] - s["psnr_simulator_shuffled"]
    ckpt = torch.load(os.path.join(full, "ckpt.pt"), weights_only=True)
    assert ckpt["parent"]["stage"] == "tokenizer" and ckpt["format_version"] == 1
    model, _ = dy.load_dynamics(os.path.join(full, "ckpt.pt"))
    # Later stages get the EMA weights (--ema), which differ from the online weights after training.
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["ema"][k]), k
    assert any(not torch.equal(ckpt["ema"][k], ckpt["model"][k]) for k in ckpt["model"])
    # Interrupted at step 3, resumed: the same weights as the uninterrupted run.
    common = ["dynamics.py", "--preset", "smoke", "--tokenizer", tok, "--out", part, "--eval-seqs", "0"]
    run(*common, "--stop-at", "3")
    run(*common, "--resume")
    b = torch.load(os.path.join(part, "ckpt.pt"), weights_only=True)
    assert b["step"] == 6
    for k in ckpt["model"]:
        torch.testing.assert_close(ckpt["model"][k], b["model"][k], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ckpt["ema"][k], b["ema"][k], atol=1e-6, rtol=1e-5)
    # --eval-only: no training; the model comes from the checkpoint (no --preset needed), the typed
    # evaluation flags apply, the training figures and metrics.jsonl stay as they were.
    log = open(os.path.join(full, "metrics.jsonl")).read()
    run("dynamics.py", "--eval-only", "--out", full, "--eval-seqs", "3")
    s2 = json.load(open(os.path.join(full, "summary.json")))
    assert s2["eval_only"] and s2["eval_seqs"] == 3 and s2["eval_horizon"] == 3
    assert s2["wall_s"] == s["wall_s"] and s2["steps"] == 6
    assert open(os.path.join(full, "metrics.jsonl")).read() == log
    assert torch.load(os.path.join(full, "ckpt.pt"), weights_only=True)["step"] == 6


def test_ema_update_matches_a_slow_average():
    """θ_ema after n steps = the β-weighted average of the online weights, β_s = min(decay, (1+s)/(10+s))."""
    net, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    ema.load_state_dict(net.state_dict())
    expected = net.weight.detach().clone()
    for s in range(1, 40):
        with torch.no_grad():
            net.weight.add_(torch.randn_like(net.weight))
        dy.ema_update(ema, net, s, 0.9)
        beta = min(0.9, (1 + s) / (10 + s))
        expected = beta * expected + (1 - beta) * net.weight.detach()
    torch.testing.assert_close(ema.weight, expected)


def test_missing_tokenizer_names_the_command(tmp_path):
    r = subprocess.run([sys.executable, "dynamics.py", "--preset", "smoke", "--tokenizer", str(tmp_path / "no.pt"),
                        "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "python tokenizer.py" in r.stderr


def test_action_probe_is_zero_for_a_model_blind_to_actions(smoke_tokenizer):
    """The teacher-forced action probe: identical errors when the action embeddings are zero (the model
    cannot see the action), different ones when they are not; copying is scored on the same windows."""
    from tokenizer import LatentCache
    _, tok = smoke_tokenizer
    held = LatentCache(os.path.dirname(tok), "heldout")
    a = dy.Args(**{**dy.PRESETS["smoke"], "eval_seqs": 8})
    latent = [held.latents.shape[1] // 2, 2 * held.latents.shape[2]]
    model = dy.build_model(vars(a), *latent, [n for _, n in held.meta["action_components"]]).eval()
    for emb in model.action_embed:
        nn.init.zeros_(emb.weight)
    blind = dy.action_probe(model, held, a, torch.device("cpu"))
    assert blind["probe_action_cost"] == 0 and blind["probe_mse_true"] == blind["probe_mse_shuffled"]
    for emb in model.action_embed:
        nn.init.normal_(emb.weight, std=1.0)
    seeing = dy.action_probe(model, held, a, torch.device("cpu"))
    assert seeing["probe_mse_true"] != seeing["probe_mse_shuffled"]
    assert seeing["probe_mse_copy"] == blind["probe_mse_copy"] > 0  # same windows, copy does not use the model
