"""Tests of dynamics.py and dynamics_eval.py.

Exercises (README "Equation map and exercises"): blank the function, re-write it, and grade it with
    python -m pytest tests/test_dynamics.py -k eq6                  # Eq 1, 6: corrupt
    python -m pytest tests/test_dynamics.py -k eq2                  # Eq 2: sample_frame
    python -m pytest tests/test_dynamics.py -k eq7                  # Eq 3, 7: shortcut_forcing_loss
                                                                    #   and x_to_velocity
    python -m pytest tests/test_dynamics.py -k "eq4 or flow_frac"   # Eq 4: sample_tau_d
    python -m pytest tests/test_dynamics.py -k eq8                  # Eq 8: ramp_weight
Each exercise test re-derives its equation independently (slow per-frame transcriptions, an
oracle) and accepts any correct implementation; speed-ups (the half steps on bootstrap rows
only) are tested separately. The rest: the model's action and start-frame handling, the
KV-cached rollout, learning on a 1-D toy, and the smoke pipeline with resume and re-evaluation.
"""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import common
import data
import dynamics as dy
import dynamics_eval
import environment as env
from conftest import ROOT, run

K_MAX = 64
LEVELS = [2.0 ** -e for e in range(7)]  # d ∈ {1, 1/2, …, 1/64}

CONVENTION = "the paper's convention: τ = 0 is pure noise, τ = 1 is clean data"

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)


def tiny_model(window=4, action_classes=(5, 2, 2), seed=0, space_rope_base=0.0):
    torch.manual_seed(seed)
    return dy.DynamicsModel(latent_tokens=4, latent_dim=6, action_classes=list(action_classes),
                            dim=32, depth=4, heads=4, kv_heads=2, registers=2, context=window,
                            mlp_ratio=2.0, k_max=K_MAX, space_rope_base=space_rope_base).eval()


def toy_weight(channels: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return torch.randn(channels, channels, generator=g) / math.sqrt(channels)


def make_toy_f(W: torch.Tensor):
    """A fixed nonlinear per-frame function standing in for the network, ẑ₁ = f(z, τ, d).

    τ, d may be floats or (B, T) tensors (any other shape broadcasting against z works too);
    rows (which batch rows z holds) is accepted and not needed: f treats every frame alike."""

    def f(z, tau, d, rows=None):
        tau = torch.as_tensor(tau, dtype=z.dtype)
        d = torch.as_tensor(d, dtype=z.dtype)
        if tau.dim() == 2:
            tau, d = tau[..., None, None], d[..., None, None]  # (B, T, 1, 1)
        return torch.tanh(z @ W + 0.7 * tau - 0.3 * torch.log2(d))

    return f


toy_f = make_toy_f(toy_weight())


def close(actual, expected, what: str, hint: str = "", atol=1e-5, rtol=1e-4):
    """assert_close with a message for a student: what was compared, and a hint when it fails."""
    actual, expected = torch.as_tensor(actual).float(), torch.as_tensor(expected).float()
    assert actual.shape == expected.shape, \
        f"{what}: expected shape {tuple(expected.shape)}, got {tuple(actual.shape)}"
    if not torch.allclose(actual, expected, atol=atol, rtol=rtol):
        worst = int((actual - expected).abs().flatten().argmax())
        raise AssertionError(
            f"{what}: largest difference at flat index {worst}: expected "
            f"{float(expected.flatten()[worst]):.6g}, got {float(actual.flatten()[worst]):.6g}"
            + (f"\nhint: {hint}" if hint else ""))


# ---------------------------------------------------------------- Eq 1, 6: corrupt

def test_eq6_corrupt_at_tau_one_is_the_clean_data():
    clean, noise = torch.randn(2, 3, 4, 6), torch.randn(2, 3, 4, 6)
    close(dy.corrupt(noise, clean, torch.ones(2, 3)), clean, "corrupt(noise, clean, τ = 1)",
          f"{CONVENTION}; corrupt(noise, clean, τ) = (1 − τ)·noise + τ·clean")


def test_eq6_corrupt_at_tau_zero_is_pure_noise():
    clean, noise = torch.randn(2, 3, 4, 6), torch.randn(2, 3, 4, 6)
    close(dy.corrupt(noise, clean, torch.zeros(2, 3)), noise, "corrupt(noise, clean, τ = 0)",
          f"{CONVENTION}; corrupt(noise, clean, τ) = (1 − τ)·noise + τ·clean")


def test_eq6_corrupt_uses_each_frames_own_signal_level():
    clean, noise = torch.randn(2, 3, 4, 6), torch.randn(2, 3, 4, 6)
    tau = torch.tensor([[0.25, 0.5, 0.75], [0.0, 1 / 64, 63 / 64]])  # (B, T): one τ per frame
    expected = torch.empty_like(clean)
    for b in range(2):
        for t in range(3):
            expected[b, t] = (1 - tau[b, t]) * noise[b, t] + tau[b, t] * clean[b, t]
    close(dy.corrupt(noise, clean, tau), expected, "corrupt with per-frame τ of shape (B, T)",
          "τ[b, t] applies to every token and channel of frame t of sequence b: broadcast it as "
          f"(B, T, 1, 1) against (B, T, N, C); {CONVENTION}")


def test_eq6_corrupt_accepts_a_float_signal_level():
    clean, noise = torch.randn(2, 3, 4, 6), torch.randn(2, 3, 4, 6)
    close(dy.corrupt(noise, clean, 0.3), 0.7 * noise + 0.3 * clean, "corrupt(noise, clean, 0.3)",
          "the sampler passes τ as a python float (one level for every frame)")


# ---------------------------------------------------------------- Eq 2: sample_frame

def oracle_run(K):
    """sample_frame with an oracle f that always predicts the clean frame. Returns what f was
    asked (τ, d, z) and the result."""
    clean, noise = torch.randn(2, 1, 4, 6), torch.randn(2, 1, 4, 6)
    seen = []

    def oracle(z, tau, d):
        seen.append((float(tau), float(d), z.clone()))
        return clean

    return clean, noise, seen, dy.sample_frame(oracle, noise, K)


@pytest.mark.parametrize("K", [1, 2, 4, 64])
def test_eq2_sampler_steps_tau_from_0_to_1_minus_d(K):
    _, _, seen, _ = oracle_run(K)
    taus, ds = [s[0] for s in seen], [s[1] for s in seen]
    assert taus == [i / K for i in range(K)], (
        f"K = {K}: f should be called at τ = 0, d, …, 1 − d (d = 1/K), got τ = {taus}; "
        f"{CONVENTION}, so sampling starts at τ = 0 and each step asks for ẑ₁ at the current τ")
    assert ds == [1 / K] * K, f"K = {K}: every step uses d = 1/K, got d = {ds}"


@pytest.mark.parametrize("K", [1, 2, 4, 64])
def test_eq2_sampler_stays_on_the_interpolation_path(K):
    """With a perfect x-prediction every intermediate z is (1 − τ)·noise + τ·clean."""
    clean, noise, seen, _ = oracle_run(K)
    for tau, _, z in seen:
        close(z, (1 - tau) * noise + tau * clean, f"K = {K}: z handed to f at τ = {tau}",
              "Eq 2 in x-form: z ← z + (ẑ₁ − z)·d/(1 − τ), the velocity v̂ = (ẑ₁ − z)/(1 − τ) "
              "times the step d")


@pytest.mark.parametrize("K", [1, 2, 4, 64])
def test_eq2_sampler_lands_on_the_clean_frame(K):
    clean, _, _, out = oracle_run(K)
    close(out, clean, f"K = {K}: the sampled frame",
          "after K steps of d = 1/K, z is at τ = 1, the clean frame (the last step starts at "
          "τ = 1 − d and returns ẑ₁ exactly)")


# ---------------------------------------------------------------- Eq 3, 7: shortcut forcing

def test_eq7_x_to_velocity_of_the_clean_frame_is_clean_minus_noise():
    clean, noise = torch.randn(2, 3, 4, 6), torch.randn(2, 3, 4, 6)
    tau = torch.tensor([[0.0, 0.3, 0.5], [0.25, 0.75, 63 / 64]])  # (B, T)
    z = (1 - tau[..., None, None]) * noise + tau[..., None, None] * clean
    close(dy.x_to_velocity(clean, z, tau), clean - noise, "x_to_velocity(clean, z_τ, τ)",
          f"v̂ = (x̂₁ − z_τ)/(1 − τ) with per-frame τ (B, T); {CONVENTION}, so v = clean − noise")
    close(dy.x_to_velocity(clean[:1, 1:2], z[:1, 1:2], 0.3), (clean - noise)[:1, 1:2],
          "x_to_velocity with a float τ", "τ may be a python float")


def test_eq7_x_error_is_one_minus_tau_squared_times_the_velocity_error():
    """‖x̂₁ − x₁‖² = (1 − τ)²·‖v̂ − v‖²: the identity that puts both Eq 7 terms on one scale."""
    clean, noise, x_hat = torch.randn(1, 1, 4, 6), torch.randn(1, 1, 4, 6), torch.randn(1, 1, 4, 6)
    z = 0.7 * noise + 0.3 * clean
    lhs = (x_hat - clean).pow(2).sum()
    rhs = (1 - 0.3) ** 2 * (dy.x_to_velocity(x_hat, z, 0.3) - (clean - noise)).pow(2).sum()
    close(lhs, rhs, "‖x̂₁ − x₁‖² vs (1 − τ)²·‖v̂ − v‖²", "v̂ = (x̂₁ − z_τ)/(1 − τ)")


def eq7_batch(B=6, T=5, seed=3):
    """(τ, d) on the Eq 4 grid drawn here (not by sample_tau_d), with flow and bootstrap frames
    and the extremes of the grid; random clean latents and noise (B, T, 4, 6)."""
    gen = torch.Generator().manual_seed(seed)
    e = torch.randint(0, 7, (B, T), generator=gen)  # d = 2^−e
    d = 2.0 ** -e.float()
    tau = (torch.rand(B, T, generator=gen) * 2.0 ** e).floor() * d  # τ ∈ {0, d, …, 1 − d}
    d[0, 0], tau[0, 0] = 1 / K_MAX, 63 / 64  # a flow frame, almost clean
    d[0, 1], tau[0, 1] = 1.0, 0.0  # the largest step, from pure noise
    d[1, 0], tau[1, 0] = 1 / 32, 31 / 32  # the last bootstrap step before clean
    d[2, :] = 1 / K_MAX  # a row of flow frames only
    clean, noise = torch.randn(B, T, 4, 6, generator=gen), torch.randn(B, T, 4, 6, generator=gen)
    return clean, noise, tau, d


def slow_eq7(f, clean, noise, tau, d, k_max, x_clip=None):
    """Eq 7 + Eq 8 transcribed frame by frame with python floats. Returns the loss (a tensor that
    carries the gradient of ẑ₁ only) and the unweighted per-frame L (B, T). x_clip: clamp the
    half-step predictions (--boot-clip, not in the paper)."""

    def half(z, ta, dd):  # a half-step x-prediction
        x = f(z, ta, dd)
        return x if x_clip is None else x.clamp(-x_clip, x_clip)

    B, T = tau.shape
    per_frame, total = torch.zeros(B, T), 0.0
    for b in range(B):
        for t in range(T):
            ta, dd = float(tau[b, t]), float(d[b, t])
            x1, x0 = clean[b, t], noise[b, t]
            zt = (1 - ta) * x0 + ta * x1
            z1_hat = f(zt, ta, dd)
            if dd == 1 / k_max:  # flow term
                L = ((z1_hat - x1) ** 2).mean()
            else:  # bootstrap term, its target inside sg(·)
                with torch.no_grad():
                    b1 = (half(zt, ta, dd / 2) - zt) / (1 - ta)
                    zp = zt + b1 * dd / 2
                    b2 = (half(zp, ta + dd / 2, dd / 2) - zp) / (1 - (ta + dd / 2))
                L = (1 - ta) ** 2 * (((z1_hat - zt) / (1 - ta) - (b1 + b2) / 2) ** 2).mean()
            per_frame[b, t] = float(L.detach())
            total = total + (0.9 * ta + 0.1) * L  # Eq 8 ramp weight
    return total / (B * T), per_frame


def test_eq7_flow_frames_match_the_slow_transcription():
    clean, noise, tau, d = eq7_batch()
    terms = dy.shortcut_forcing_loss(toy_f, clean, noise, tau, d, K_MAX)
    _, slow = slow_eq7(toy_f, clean, noise, tau, d, K_MAX)
    flow = d == 1 / K_MAX
    close(terms["per_frame"][flow], slow[flow], "per-frame loss of the flow frames (d = d_min)",
          "flow term: L = ‖ẑ₁ − z₁‖² (mean over tokens and channels), ẑ₁ = f(z̃, τ, d) with "
          f"z̃ = (1 − τ)·noise + τ·clean; {CONVENTION}")


def test_eq7_bootstrap_frames_match_the_slow_transcription():
    clean, noise, tau, d = eq7_batch()
    terms = dy.shortcut_forcing_loss(toy_f, clean, noise, tau, d, K_MAX)
    _, slow = slow_eq7(toy_f, clean, noise, tau, d, K_MAX)
    boot = d > 1 / K_MAX
    close(terms["per_frame"][boot], slow[boot], "per-frame loss of bootstrap frames (d > d_min)",
          "b′ = (f(z̃, τ, d/2) − z̃)/(1 − τ), z′ = z̃ + b′·d/2, "
          "b″ = (f(z′, τ + d/2, d/2) − z′)/(1 − (τ + d/2)), "
          "L = (1 − τ)²·‖(ẑ₁ − z̃)/(1 − τ) − (b′ + b″)/2‖²; each frame with its own τ and d")


def test_eq7_loss_is_the_ramp_weighted_mean_over_frames():
    clean, noise, tau, d = eq7_batch()
    terms = dy.shortcut_forcing_loss(toy_f, clean, noise, tau, d, K_MAX)
    slow, _ = slow_eq7(toy_f, clean, noise, tau, d, K_MAX)
    close(terms["loss"], slow, "the total loss",
          "loss = mean over all B·T frames of w(τ)·L, w(τ) = 0.9τ + 0.1 (Eq 8)", rtol=1e-5)


def test_eq7_flow_and_boot_parts_split_the_loss():
    clean, noise, tau, d = eq7_batch()
    terms = dy.shortcut_forcing_loss(toy_f, clean, noise, tau, d, K_MAX)
    _, slow = slow_eq7(toy_f, clean, noise, tau, d, K_MAX)
    weighted, flow = (0.9 * tau + 0.1) * slow, d == 1 / K_MAX
    n = tau.numel()
    close(terms["flow"], weighted[flow].sum() / n, "terms['flow']",
          "the flow frames' share of the loss: Σ_flow w(τ)·L / (B·T)")
    close(terms["boot"], weighted[~flow].sum() / n, "terms['boot']",
          "the bootstrap frames' share of the loss: Σ_boot w(τ)·L / (B·T)")


def test_eq7_bootstrap_term_equals_its_x_space_form():
    """(1 − τ)²·‖v̂ − sg(b′ + b″)/2‖² = ‖ẑ₁ − sg(z̃ + (1 − τ)·(b′ + b″)/2)‖²: the same loss."""
    clean, noise, tau, d = eq7_batch()
    terms = dy.shortcut_forcing_loss(toy_f, clean, noise, tau, d, K_MAX)
    t4, d4 = tau[..., None, None], d[..., None, None]  # (B, T, 1, 1)
    zt = (1 - t4) * noise + t4 * clean
    b1 = (toy_f(zt, tau, d / 2) - zt) / (1 - t4)
    zp = zt + b1 * d4 / 2
    b2 = (toy_f(zp, tau + d / 2, d / 2) - zp) / (1 - (t4 + d4 / 2))
    x_target = zt + (1 - t4) * (b1 + b2) / 2
    x_space = (toy_f(zt, tau, d) - x_target).pow(2).mean((-2, -1))  # (B, T)
    boot = d > 1 / K_MAX
    close(terms["per_frame"][boot], x_space[boot], "bootstrap loss vs its x-space form",
          "the (1 − τ)² factor turns the velocity error into an x-space error")


def test_eq7_bootstrap_target_is_a_stop_gradient():
    """sg(b′ + b″): the gradient reaches the weights only through ẑ₁ = f(z̃, τ, d)."""
    clean, noise, tau, d = eq7_batch()
    W = nn.Parameter(toy_weight())
    f = make_toy_f(W)
    loss = dy.shortcut_forcing_loss(f, clean, noise, tau, d, K_MAX)["loss"]
    (grad,) = torch.autograd.grad(loss, W)
    slow, _ = slow_eq7(f, clean, noise, tau, d, K_MAX)
    (slow_grad,) = torch.autograd.grad(slow, W)
    close(grad, slow_grad, "gradient of the loss w.r.t. the weights",
          "the two half-step passes build a target: compute them under torch.no_grad() "
          "or .detach() them (sg in Eq 7), so only the full-step prediction ẑ₁ is trained")


def test_eq7_asks_the_network_only_for_steps_on_the_grid():
    """The network embeds only d ∈ {1, 1/2, …, 1/K_max} and τ on the 1/K_max grid below 1."""
    clean, noise, tau, d = eq7_batch()
    asked = []

    def f(z, t, dd, rows=None):
        asked.append((torch.as_tensor(t).flatten(), torch.as_tensor(dd).flatten()))
        return toy_f(z, t, dd)

    dy.shortcut_forcing_loss(f, clean, noise, tau, d, K_MAX)
    taus, ds = torch.cat([a[0] for a in asked]), torch.cat([a[1] for a in asked])
    assert float(ds.min()) >= 1 / K_MAX, (
        f"f was asked for d = {float(ds.min())} < d_min = 1/{K_MAX}: flow frames (d = d_min) need "
        "no half steps; if your half-step passes run on them too, condition them on d_min (their "
        "result is not used)")
    assert torch.equal(taus * K_MAX, (taus * K_MAX).round()) and float(taus.max()) < 1, \
        "f is asked at τ and τ + d/2 only: both on the 1/K_max grid, below 1"


# ------------------------------------------------------ Eq 7: speed-up, safeguard, gradients

def batch_with_flow_rows():
    model = tiny_model().train()
    gen = torch.Generator().manual_seed(5)
    latents = torch.tanh(torch.randn(8, 5, 8, 3, generator=gen))
    fb = dy.forcing_batch(latents, torch.randint(0, 2, (8, 5, 3)), K_MAX, 0.25, gen,
                          flow_frac=0.5)
    n_flow = int((fb["d"] == 1 / K_MAX).all(1).sum())
    assert 0 < n_flow < 8 and fb["independent"].any()
    return model, fb, n_flow


def test_half_step_passes_skip_rows_without_a_bootstrap_frame():
    """With --flow-frac most rows are all flow frames: the two half-step passes run only on the
    rows that hold a bootstrap frame (a speed-up, not part of Eq 7)."""
    model, fb, n_flow = batch_with_flow_rows()
    calls = []

    def f(z, t, d, rows=None):
        calls.append(len(z))
        return model(z, t, d, *dy.row_select(fb, rows))

    dy.shortcut_forcing_loss(f, fb["clean"], fb["noise"], fb["tau"], fb["d"], K_MAX)
    assert calls == [8, 8 - n_flow, 8 - n_flow]


def test_row_selected_half_steps_give_the_row_by_row_loss():
    """The half-step passes on a subset of rows see exactly those rows' actions and start flags."""
    model, fb, _ = batch_with_flow_rows()

    def f(z, t, d, rows=None):
        return model(z, t, d, *dy.row_select(fb, rows))

    batched = dy.shortcut_forcing_loss(f, fb["clean"], fb["noise"], fb["tau"], fb["d"], K_MAX)
    for b in range(8):
        one = {k: v if v is None else v[b:b + 1] for k, v in fb.items()}

        def g(z, t, d, rows=None):
            return model(z, t, d, *dy.row_select(one, rows))

        row = dy.shortcut_forcing_loss(g, one["clean"], one["noise"], one["tau"], one["d"], K_MAX)
        torch.testing.assert_close(batched["per_frame"][b:b + 1], row["per_frame"],
                                   atol=1e-5, rtol=1e-4)


def test_boot_clip_clamps_the_half_step_predictions():
    """--boot-clip (not in paper): the bootstrap target is built from half-step x-predictions
    clamped to ±x_clip; the flow term and ẑ₁ itself are untouched."""
    clean, noise, tau, d = eq7_batch()

    def f(z, t, dd, rows=None):  # predictions beyond the latent range ±1
        return 3 * toy_f(z, t, dd)

    clipped = dy.shortcut_forcing_loss(f, clean, noise, tau, d, K_MAX, x_clip=1.0)["per_frame"]
    _, slow = slow_eq7(f, clean, noise, tau, d, K_MAX, x_clip=1.0)
    torch.testing.assert_close(clipped, slow, atol=1e-5, rtol=1e-4)
    _, free = slow_eq7(f, clean, noise, tau, d, K_MAX)
    assert not torch.allclose(clipped[d > 1 / K_MAX], free[d > 1 / K_MAX])  # the clamp acted


def test_loss_is_finite_at_every_grid_point():
    model = tiny_model().train()
    pairs = [(j * 2.0 ** -e, 2.0 ** -e) for e in range(7) for j in range(2 ** e)]  # all (τ, d)
    assert len(pairs) == 127
    tau = torch.tensor([[p[0]] for p in pairs])  # (127, 1): one frame per row
    d = torch.tensor([[p[1]] for p in pairs])
    clean, noise = torch.tanh(torch.randn(127, 1, 4, 6)), torch.randn(127, 1, 4, 6)

    def f(z, t, dd, rows=None):
        return model(z, t, dd)

    terms = dy.shortcut_forcing_loss(f, clean, noise, tau, d, K_MAX)
    assert torch.isfinite(terms["per_frame"]).all() and torch.isfinite(terms["loss"])
    terms["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_gradients_reach_the_tau_d_and_action_embeddings():
    model = tiny_model().train()
    gen = torch.Generator().manual_seed(0)
    fb = dy.forcing_batch(torch.tanh(torch.randn(8, 4, 8, 3, generator=gen)),
                          torch.randint(0, 2, (8, 4, 3), generator=gen), K_MAX, 0.25, gen)

    def f(z, t, d, rows=None):
        return model(z, t, d, *dy.row_select(fb, rows))

    loss = dy.shortcut_forcing_loss(f, fb["clean"], fb["noise"], fb["tau"], fb["d"], K_MAX)["loss"]
    loss.backward()
    for name in ("tau_embed", "d_embed"):
        assert float(getattr(model, name).weight.grad.abs().sum()) > 0, name
    assert float(model.action_embed[0].weight.grad.abs().sum()) > 0  # the actions reach the loss


# ---------------------------------------------------------------- Eq 4: sample_tau_d

def draw(k_min=1, flow_frac=0.0, shape=(400, 500), seed=0):
    return dy.sample_tau_d(shape, K_MAX, torch.Generator().manual_seed(seed), k_min=k_min,
                           flow_frac=flow_frac)


def test_eq4_d_takes_the_powers_of_two_from_1_to_1_over_k_max():
    _, d = draw()
    assert set(d.unique().tolist()) == set(LEVELS), \
        f"d must take the values 1, 1/2, …, 1/K_max = 1/64; got {sorted(d.unique().tolist())}"


def test_eq4_d_is_uniform_over_the_powers_of_two():
    _, d = draw()
    share = {f"1/{round(1 / v)}": round(float((d == v).float().mean()), 3) for v in LEVELS}
    assert all(abs(s - 1 / 7) < 0.005 for s in share.values()), \
        f"d ~ 1/U{{1, 2, 4, …, 64}}: each of the 7 step sizes 1/7 of the frames; got {share}"


def test_eq4_tau_lies_on_the_grid_of_its_step():
    tau, d = draw()
    j = tau / d
    assert torch.equal(j, j.round()) and (tau >= 0).all(), \
        "τ must be a multiple of its own d: τ ∈ {0, d, 2d, …}"
    assert (1 - tau >= d).all(), (
        f"τ ≤ 1 − d: τ = 1 (clean) is never drawn, so 1 − τ ≥ d in Eq 7's divisions; got τ up "
        f"to {float(tau.max())}. {CONVENTION}")
    assert float(tau[d == 1].max()) == 0.0, "d = 1 is one step from pure noise (τ = 0)"


def test_eq4_tau_is_uniform_given_its_step():
    tau, d = draw()
    for v in (0.5, 0.25, 1 / 64):
        counts = torch.bincount((tau[d == v] / v).long(), minlength=round(1 / v)).float()
        assert len(counts) == round(1 / v)
        spread = float((counts / counts.mean() - 1).abs().max())
        assert spread < 0.15, f"d = {v}: τ must be uniform on {{0, d, …, 1 − d}}; counts {counts}"


def test_eq4_tau_and_d_are_drawn_per_frame():
    tau, d = draw(shape=(50, 40))
    assert (d.std(dim=1) > 0).all() and (tau.std(dim=1) > 0).all(), \
        "diffusion forcing: every frame (last dim of `shape`) draws its own τ and d"


def test_eq4_k_min_leaves_out_the_largest_steps():
    """--k-min 4 keeps d ∈ {1/4, …, 1/64}, still uniform, τ still on each d's grid."""
    tau, d = draw(k_min=4)
    assert set(d.unique().tolist()) == set(LEVELS[2:])
    for v in LEVELS[2:]:
        assert float((d == v).float().mean()) == pytest.approx(1 / 5, abs=0.005)
    assert torch.equal(tau / d, (tau / d).round()) and (1 - tau >= d).all()


def test_flow_frac_sets_the_share_of_flow_rows():
    """--flow-frac 0.75: 75 % of the rows hold flow frames (d = d_min) only."""
    _, d = draw(k_min=4, flow_frac=0.75, shape=(4000, 50), seed=1)
    share = float((d == 1 / K_MAX).all(dim=1).float().mean())
    assert share == pytest.approx(0.75, abs=0.02), f"share of flow rows {share:.3f}, not 0.75"


def test_flow_frac_rows_are_all_flow_or_a_flow_prefix_then_bootstrap():
    """A bootstrap row holds flow frames (d = d_min) before its split point and none after it."""
    _, d = draw(k_min=4, flow_frac=0.75, shape=(4000, 50), seed=1)
    is_flow = d == 1 / K_MAX  # (rows, T)
    flow_rows = is_flow.all(dim=1)
    first_boot = (~is_flow).float().argmax(dim=1)  # index of the first bootstrap frame
    t = torch.arange(d.shape[1])
    after = t[None] >= first_boot[:, None]  # (rows, T) from the split point on
    assert not (is_flow & after)[~flow_rows].any(), "no flow frame after a bootstrap frame"
    assert float(flow_rows.float().mean()) == pytest.approx(0.75, abs=0.02)


def test_flow_frac_split_point_is_uniform_over_the_row():
    _, d = draw(k_min=4, flow_frac=0.75, shape=(4000, 10), seed=1)
    boot_rows = ~(d == 1 / K_MAX).all(dim=1)
    first_boot = (d[boot_rows] > 1 / K_MAX).float().argmax(dim=1)
    counts = torch.bincount(first_boot, minlength=10).float()  # ≈ 100 per position
    assert float((counts / counts.mean() - 1).abs().max()) < 0.35, counts


def test_flow_frac_trains_the_sampler_configuration_at_every_position():
    """Train what you sample: a generated frame (d = 1/K, K = 4) follows a history tagged d_min.
    That configuration must be drawn (with gradients) after a history of every length."""
    _, d = draw(k_min=1, flow_frac=0.75, shape=(4000, 8), seed=2)
    is_flow = d == 1 / K_MAX
    history_all_flow = torch.cumprod(is_flow.long(), dim=1).roll(1, dims=1).bool()
    history_all_flow[:, 0] = True  # frame 0 has no history
    sampler_like = history_all_flow & (d == 1 / 4)  # (rows, T)
    per_position = sampler_like.sum(dim=0)
    assert (per_position > 0).all(), \
        f"d = 1/4 after a d_min history never drawn at some positions: {per_position.tolist()}"


def test_flow_frac_bootstrap_frames_draw_the_other_steps_uniformly():
    """Each bootstrap frame draws d uniformly from {1/k_min, …, 2/K_max}."""
    _, d = draw(k_min=4, flow_frac=0.75, shape=(4000, 50), seed=1)
    assert set(d.unique().tolist()) == {2.0 ** -e for e in range(2, 7)}
    boot = d[d > 1 / K_MAX]
    for v in (1 / 4, 1 / 8, 1 / 16, 1 / 32):
        assert float((boot == v).float().mean()) == pytest.approx(1 / 4, abs=0.01)


def test_flow_frac_keeps_tau_on_the_grid_and_uniform():
    tau, d = draw(k_min=4, flow_frac=0.75, shape=(4000, 50), seed=1)
    assert torch.equal(tau / d, (tau / d).round()) and (1 - tau >= d).all()
    counts = torch.bincount((tau[d == 1 / K_MAX] * K_MAX).long(), minlength=K_MAX).float()
    assert float((counts / counts.mean() - 1).abs().max()) < 0.1


# ---------------------------------------------------------------- Eq 8: ramp_weight

def test_eq8_ramp_weight_is_one_tenth_at_noise_and_one_at_clean_data():
    w0, w1 = float(dy.ramp_weight(torch.tensor(0.0))), float(dy.ramp_weight(torch.tensor(1.0)))
    assert (w0, w1) == (pytest.approx(0.1), pytest.approx(1.0)), (
        f"w(0) = 0.1 and w(1) = 1, got w(0) = {w0}, w(1) = {w1}: Eq 8 gives the least weight to "
        f"pure noise; {CONVENTION}")


def test_eq8_ramp_weight_is_linear_in_the_signal_level():
    tau = torch.linspace(0, 1, 65).reshape(5, 13)  # any shape: (B, T) in training
    close(dy.ramp_weight(tau), 0.9 * tau + 0.1, "ramp_weight(τ)", "w(τ) = 0.9·τ + 0.1, per frame")


def test_inverse_tau_weight_is_one_at_noise_and_one_tenth_at_clean_data():
    table = {0.0: 1.0, 0.5: 0.55, 1.0: 0.1}  # `--tau-weight inverse` (not in paper): 1 − 0.9τ
    for tau, want in table.items():
        got = float(dy.tau_weight(torch.tensor(tau), "inverse"))
        assert got == pytest.approx(want), f"inverse weight at τ = {tau}: want {want}, got {got}"


def test_eq7_loss_with_the_inverse_weight_is_its_weighted_mean_over_frames():
    clean, noise, tau, d = eq7_batch()
    terms = dy.shortcut_forcing_loss(toy_f, clean, noise, tau, d, K_MAX, weight="inverse")
    _, slow = slow_eq7(toy_f, clean, noise, tau, d, K_MAX)
    close(terms["loss"], ((1 - 0.9 * tau) * slow).mean(), "the total loss, --tau-weight inverse",
          "loss = mean over all B·T frames of (1 − 0.9τ)·L", rtol=1e-5)


def test_eq7_loss_with_a_frame_weight_is_the_weighted_mean_over_frames():
    clean, noise, tau, d = eq7_batch()
    frame_weight = torch.rand(tau.shape, generator=torch.Generator().manual_seed(1)) * 3
    terms = dy.shortcut_forcing_loss(toy_f, clean, noise, tau, d, K_MAX, weight="inverse",
                                     frame_weight=frame_weight)
    _, slow = slow_eq7(toy_f, clean, noise, tau, d, K_MAX)
    close(terms["loss"], (frame_weight * (1 - 0.9 * tau) * slow).mean(),
          "the total loss with a frame weight (--event-frac)",
          "loss = mean over all B·T frames of frame_weight · (1 − 0.9τ) · L", rtol=1e-5)


# ---------------------------------------------------------------- conventions of the model inputs

def test_context_signal_level_is_mostly_clean_and_on_the_grid():
    tau_c = dy.context_signal_level(dy.Args.ctx_tau, K_MAX)
    assert 0.9 <= tau_c < 1  # 10 % noise, not 90 %
    assert tau_c * K_MAX == round(tau_c * K_MAX)  # on the d_min grid


def test_context_signal_level_one_is_the_cleanest_trained_level():
    """Eq 4 never draws τ = 1, so `--ctx-tau 1` must not reach the untrained τ-embedding row."""
    assert dy.context_signal_level(1.0, K_MAX) == 1 - 1 / K_MAX


def test_shift_actions_gives_each_frame_the_action_that_led_into_it():
    actions = torch.tensor([[[1, 0], [2, 1], [3, 0], [4, 1]]])  # a_t taken at frame t, (1, 4, 2)
    prev, valid = dy.shift_actions(actions)
    assert torch.equal(prev[0, 1:], actions[0, :-1])  # the token of step t carries a_{t−1}
    assert valid.tolist() == [[False, True, True, True]]  # step 0: the base "no action" embedding


# ---------------------------------------------------------------- model: actions, start frames

def test_prediction_changes_only_from_the_frame_the_action_leads_into():
    model = tiny_model(window=8)
    z, tau, d = torch.randn(2, 5, 4, 6), torch.full((2, 5), 0.5), torch.full((2, 5), 0.25)
    acts = torch.randint(0, 2, (2, 5, 3))
    out = model(z, tau, d, *dy.shift_actions(acts))
    acts2 = acts.clone()
    acts2[:, 2, 0] = 4  # a different move at frame 2: it leads into frame 3
    out2 = model(z, tau, d, *dy.shift_actions(acts2))
    torch.testing.assert_close(out[:, :3], out2[:, :3], atol=0, rtol=0)  # frames ≤ 2: no a_2
    assert (out[:, 3] - out2[:, 3]).abs().max() > 1e-4  # frame 3 does


def test_unlabelled_clips_use_the_base_action_embedding():
    model = tiny_model()
    z, tau, d = torch.randn(2, 5, 4, 6), torch.full((2, 5), 0.5), torch.full((2, 5), 0.25)
    acts = torch.randint(0, 2, (2, 5, 3))
    torch.testing.assert_close(model(z, tau, d),
                               model(z, tau, d, acts, torch.zeros(2, 5, dtype=torch.bool)))


def start_frame_batch():
    lat, acts = torch.rand(10, 6, 8, 3) * 2 - 1, torch.randint(0, 2, (10, 6, 3))
    return dy.forcing_batch(lat, acts, K_MAX, 0.3, torch.Generator().manual_seed(0))


def test_forcing_batch_packs_the_latents():
    assert start_frame_batch()["clean"].shape == (10, 6, 4, 6)  # App A: N_b × D_b → N_b/2 × 2·D_b


def test_forcing_batch_makes_30_percent_of_the_sequences_independent_images():
    assert int(start_frame_batch()["independent"].sum()) == 3


def test_start_frame_rows_and_frame_0_carry_no_action():
    fb = start_frame_batch()
    assert not fb["act_valid"][fb["independent"]].any() and not fb["act_valid"][:, 0].any()
    assert fb["act_valid"][~fb["independent"], 1:].all()


def event_rows_batch(event_weight=0.0):
    lat, acts = torch.rand(10, 6, 8, 3) * 2 - 1, torch.randint(0, 2, (10, 6, 3))
    return dy.forcing_batch(lat, acts, K_MAX, 0.3, torch.Generator().manual_seed(0), event_rows=4,
                            event_weight=event_weight)


def test_event_rows_weigh_their_last_frame_as_a_whole_row_and_the_rest_as_usual():
    want = torch.ones(10, 6)  # `--event-frac` (not in paper): the last 4 rows end at an event
    want[6:] = torch.tensor([1.0, 1, 1, 1, 1, 6])  # each weighs its event frame T = 6, the rest 1
    torch.testing.assert_close(event_rows_batch()["frame_weight"], want)


def test_event_weight_sets_the_weight_of_the_event_rows_last_frame():
    want = torch.ones(10, 6)  # `--event-weight 2` (not in paper)
    want[6:, -1] = 2.0  # the last 4 rows' event frame weighs 2 instead of T = 6
    torch.testing.assert_close(event_rows_batch(event_weight=2.0)["frame_weight"], want)


def test_start_frame_rows_are_drawn_among_the_rows_without_an_event():
    fb = event_rows_batch()
    assert int(fb["independent"].sum()) == 3 and not fb["independent"][6:].any()


def test_an_independent_sequence_equals_its_frames_run_one_by_one():
    fb = start_frame_batch()
    model = tiny_model()
    z, tau, d = fb["noise"][:2], fb["tau"][:2], fb["d"][:2]
    valid = fb["act_valid"][:2].clone()
    valid[0] = False
    out = model(z, tau, d, fb["prev_actions"][:2], valid, independent=torch.tensor([True, False]))
    for t in range(6):
        single = model(z[:1, t:t + 1], tau[:1, t:t + 1], d[:1, t:t + 1])
        torch.testing.assert_close(out[0, t], single[0, 0], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- KV-cached rollouts

@pytest.mark.parametrize("Tc,H,window", [(1, 2, 4), (3, 6, 4), (2, 5, 2), (0, 3, 4)])
def test_cached_rollout_equals_uncached_recompute(Tc, H, window):
    model = tiny_model(window=window)
    context = torch.tanh(torch.randn(2, Tc, 4, 6))
    acts = torch.randint(0, 2, (2, Tc + H, 3))
    fast = dy.rollout(model, context, acts, H, 4, 0.9, torch.Generator().manual_seed(1))
    slow = dy.rollout(model, context, acts, H, 4, 0.9, torch.Generator().manual_seed(1),
                      use_cache=False)
    assert fast.shape == (2, H, 4, 6)
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)  # also beyond the window C


def test_cached_rollout_equals_uncached_recompute_with_space_rope():
    model = tiny_model(space_rope_base=10.0)
    context, acts = torch.tanh(torch.randn(2, 3, 4, 6)), torch.randint(0, 2, (2, 8, 3))
    fast = dy.rollout(model, context, acts, 5, 4, 0.9, torch.Generator().manual_seed(1))
    slow = dy.rollout(model, context, acts, 5, 4, 0.9, torch.Generator().manual_seed(1),
                      use_cache=False)
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)


def test_token_positions_put_packed_latents_between_their_pair_on_the_lattice():
    """16 packed tokens of 32 latents on a 4 × 8 lattice (cpu preset): a 4 × 4 grid, 2 columns
    apart, rows spread over the same 8 columns; special tokens at the centre (hand-written)."""
    pos = dy.token_positions(latent_tokens=16, registers=4)  # (2 + 16 + 4, 2)
    lattice = [[r, c] for r in (0.5, 2.5, 4.5, 6.5) for c in (0.5, 2.5, 4.5, 6.5)]
    assert pos[2:18].tolist() == lattice
    assert pos[:2].tolist() == [[3.5, 3.5]] * 2 and pos[18:].tolist() == [[3.5, 3.5]] * 4


def test_space_rope_makes_the_model_see_where_a_latent_is():
    """With space RoPE the same latents at swapped slots (slot embeddings zeroed) give a
    different output; without it, attention is blind to the slot's place."""
    out = {}
    for base in (0.0, 10.0):
        model = tiny_model(space_rope_base=base)
        with torch.no_grad():
            model.latent_slot.zero_()
        z = torch.randn(1, 1, 4, 6)
        swapped = z[:, :, [1, 0, 2, 3]]
        tau, d = torch.zeros(1, 1), torch.ones(1, 1)
        with torch.no_grad():
            a, b = model(z, tau, d), model(swapped, tau, d)[:, :, [1, 0, 2, 3]]
        out[base] = float((a - b).abs().max())
    assert out[0.0] < 1e-5 and out[10.0] > 1e-3, out


def test_two_stream_layout_matches_the_hand_written_table():
    """--ctx-stream, T = 3, C = 2: history frames (rows 0–2) see themselves and C − 1 earlier
    history frames; loss frames (rows 3–5) see the C − 1 history frames before them and
    themselves — what a generated frame sees in the KV cache."""
    positions, mask = dy.two_stream_layout(3, 2, None, 1, "cpu")
    assert positions.tolist() == [0, 1, 2, 0, 1, 2]
    assert mask.int().tolist() == [[1, 0, 0, 0, 0, 0],
                                   [1, 1, 0, 0, 0, 0],
                                   [0, 1, 1, 0, 0, 0],
                                   [0, 0, 0, 1, 0, 0],
                                   [1, 0, 0, 0, 1, 0],
                                   [0, 1, 0, 0, 0, 1]]


def test_two_stream_layout_start_frames_see_only_themselves():
    _, mask = dy.two_stream_layout(3, 4, torch.tensor([True, False]), 2, "cpu")
    assert mask.shape == (4, 1, 6, 6)
    assert torch.equal(mask[0, 0], torch.eye(6, dtype=torch.bool))  # row 0, its 2 tokens
    assert torch.equal(mask[1, 0], torch.eye(6, dtype=torch.bool))
    assert mask[2, 0, 4, 0]  # row 1: loss frame 1 sees history frame 0


def test_two_stream_loss_frame_matches_the_cached_sampling_pass():
    """A loss frame of the two-stream pass gets the output of sampling: history at τ_ctx in the
    KV cache, then the frame being denoised."""
    model = tiny_model()
    T, tau_c = 4, 58 / 64
    hist, z = torch.tanh(torch.randn(1, T, 4, 6)), torch.randn(1, T, 4, 6)
    acts = torch.randint(0, 2, (1, T, 3))
    prev, valid = dy.shift_actions(acts)
    tau, d = torch.full((1, T), 0.25), torch.full((1, T), 0.25)
    *inputs, layout = dy.history_stream(z, tau, d, hist, prev, valid, None, tau_c, K_MAX, 4,
                                        2 + 4 + 2)
    two = model(*inputs, time_layout=layout)[:, T:]
    t = 2  # the frame after two history frames
    cache = common.KVCache(4)
    model(hist[:, :t], torch.full((1, t), tau_c), torch.full((1, t), 1 / K_MAX), prev[:, :t],
          valid[:, :t], cache=cache, commit=True)
    one = model(z[:, t:t + 1], tau[:, t:t + 1], d[:, t:t + 1], prev[:, t:t + 1],
                valid[:, t:t + 1], cache=cache)
    torch.testing.assert_close(two[:, t], one[:, 0], atol=1e-5, rtol=1e-4)


def test_rollout_depends_on_the_actions():
    model = tiny_model()
    ctx, acts = torch.tanh(torch.randn(2, 2, 4, 6)), torch.randint(0, 2, (2, 5, 3))
    a = dy.rollout(model, ctx, acts, 3, 4, 0.9, torch.Generator().manual_seed(0))
    acts2 = acts.clone()
    acts2[:, 1, 0] = (acts[:, 1, 0] + 1) % 5  # a_1 leads into frame 2, the first generated one
    b = dy.rollout(model, ctx, acts2, 3, 4, 0.9, torch.Generator().manual_seed(0))
    assert (a - b).abs().max() > 1e-4


def test_rollout_accepts_powers_of_two_only():
    model = tiny_model()
    ctx, acts = torch.tanh(torch.randn(2, 2, 4, 6)), torch.randint(0, 2, (2, 5, 3))
    with pytest.raises(AssertionError):
        dy.rollout(model, ctx, acts, 3, 3, 0.9, torch.Generator())


# ---------------------------------------------------------------- learning: a 1-D toy, a known flow

class ToyNet(nn.Module):
    """ẑ₁ = f(z, τ, d) for 1-D data: τ·z + (1 − τ)·MLP(z, τ, embedding of d).

    The skip term τ·z is only a preconditioning (at τ → 1 the clean value is z itself); the
    output is still an x-prediction.
    """

    def __init__(self, width=64):
        super().__init__()
        self.d_embed = nn.Embedding(7, 8)
        self.net = nn.Sequential(nn.Linear(10, width), nn.SiLU(), nn.Linear(width, width),
                                 nn.SiLU(), nn.Linear(width, 1))

    def forward(self, z, tau, d, rows=None):  # z (B, 1, 1, 1); tau, d (B, 1) or floats
        B = z.shape[0]
        tau, d = (torch.as_tensor(v, dtype=z.dtype).reshape(-1, 1).expand(B, 1) for v in (tau, d))
        e = self.d_embed(torch.round(-torch.log2(d)).long()[:, 0])  # (B, 8)
        x = z.view(B, 1)
        return (tau * x + (1 - tau) * self.net(torch.cat([x, tau, e], -1))).view(B, 1, 1, 1)


def toy_data(n, gen):
    """Two modes: ±U(0.3, 0.9), inside the tanh range like the tokenizer's latents."""
    sign = torch.randint(0, 2, (n, 1, 1, 1), generator=gen) * 2 - 1
    return sign * (0.3 + 0.6 * torch.rand(n, 1, 1, 1, generator=gen))


def wasserstein_1d(a, b):
    return float((a.sort().values - b.sort().values).abs().mean())


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
        loss = dy.shortcut_forcing_loss(net, toy_data(256, gen), noise, tau, d, K_MAX,
                                        x_clip=1.0)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        noise = torch.randn(4000, 1, 1, 1, generator=gen)
        s = {K: dy.sample_frame(net, noise, K).flatten() for K in (1, 4, 64)}
        data = toy_data(4000, gen).flatten()
    report = {K: (round(wasserstein_1d(s[K], data), 3),
                  round(float((s[K].abs() > 0.2).float().mean()), 3)) for K in s}
    assert wasserstein_1d(s[4], s[64]) < 0.1, report
    for K in (1, 4, 64):
        assert wasserstein_1d(s[K], data) < 0.3, report  # the mean 0 would be at distance 0.6
        assert float((s[K].abs() > 0.2).float().mean()) > 0.6, report  # two modes, not the mean
        assert 0.35 < float((s[K] > 0).float().mean()) < 0.65, report  # both modes


def test_fixed_batch_overfits():
    model = tiny_model().train()
    gen = torch.Generator().manual_seed(0)
    fb = dy.forcing_batch(torch.tanh(torch.randn(4, 4, 8, 3, generator=gen)),
                          torch.randint(0, 2, (4, 4, 3)), K_MAX, 0.25, gen)

    def f(z, t, d, rows=None):
        return model(z, t, d, *dy.row_select(fb, rows))

    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = dy.shortcut_forcing_loss(f, fb["clean"], fb["noise"], fb["tau"], fb["d"],
                                        K_MAX)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.3 * losses[0], losses[::10]


def test_ema_update_matches_a_slow_average():
    """θ_ema after n steps = the β-weighted average of the online weights, β_s = min(decay,
    (1 + s)/(10 + s))."""
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


# ---------------------------------------------------------------- pipeline: smoke, resume, re-eval

@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    """This module's folder for runs after the shared smoke tokenizer (tests/conftest.py)."""
    return tmp_path_factory.mktemp("dyn")


@pytest.fixture(scope="module")
def smoke_run(smoke_dir, smoke_tokenizer):
    """dynamics.py --preset smoke run as a user would. Returns (run folder, summary)."""
    tmp, (_, tok) = smoke_dir, smoke_tokenizer
    full = str(tmp / "full")
    run("dynamics.py", "--preset", "smoke", "--tokenizer", tok, "--out", full)
    with open(os.path.join(full, "summary.json")) as fh:
        return full, json.load(fh)


def test_smoke_run_writes_checkpoint_metrics_summary_and_pictures(smoke_run):
    full, _ = smoke_run
    for f in ("ckpt.pt", "args.json", "metrics.jsonl", "summary.json", "rollout.png",
              "rollout.gif", "rollout_psnr.png", "loss_tau_d.png"):
        assert os.path.exists(os.path.join(full, f)), f


def test_smoke_summary_holds_the_headline_and_instrument_figures(smoke_run):
    _, s = smoke_run
    for key in ("stage", "preset", "device", "steps", "wall_s", "steps_per_s", "frames_per_s",
                "peak_mem_gb", "psnr_k4", "psnr_k64", "psnr_repeat_last", "action_shuffle_gap_db",
                "gen_fps", "cache_speedup_ctx32", "psnr_k4_per_horizon", "loss_by_d",
                "probe_mse_true", "probe_mse_shuffled", "probe_mse_copy", "probe_action_cost",
                "psnr_repeat_last_decoded", "psnr_tokenizer_ceiling", "latent_mse_k4",
                *(f"event_n_{kind}" for kind in ("move", "crack", "fell", "table", "wood"))):
        assert key in s, key
    assert s["stage"] == "dynamics" and s["steps"] == 6 and len(s["psnr_k4_per_horizon"]) == 3


def test_rollout_psnr_averages_the_psnr_of_the_mean_error_over_horizons(smoke_run):
    """psnr_k4 = mean over horizons of the PSNR of the mean squared error; the mean of per-frame
    PSNRs, which exact copies inflate, is kept beside it."""
    _, s = smoke_run
    assert abs(s["psnr_k4"] - sum(s["psnr_k4_per_horizon"]) / 3) < 1e-4
    assert "psnr_repeat_last_frame_mean" in s and "psnr_k4_frame_mean" in s


def test_smoke_run_scores_the_environment_replayed_like_a_rollout(smoke_run):
    """The built-in data can be replayed: the environment stepped with the true and the shuffled
    actions is scored like a rollout (what a perfect world model would reach)."""
    _, s = smoke_run
    assert len(s["psnr_simulator_per_horizon"]) == 3 and "psnr_simulator_shuffled" in s
    gap = s["psnr_simulator"] - s["psnr_simulator_shuffled"]
    assert s["action_shuffle_gap_simulator_db"] == gap


def test_checkpoint_names_its_parent_and_format(smoke_run):
    full, _ = smoke_run
    ckpt = torch.load(os.path.join(full, "ckpt.pt"), weights_only=True)
    assert ckpt["parent"]["stage"] == "tokenizer" and ckpt["format_version"] == 1


def test_load_dynamics_gives_the_ema_weights(smoke_run):
    """Later stages get the EMA weights (--ema), which differ from the online weights."""
    full, _ = smoke_run
    ckpt = torch.load(os.path.join(full, "ckpt.pt"), weights_only=True)
    model, _ = dy.load_dynamics(os.path.join(full, "ckpt.pt"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["ema"][k]), k
    assert any(not torch.equal(ckpt["ema"][k], ckpt["model"][k]) for k in ckpt["model"])


def test_resume_after_an_interruption_gives_the_uninterrupted_weights(smoke_dir, smoke_tokenizer,
                                                                       smoke_run):
    tmp, (_, tok) = smoke_dir, smoke_tokenizer
    full, _ = smoke_run
    part = str(tmp / "part")
    args = ["dynamics.py", "--preset", "smoke", "--tokenizer", tok, "--out", part,
            "--eval-seqs", "0"]
    run(*args, "--stop-at", "3")
    run(*args, "--resume")
    a = torch.load(os.path.join(full, "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(part, "ckpt.pt"), weights_only=True)
    assert b["step"] == 6
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(a["ema"][k], b["ema"][k], atol=1e-6, rtol=1e-5)


def test_event_frac_trains_on_the_uniform_rows_plus_the_milestone_rows(smoke_dir, smoke_tokenizer):
    tmp, (_, tok) = smoke_dir, smoke_tokenizer
    out = str(tmp / "events")
    run("dynamics.py", "--preset", "smoke", "--tokenizer", tok, "--out", out, "--eval-seqs", "0",
        "--event-frac", "0.5")
    with open(os.path.join(out, "summary.json")) as fh:
        s = json.load(fh)
    # smoke batches alternate 4 rows × 4 frames and 2 × 6; with 2 and 1 milestone rows on top:
    frames_per_step = s["frames_per_s"] / s["steps_per_s"]  # the same wall time divides both
    assert s["steps"] == 6 and frames_per_step == pytest.approx(((4 + 2) * 4 + (2 + 1) * 6) / 2)


def test_dynamics_eval_reevaluates_a_run_folder_and_keeps_its_training_figures(smoke_dir,
                                                                               smoke_run):
    """python dynamics_eval.py RUN_DIR: the model and data come from the checkpoint (no --preset
    needed), the typed evaluation flags apply, the training figures and metrics stay."""
    tmp = smoke_dir
    full, s = smoke_run
    again = str(tmp / "again")
    shutil.copytree(full, again)
    log = open(os.path.join(again, "metrics.jsonl")).read()
    run("dynamics_eval.py", again, "--eval-seqs", "3")
    s2 = json.load(open(os.path.join(again, "summary.json")))
    assert s2["eval_only"] and s2["eval_seqs"] == 3 and s2["eval_horizon"] == 3
    assert s2["wall_s"] == s["wall_s"] and s2["steps"] == 6
    assert "psnr_k4" in s2 and "probe_mse_true" in s2 and "gen_fps" in s2
    assert open(os.path.join(again, "metrics.jsonl")).read() == log
    assert torch.load(os.path.join(again, "ckpt.pt"), weights_only=True)["step"] == 6


def test_the_k_max_rollout_runs_on_the_first_eval_seqs_kmax_windows(smoke_run):
    """--eval-seqs-kmax n: K = k_max generates the first n windows only, and K = sample_k is
    scored on those same windows beside it (the pair the K = 4 vs K = 64 figure compares)."""
    from tokenizer import LatentCache, load_tokenizer
    full, _ = smoke_run
    model, ckpt = dy.load_dynamics(os.path.join(full, "ckpt.pt"), torch.device("cpu"))
    a = dy.Args(**{**ckpt["args"], "eval_seqs": 3, "eval_seqs_kmax": 2})
    tok, _ = load_tokenizer(a.tokenizer, torch.device("cpu"))
    held = LatentCache(os.path.dirname(a.tokenizer), "heldout", seed=a.seed + 1)
    figures, ro = dy.evaluate(model.eval(), tok, held, a, torch.device("cpu"))
    assert ro["z"]["k4"].shape[0] == 3 and ro["z"]["k64"].shape[0] == 2
    Tc = a.eval_context
    alone = dy.psnr_scores("x", ro["pixels"]["k4"][:2], ro["true"][:2, Tc:])["psnr_x"]
    assert figures["eval_seqs_kmax"] == 2 and figures["psnr_k4_kmax_windows"] == alone
    assert figures["psnr_k4"] != alone  # the headline K = 4 figure keeps all three windows


def test_missing_tokenizer_names_the_command(tmp_path):
    r = subprocess.run([sys.executable, "dynamics.py", "--preset", "smoke", "--tokenizer",
                        str(tmp_path / "no.pt"), "--out", str(tmp_path / "o")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "python tokenizer.py" in r.stderr


def test_the_method_file_does_not_import_its_instruments():
    code = "import sys, dynamics; assert 'dynamics_eval' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def probe_model(smoke_tokenizer, action_std):
    from tokenizer import LatentCache
    _, tok = smoke_tokenizer
    held = LatentCache(os.path.dirname(tok), "heldout")
    a = dy.Args(**{**dy.PRESETS["smoke"], "eval_seqs": 8})
    latent = [held.latents.shape[1] // 2, 2 * held.latents.shape[2]]
    model = dy.build_model(vars(a), *latent, [n for _, n in held.meta["action_components"]])
    for emb in model.action_embed:
        if action_std:
            nn.init.normal_(emb.weight, std=action_std)
        else:
            nn.init.zeros_(emb.weight)
    return dynamics_eval.action_probe(model.eval(), held, a, torch.device("cpu"))


def test_action_probe_is_zero_for_a_model_blind_to_actions(smoke_tokenizer):
    """Zero action embeddings: the model cannot see the action, so true and shuffled agree."""
    blind = probe_model(smoke_tokenizer, 0.0)
    assert blind["probe_action_cost"] == 0
    assert blind["probe_mse_true"] == blind["probe_mse_shuffled"]


def test_action_probe_sees_actions_and_scores_copying_on_the_same_windows(smoke_tokenizer):
    blind, seeing = probe_model(smoke_tokenizer, 0.0), probe_model(smoke_tokenizer, 1.0)
    assert seeing["probe_mse_true"] != seeing["probe_mse_shuffled"]
    assert seeing["probe_mse_copy"] == blind["probe_mse_copy"] > 0  # copying uses no model


def test_event_frac_adds_windows_ending_at_a_milestone_to_the_uniform_ones(smoke_tokenizer):
    from tokenizer import LatentCache
    _, tok = smoke_tokenizer
    cache = LatentCache(os.path.dirname(tok), "train", seed=0)
    batch = dy.sample_windows(cache, 16, 4, event_frac=0.25)  # 16 uniform + 4 milestone windows
    event_last = (batch["rewards"][:, -1] > 0).any(-1)  # (20,) the last frame holds a reward
    assert event_last[-4:].all()
    assert batch["latents"].shape[:2] == batch["actions"].shape[:2] == (20, 4)


def test_event_frac_keeps_the_uniform_rows_an_event_free_run_draws(smoke_tokenizer):
    from tokenizer import LatentCache
    _, tok = smoke_tokenizer
    a, b = (LatentCache(os.path.dirname(tok), "train", seed=3) for _ in range(2))
    torch.testing.assert_close(dy.sample_windows(a, 16, 4, 0.25)["latents"][:16],
                               b.sample(16, 4)["latents"])


def test_preset_milestone_rows_fall_back_to_none_without_reward_labels(capsys):
    a = dy.Args(preset="cpu", event_frac=0.25)
    a._given = {"preset", "data"}  # the share came from the preset, not the command line
    assert dy.milestone_share(a, has_rewards=False) == 0.0
    assert "no reward labels" in capsys.readouterr().out


def test_asked_for_milestone_rows_without_reward_labels_stop_with_the_fix():
    a = dy.Args(preset="cpu", event_frac=0.25)
    a._given = {"preset", "event_frac"}
    with pytest.raises(SystemExit, match="--event-frac 0"):
        dy.milestone_share(a, has_rewards=False)


def test_milestone_rows_kept_where_the_dataset_has_reward_labels():
    a = dy.Args(preset="cpu", event_frac=0.25)
    a._given = {"preset"}
    assert dy.milestone_share(a, has_rewards=True) == 0.25


def test_event_frac_zero_samples_uniformly_as_before(smoke_tokenizer):
    from tokenizer import LatentCache
    _, tok = smoke_tokenizer
    a, b = (LatentCache(os.path.dirname(tok), "train", seed=3) for _ in range(2))
    torch.testing.assert_close(dy.sample_windows(a, 6, 4, 0.0)["latents"],
                               b.sample(6, 4)["latents"])


def test_inventory_rows_end_where_the_inventory_read_off_the_frames_changes(smoke_tokenizer):
    """--inventory-frac: the windows end where the inventory changes, re-derived here with the
    nearest-sprite reader instead of the exact decoder the cache uses."""
    from tokenizer import LatentCache
    _, tok = smoke_tokenizer
    cache = LatentCache(os.path.dirname(tok), "train", seed=0)
    T, expected, unpaid = 4, [], 0
    for ep in cache.episodes:
        first, length = ep["offset"], ep["length"]
        inv = env.read_frames(data.load_frames(os.path.join(
            cache.data_root, ep["id"] + ".npz")))["inv"]  # (T_ep, 7)
        rewards = np.asarray(cache.rewards[first:first + length])  # (T_ep, n_tasks)
        for t in range(T - 1, length):  # t: the window's last frame
            if (inv[t] != inv[t - 1]).any():
                expected.append(first + t - T + 1)
                unpaid += not (rewards[t] > 0).any()
    assert sorted(cache._starts(T, relevant=False, inventory=True).tolist()) == expected
    assert unpaid > 0  # changes that no reward marks: what the rows are for


def test_inventory_frac_adds_its_rows_after_the_milestone_rows(smoke_tokenizer):
    from tokenizer import LatentCache
    _, tok = smoke_tokenizer
    a, b = (LatentCache(os.path.dirname(tok), "train", seed=3) for _ in range(2))
    batch = dy.sample_windows(a, 16, 4, 0.25, inventory_frac=0.5)  # 16 + 4 + 8 rows
    assert batch["latents"].shape[:2] == (28, 4)
    assert (batch["rewards"][16:20, -1] > 0).any(-1).all()  # the milestone rows, as before
    expected = b.sample(16, 4)["latents"]  # the uniform rows, as an event-free run draws them
    torch.testing.assert_close(batch["latents"][:16], expected)


def test_preset_inventory_rows_are_dropped_on_other_data(capsys):
    a = dy.Args(preset="cpu", inventory_frac=0.25)
    a._given = {"preset"}  # from the preset, not the command line
    assert dy.inventory_share(a, shows_inventory=False) == 0.0
    assert "cannot be read off its frames" in capsys.readouterr().out


def test_asked_for_inventory_rows_on_other_data_stop_with_the_fix():
    a = dy.Args(preset="cpu", inventory_frac=0.25)
    a._given = {"preset", "inventory_frac"}
    with pytest.raises(SystemExit, match="--inventory-frac 0"):
        dy.inventory_share(a, shows_inventory=False)
