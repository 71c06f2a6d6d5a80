"""Tests of the causal tokenizer (tokenizer.py, §3.1, Eq 5; App A) and of tokenizer_eval.py.

Exercises (README "Equation map and exercises") and their grading commands:
    Eq 5  tokenizer_loss                python -m pytest tests/test_tokenizer.py -k eq5
    §3.1  encoder_mask, decoder_mask
          python -m pytest tests/test_tokenizer.py -k mask_matches_hand_written
"""

import json
import math
import os
import resource
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import common
import data
import tokenizer as tk
from conftest import ROOT, run

torch.set_num_threads(2)


def tiny(**kw):
    torch.manual_seed(0)
    cfg = dict(image_size=16, patch=4, width=32, depth=4, heads=2, n_latents=4, latent_dim=4,
               window=2)
    cfg.update(kw)
    return tk.Tokenizer(**cfg)


def blocky_frames(B, T, size=16, tile=4, seed=0):
    """Frames of flat-coloured tiles, like the built-in environment: (B, T, H, W, 3) uint8."""
    g = np.random.default_rng(seed)
    palette = g.integers(0, 256, (6, 3))
    idx = g.integers(0, 6, (B, T, size // tile, size // tile))
    img = palette[idx].repeat(tile, 2).repeat(tile, 3)  # (B, T, H, W, 3)
    return torch.from_numpy(img.astype(np.uint8))


def table(mask, names):
    """A boolean attention mask as text: one row per query, one column per key."""
    head = "query\\key " + " ".join(names)
    rows = [f"{names[i]:>9} " + " ".join(f"{'1' if v else '.':>2}" for v in row)
            for i, row in enumerate(mask.tolist())]
    return "\n".join([head, *rows])


# ---------------------------------------------------------------- §3.1 attention masks (exercise)

def check_mask(got, want, names, rule):
    assert torch.is_tensor(got) and got.shape == want.shape, (
        f"expected a ({len(names)}, {len(names)}) tensor, got "
        f"{tuple(got.shape) if torch.is_tensor(got) else type(got).__name__}")
    assert got.dtype == torch.bool, (
        f"expected a bool mask (True = may attend; attention masks with ~mask), got {got.dtype}")
    assert torch.equal(got, want), (
        f"{rule}\nrow = query, column = key, 1 = may attend\n"
        f"expected:\n{table(want, names)}\ngot:\n{table(got, names)}")


def test_encoder_mask_matches_hand_written_table():
    names = ["P0", "P1", "P2", "L0", "L1"]  # 3 patches, then 2 latents
    want = torch.tensor([
        # P  P  P  L  L
        [1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1],
    ], dtype=torch.bool)
    check_mask(tk.encoder_mask(3, 2), want, names,
               "§3.1 encoder: patches see only patches; latents see everything")


def test_decoder_mask_matches_hand_written_table():
    names = ["R0", "R1", "R2", "L0", "L1"]  # 3 read-outs, then 2 latents
    want = torch.tensor([
        # R  R  R  L  L
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1],
        [0, 0, 0, 1, 1],
        [0, 0, 0, 1, 1],
    ], dtype=torch.bool)
    check_mask(tk.decoder_mask(3, 2), want, names,
               "§3.1 decoder: read-outs see read-outs and latents; latents see only latents")


def test_encoder_mask_matches_hand_written_table_more_latents_than_patches():
    names = ["P0", "P1", "L0", "L1", "L2"]
    want = torch.tensor([
        # P  P  L  L  L
        [1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1],
    ], dtype=torch.bool)
    check_mask(tk.encoder_mask(2, 3), want, names,
               "§3.1 encoder: patches see only patches; latents see everything")


def test_decoder_mask_matches_hand_written_table_more_latents_than_patches():
    names = ["R0", "R1", "L0", "L1", "L2"]
    want = torch.tensor([
        # R  R  L  L  L
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1],
        [0, 0, 1, 1, 1],
        [0, 0, 1, 1, 1],
        [0, 0, 1, 1, 1],
    ], dtype=torch.bool)
    check_mask(tk.decoder_mask(2, 3), want, names,
               "§3.1 decoder: read-outs see read-outs and latents; latents see only latents")


# ---------------------------------------------------------------- patches, latent grid, packing

def test_patchify_orders_patches_row_major():
    x = torch.arange(2 * 3 * 8 * 8 * 3).reshape(2, 3, 8, 8, 3).float()
    p = tk.patchify(x, 4)
    assert p.shape == (2, 3, 4, 48)
    torch.testing.assert_close(p[0, 0, 1].view(4, 4, 3), x[0, 0, :4, 4:8])  # top row, 2nd column


def test_unpatchify_inverts_patchify():
    x = torch.arange(2 * 3 * 8 * 8 * 3).reshape(2, 3, 8, 8, 3).float()
    torch.testing.assert_close(tk.unpatchify(tk.patchify(x, 4), 4, 8, 8), x)


@pytest.mark.parametrize("n_latents,g,want", [
    # 16 latents on a 4×4 patch grid: one per patch, at the patch itself.
    (16, 4, [[r, c] for r in range(4) for c in range(4)]),
    # 32 latents on an 8×8 grid: a 4×8 lattice, rows at the centres of 2-patch-high cells.
    (32, 8, [[r, c] for r in (0.5, 2.5, 4.5, 6.5) for c in range(8)]),
])
def test_latent_grid_matches_hand_written_table(n_latents, g, want):
    torch.testing.assert_close(tk.latent_grid(n_latents, g), torch.tensor(want, dtype=torch.float))


def test_pack_concatenates_latent_tokens_two_by_two():
    z = torch.randn(2, 5, 8, 3)
    packed = tk.pack(z)
    assert packed.shape == (2, 5, 4, 6)
    torch.testing.assert_close(packed[0, 0, 1], torch.cat([z[0, 0, 2], z[0, 0, 3]]))


def test_unpack_inverts_pack():
    z = torch.randn(2, 5, 8, 3)
    torch.testing.assert_close(tk.unpack(tk.pack(z)), z)


# ---------------------------------------------------------------- model properties

def first_layer_argmax(model, frames):
    """The patch each latent attends to most in the first encoder layer (head 0): (B, N_b)."""
    x = model.patch_embed(tk.patchify(frames * 2 - 1, model.patch))[:, 0]  # (B, N_p, D)
    tokens = torch.cat([x, model.latent_tokens.expand(len(x), -1, -1)], 1)  # (B, N_p + N_b, D)
    att = model.encoder.blocks[0].attn
    h = model.encoder.blocks[0].norm1(tokens)
    B, S, D = h.shape
    q = att.q_norm(att.wq(h).view(B, S, att.n_heads, -1))  # (B, S, Hq, Dh)
    k = att.k_norm(att.wkv(h).view(B, S, 2, att.n_kv_heads, -1)[:, :, 0])  # (B, S, Hk, Dh)
    base = model.encoder.space_rope_base
    ang = common.rope_angles_2d(model.pos[:, 0], model.pos[:, 1], att.head_dim, base)
    q = common.apply_rope(q.transpose(1, 2), ang)  # (B, Hq, S, Dh)
    k = common.apply_rope(k.transpose(1, 2), ang)  # (B, Hk, S, Dh)
    logits = (q[:, :1] @ k[:, :1].transpose(-1, -2))[:, 0]  # (B, S, S) head 0
    return logits[:, model.n_patches:, :model.n_patches].argmax(-1)  # (B, N_b)


def test_locality_init_makes_latents_read_their_own_patch():
    torch.manual_seed(0)
    frames = torch.rand(8, 1, 32, 32, 3)
    model = tk.Tokenizer(32, 8, 64, 4, 2, 16, 8, 2, locality_init=True)
    own = torch.arange(16).expand(8, -1)
    assert (first_layer_argmax(model, frames) == own).float().mean() > 0.75


def test_without_locality_init_latents_read_arbitrary_patches():
    torch.manual_seed(0)
    frames = torch.rand(8, 1, 32, 32, 3)
    model = tk.Tokenizer(32, 8, 64, 4, 2, 16, 8, 2, locality_init=False)
    own = torch.arange(16).expand(8, -1)
    assert (first_layer_argmax(model, frames) == own).float().mean() < 0.3


def test_bottleneck_has_the_latent_shape_and_lies_in_tanh_range():
    z = tiny().eval().encode(blocky_frames(2, 4))
    assert z.shape == (2, 4, 4, 4) and z.abs().max() < 1  # tanh bottleneck: (−1, 1)


def changed_frame_2():
    x = blocky_frames(2, 4)
    x2 = x.clone()
    x2[:, 2] = 255 - x2[:, 2]
    return x, x2


def test_encoder_is_causal_in_time():
    model = tiny().eval()
    x, x2 = changed_frame_2()
    z, z2 = model.encode(x), model.encode(x2)
    torch.testing.assert_close(z[:, :2], z2[:, :2], atol=0, rtol=0)  # frames 0, 1 unchanged
    assert not torch.allclose(z[:, 2], z2[:, 2])


def test_decoder_is_causal_in_time():
    model = tiny().eval()
    x, x2 = changed_frame_2()
    with torch.no_grad():
        y, y2 = model.decode(model.encode(x)), model.decode(model.encode(x2))
    torch.testing.assert_close(y[:, :2], y2[:, :2], atol=0, rtol=0)


def test_only_the_latent_tokens_attend_over_time_by_default():
    """--time-tokens latents: patch and read-out slots (the first N_p) skip the time layers."""
    model = tiny()
    assert model.encoder.time_from == model.n_patches == model.decoder.time_from


def test_time_tokens_all_lets_every_slot_attend_over_time():
    model = tiny(time_tokens="all")
    assert model.encoder.time_from == 0 == model.decoder.time_from


def test_checkpoints_from_before_the_switch_rebuild_with_every_slot_in_time():
    """Their args have no time_tokens: they were trained with every slot attending over time."""
    a = dict(image_size=16, patch=4, width=32, depth=4, heads=2, n_latents=4, latent_dim=4,
             window=2, soft_cap=50.0)
    assert tk.build_tokenizer(a).decoder.time_from == 0
    assert tk.build_tokenizer({**a, "time_tokens": "latents"}).decoder.time_from == 16


def test_unknown_time_tokens_is_a_clear_error():
    with pytest.raises(ValueError, match="time_tokens must be"):
        tiny(time_tokens="patches")


def test_frame_by_frame_with_the_caches_equals_one_pass():
    """Encoding and decoding a stream one frame at a time with the time-attention KV caches (how
    play.py shows the dream) gives the frames of one causal pass, also past the window."""
    model = tiny(depth=8, window=3).eval()  # time layers 3 and 7: the decoder's 3 reaches pixels
    x = blocky_frames(2, 5)  # (2, 5, 16, 16, 3)
    with torch.no_grad():
        want = model.decode(model.encode(x))  # (2, 5, 16, 16, 3)
        enc, dec = common.KVCache(model.encoder.window), common.KVCache(model.decoder.window)
        got = torch.cat([model.decode(model.encode(x[:, t:t + 1], cache=enc), cache=dec)
                         for t in range(5)], 1)  # (2, 5, 16, 16, 3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_patches_cannot_see_latents_in_encoder():
    """Patch tokens see only patches, so the latent tokens cannot change their outputs."""
    model = tiny().eval()
    x = model.patch_embed(tk.patchify(blocky_frames(1, 2).float() / 255 * 2 - 1, 4))
    lat = model.latent_tokens.expand(1, 2, -1, -1)
    h = model.encoder(torch.cat([x, lat], 2), model.pos, model.enc_mask)
    h2 = model.encoder(torch.cat([x, lat + 1], 2), model.pos, model.enc_mask)
    torch.testing.assert_close(h[:, :, :16], h2[:, :, :16], atol=0, rtol=0)
    assert not torch.allclose(h[:, :, 16:], h2[:, :, 16:])


@pytest.fixture(scope="module")
def drop_share():
    gen = torch.Generator().manual_seed(0)
    return tk.sample_mae_mask(400, 8, 64, 0.9, gen).float().mean(-1)  # (B, T) share per image


def test_mae_mask_drops_045_of_patches_on_average(drop_share):
    assert abs(float(drop_share.mean()) - 0.45) < 0.01  # E[p] = 0.9 / 2


def test_mae_mask_drop_probability_ranges_over_0_to_09(drop_share):
    assert float(drop_share.min()) < 0.05 and 0.8 < float(drop_share.max()) < 1.0


def test_mae_mask_draws_one_probability_per_image(drop_share):
    # One shared p per image: the spread across images is far wider than a binomial's (≈ 0.06).
    assert float(drop_share.std()) > 0.2


def test_mae_mask_replaces_patches_with_learned_embedding():
    model = tiny().eval()
    x = blocky_frames(1, 1)
    all_masked = torch.ones(1, 1, 16, dtype=torch.bool)
    # Content is invisible when every patch is dropped.
    torch.testing.assert_close(model.encode(x, all_masked), model.encode(255 - x, all_masked))


# ---------------------------------------------------------------- Eq 5 loss (exercise)

def norms(ms_mse=None, ms_lpips=None, decay=0.99):
    """Fresh running-RMS normalisers, or ones that have already seen a step (ms given)."""
    out = {"mse": common.RunningRMS(), "lpips": common.RunningRMS()}
    for key, ms in (("mse", ms_mse), ("lpips", ms_lpips)):
        if ms is not None:
            out[key].load_state_dict({"ms": ms, "count": 1, "decay": decay, "floor": 1e-6})
    return out


def rms_after(ms, x, decay=0.99):
    """The running RMS after one more update with x: √(decay·ms + (1 − decay)·x²)."""
    return math.sqrt(decay * ms + (1 - decay) * x * x)


class FakeLPIPS(nn.Module):
    """Stands in for lpips.LPIPS: the mean |x − y| per image, for images (N, 3, H, W) in [−1, 1].

    Like lpips it accepts normalize=True for images in [0, 1]. It records the images it saw.
    """

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, y, normalize=False):
        if normalize:
            x, y = x * 2 - 1, y * 2 - 1
        self.seen.append(tuple(x.shape))
        return (x - y).abs().mean(dim=(1, 2, 3), keepdim=True)  # (N, 1, 1, 1)


def error_in_one_patch():
    torch.manual_seed(0)
    target = torch.rand(2, 3, 16, 16, 3)
    recon = target.clone()
    recon[0, 0, :4, :4] += 0.5  # an error in one patch of one frame only
    return recon, target


def test_eq5_first_step_loss_is_one():
    recon, target = error_in_one_patch()
    out = tk.tokenizer_loss(recon, target, None, norms())
    assert float(out["loss"]) == pytest.approx(1.0, rel=1e-5), (
        "on the first step each term is divided by its own running RMS, which is then the term "
        f"itself: L_MSE / RMS(L_MSE) = 1; got {float(out['loss']):.6f}")


def test_eq5_mse_is_the_mean_over_all_pixels_of_all_patches():
    recon, target = error_in_one_patch()
    slow = sum(float((recon[b, t] - target[b, t]).pow(2).sum())
               for b in range(2) for t in range(3)) / target.numel()
    out = tk.tokenizer_loss(recon, target, None, norms(ms_mse=1.0))
    want = slow / rms_after(1.0, slow)
    assert float(out["loss"]) == pytest.approx(want, rel=1e-5), (
        f"expected L_MSE / RMS = {want:.6g} with L_MSE = {slow:.6g}, the mean squared error over "
        f"every pixel of every patch of every frame (masked or not); got {float(out['loss']):.6g}")


def test_eq5_divides_by_a_running_estimate_of_the_rms():
    recon, target = error_in_one_patch()
    n = norms()
    first = float((recon - target).pow(2).mean())
    tk.tokenizer_loss(recon, target, None, n)
    recon2 = recon.clone()
    recon2[1, 2, 8:, 8:] -= 0.3  # a second, larger error
    second = float((recon2 - target).pow(2).mean())
    out = tk.tokenizer_loss(recon2, target, None, n)
    want = second / math.sqrt(0.99 * first ** 2 + 0.01 * second ** 2)
    assert float(out["loss"]) == pytest.approx(want, rel=1e-5), (
        f"step 2: expected L_MSE / √(0.99·L₁² + 0.01·L₂²) = {want:.6g} (update the normaliser "
        f"with this step's term, then divide), got {float(out['loss']):.6g}")


def test_eq5_rms_is_a_constant_for_the_gradient():
    # First step: RMS = L_MSE itself; as a constant it still passes the MSE gradient through
    # (differentiating through it would make L ≡ 1 and the gradient 0).
    recon, target = error_in_one_patch()
    mse = float((recon - target).pow(2).mean())
    want = 2 * (recon - target) / target.numel() / mse
    recon.requires_grad_()
    tk.tokenizer_loss(recon, target, None, norms())["loss"].backward()
    assert recon.grad is not None, "the loss does not depend on recon"
    ratio = float((recon.grad * want).sum() / want.pow(2).sum())  # 1 if the gradients agree
    assert torch.allclose(recon.grad, want, rtol=1e-4, atol=1e-9), (
        "the running RMS is a constant (no gradient through the normaliser): expected "
        f"∂L/∂recon = 2·(recon − target) / (#pixels · RMS); got {ratio:.4f} × that")


def test_eq5_adds_lpips_weighted_02_each_term_over_its_own_rms():
    recon, target = error_in_one_patch()
    mse = float((recon - target).pow(2).mean())
    lp = float(2 * (recon - target).abs().mean())  # FakeLPIPS on images in [−1, 1]
    # Normalisers that have seen one earlier step of a similar size; decay 0.5: this step counts.
    ms_mse, ms_lp = (mse / 2) ** 2, (lp / 2) ** 2
    n = norms(ms_mse=ms_mse, ms_lpips=ms_lp, decay=0.5)
    out = tk.tokenizer_loss(recon, target, FakeLPIPS(), n, 0.2)
    want = mse / rms_after(ms_mse, mse, 0.5) + 0.2 * lp / rms_after(ms_lp, lp, 0.5)
    assert float(out["loss"]) == pytest.approx(want, rel=1e-5), (
        f"expected L_MSE/RMS(L_MSE) + 0.2·L_LPIPS/RMS(L_LPIPS) = {want:.6g}, got "
        f"{float(out['loss']):.6g}. Check: the weight 0.2 multiplies the normalised LPIPS term; "
        "LPIPS compares images in [−1, 1] (x·2 − 1, or lpips' normalize=True for [0, 1]); "
        "LPIPS is averaged over all frames")


def test_eq5_lpips_compares_every_frame_as_a_channels_first_image():
    recon, target = error_in_one_patch()
    fake = FakeLPIPS()
    tk.tokenizer_loss(recon, target, fake, norms())
    assert fake.seen, "LPIPS was not called although an LPIPS module was given"
    shapes = {s[1:] for s in fake.seen}
    assert shapes == {(3, 16, 16)}, (
        f"LPIPS takes images (N, 3, H, W), channels first; it saw {sorted(shapes)}")
    n_images = sum(s[0] for s in fake.seen)
    assert n_images == 2 * 3, f"LPIPS should see all B·T = 6 frames, saw {n_images}"


def test_eq5_with_the_lpips_package_and_a_random_backbone():
    fn = tk.make_lpips("alex", "cpu", pretrained_backbone=False)  # no download: random backbone
    assert fn is not None
    target = torch.rand(2, 2, 32, 32, 3)
    recon = (target + 0.2 * torch.randn_like(target)).clamp(0, 1).requires_grad_()
    out = tk.tokenizer_loss(recon, target, fn, norms(), lpips_weight=0.2)
    assert out["loss"].item() == pytest.approx(1.0 + 0.2 * 1.0, rel=1e-4), (
        "first step: each term ÷ its own RMS is 1, so L = 1 + 0.2·1")
    out["loss"].backward()
    assert recon.grad is not None and recon.grad.abs().sum() > 0


def test_loss_reports_the_raw_terms_for_logging():
    recon, target = error_in_one_patch()
    out = tk.tokenizer_loss(recon, target, FakeLPIPS(), norms(ms_mse=1.0, ms_lpips=4.0))
    assert float(out["mse"]) == pytest.approx(float((recon - target).pow(2).mean()), rel=1e-6)
    assert float(out["lpips"]) == pytest.approx(float(2 * (recon - target).abs().mean()), rel=1e-6)


def test_loss_without_lpips_reports_no_lpips_term():
    recon, target = error_in_one_patch()
    assert "lpips" not in tk.tokenizer_loss(recon, target, None, norms())  # offline fallback


def test_lpips_offline_fallback_warns_and_returns_none(monkeypatch, capsys):
    import lpips

    def offline(*args, **kwargs):
        raise OSError("Name or service not known")
    monkeypatch.setattr(lpips, "LPIPS", offline)
    assert tk.make_lpips("vgg", "cpu") is None
    assert "LPIPS (vgg) is unavailable" in capsys.readouterr().out


# ---------------------------------------------------------------- metrics

def noisy_pair():
    torch.manual_seed(0)
    x = torch.rand(4, 16, 16, 3)
    return x, (x + 0.05 * torch.randn_like(x)).clamp(0, 1)


def test_psnr_matches_formula():
    x, y = noisy_pair()
    mse = (x - y).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(tk.psnr(y, x), 10 * torch.log10(1 / mse))


def test_ssim_of_an_image_with_itself_is_one():
    x, _ = noisy_pair()
    torch.testing.assert_close(tk.ssim(x, x), torch.ones(4), atol=1e-5, rtol=0)


def test_ssim_ranks_small_noise_above_unrelated_images():
    x, y = noisy_pair()
    assert (tk.ssim(y, x) < 1).all() and (tk.ssim(y, x) > tk.ssim(torch.rand_like(x), x)).all()


def test_psnr_of_mean_mse_is_fair_to_exact_copies():
    # Two windows × 1 horizon: one frame copied exactly (per-frame PSNR clamps to 100 dB), one with
    # MSE 0.01 (20 dB). The mean of per-frame PSNRs says 60 dB; the PSNR of the mean MSE says
    # 10·log10(1/0.005).
    y = torch.zeros(2, 1, 4, 4, 3)
    x = y.clone()
    x[1] += 0.1  # squared error 0.01 on every pixel of window 1
    assert abs(float(tk.psnr(x, y).mean()) - 60.0) < 1e-3
    want = torch.tensor([10 * math.log10(1 / 0.005)])
    torch.testing.assert_close(tk.psnr_of_mean_mse(x, y), want)


# ---------------------------------------------------------------- learning, latent cache

def test_overfits_one_batch():
    model = tiny(depth=4, width=64, heads=4, n_latents=8, latent_dim=8)
    x = blocky_frames(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    n = norms()
    for _ in range(250):
        out = tk.tokenizer_loss(model(x), x.float() / 255, None, n)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    with torch.no_grad():
        p = float(tk.psnr(model(x), x.float() / 255).mean())
    assert p > 30, f"PSNR after overfitting one batch: {p:.1f} dB"


@pytest.fixture(scope="module")
def long_episode():
    model = tiny(depth=8, window=3).eval()  # 2 time layers: frame t depends on frames t−4 … t
    frames = blocky_frames(1, 11)[0].numpy()  # (T, H, W, 3)
    return model, frames, tk.encode_episode(model, frames, "cpu", chunk=4)  # chunked, KV cache


def test_chunked_episode_encoding_equals_one_pass(long_episode):
    model, frames, chunked = long_episode
    with torch.no_grad():
        direct = model.encode(torch.from_numpy(frames)[None])[0].numpy()
    np.testing.assert_allclose(chunked, direct, atol=1e-5, rtol=1e-4)


def test_episode_encoding_equals_the_training_window_ending_at_each_frame(long_episode):
    model, frames, chunked = long_episode
    seq_len = 5  # = 2·(window − 1) + 1, the receptive field
    with torch.no_grad():
        for t in range(seq_len - 1, 11):
            window = torch.from_numpy(frames[t - seq_len + 1:t + 1])[None]
            np.testing.assert_allclose(chunked[t], model.encode(window)[0, -1].numpy(),
                                       atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- pipeline: smoke run, resume

@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tok")
    data_dir = str(tmp / "data")
    run("data.py", "--preset", "smoke", "--out", data_dir)
    out = str(tmp / "full")
    run("tokenizer.py", "--preset", "smoke", "--data", data_dir, "--out", out,
        "--lpips-weight", "0")
    return tmp, data_dir, out


def test_smoke_run_writes_its_outputs(smoke_run):
    tmp, data_dir, out = smoke_run
    for f in ("ckpt.pt", "args.json", "metrics.jsonl", "summary.json", "recon.png", "curves.png",
              "latents/index.json"):
        assert os.path.exists(os.path.join(out, f)), f


def test_smoke_run_summary_records_the_run(smoke_run):
    tmp, data_dir, out = smoke_run
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["stage"] == "tokenizer" and summary["steps"] == 6
    assert summary["lpips_used"] is False  # --lpips-weight 0
    assert 0 < summary["heldout_psnr_db"] < 100 and 0 < summary["heldout_ssim"] <= 1


def test_latent_cache_equals_encoding_the_episodes_directly(smoke_run):
    tmp, data_dir, out = smoke_run
    model, _ = tk.load_tokenizer(os.path.join(out, "ckpt.pt"))
    cache = tk.LatentCache(out, "heldout", seed=0)
    ep = cache.episodes[0]
    frames = np.array(data.mapped_frames(data_dir, ep["id"]))  # a writable copy of the memory map
    with torch.no_grad():
        direct = model.encode(torch.from_numpy(frames)[None])[0].numpy()
    cached = cache.latents[ep["offset"]:ep["offset"] + ep["length"]]
    np.testing.assert_allclose(cached, direct, atol=1e-5, rtol=1e-4)


def test_latent_cache_samples_windows_with_frames(smoke_run):
    tmp, data_dir, out = smoke_run
    batch = tk.LatentCache(out, "heldout", seed=0).sample(3, 4, with_frames=True)
    assert batch["latents"].shape == (3, 4, 8, 4) and batch["frames"].shape[:2] == (3, 4)
    if batch["actions"] is not None:
        assert batch["actions"].dtype == torch.int64 and batch["actions"].shape[:2] == (3, 4)


def test_latent_cache_frames_do_not_keep_files_open(smoke_run):
    # Many windows with frames must not hold one open memory map per window (it once ran out of
    # file handles at ~1,000 windows): with a limit of 48 open files, 300 windows still load.
    tmp, data_dir, out = smoke_run
    cache = tk.LatentCache(out, "heldout", seed=0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(48, hard), hard))
    try:
        assert cache.sample(300, 2, with_frames=True)["frames"].shape[:2] == (300, 2)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_resume_gives_the_same_result_as_an_uninterrupted_run(smoke_run):
    tmp, data_dir, full = smoke_run
    part = str(tmp / "part")
    args = ["tokenizer.py", "--preset", "smoke", "--data", data_dir, "--out", part,
            "--lpips-weight", "0"]
    run(*args, "--stop-at", "3")
    run(*args, "--resume")
    a = torch.load(os.path.join(full, "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(part, "ckpt.pt"), weights_only=True)
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-6, rtol=1e-5)


def test_reevaluation_reproduces_the_summary_and_redraws_the_pictures(smoke_run, tmp_path):
    tmp, data_dir, out = smoke_run
    again = tmp_path / "again"
    again.mkdir()
    for f in ("ckpt.pt", "metrics.jsonl", "summary.json"):
        shutil.copy(os.path.join(out, f), again / f)
    run("tokenizer_eval.py", str(again), "--device", "cpu")
    before = json.load(open(os.path.join(out, "summary.json")))
    after = json.load(open(again / "summary.json"))
    for key in ("heldout_psnr_db", "heldout_ssim"):
        assert after[key] == pytest.approx(before[key], rel=1e-5), key
    assert after.keys() == before.keys()  # the other keys are kept as they were
    assert (again / "recon.png").exists() and (again / "curves.png").exists()


def test_dataset_of_the_wrong_size_gives_a_clear_error(smoke_run, tmp_path):
    tmp, data_dir, out = smoke_run
    r = subprocess.run([sys.executable, "tokenizer.py", "--preset", "smoke", "--data", data_dir,
                        "--image-size", "64", "--out", str(tmp_path / "x")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "expects 64×64" in r.stderr


def test_corrupt_checkpoint_for_resume_gives_a_clear_error(smoke_run, tmp_path):
    tmp, data_dir, out = smoke_run
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ckpt.pt").write_bytes(b"not a checkpoint")
    r = subprocess.run([sys.executable, "tokenizer.py", "--preset", "smoke", "--data", data_dir,
                        "--out", str(bad), "--resume"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "not a readable checkpoint" in r.stderr


def test_missing_latent_cache_names_the_command_that_builds_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.py --encode"):
        tk.LatentCache(str(tmp_path / "nowhere"))


def test_missing_checkpoint_names_the_command_with_its_preset(monkeypatch, tmp_path):
    # A stage that needs runs/smoke/tokenizer/ckpt.pt says to run the smoke preset.
    smoke_out = str(tmp_path / "smoke" / "tokenizer")
    monkeypatch.setitem(tk.PRESETS, "smoke", dict(tk.PRESETS["smoke"], out=smoke_out))
    with pytest.raises(FileNotFoundError, match="run `python tokenizer.py --preset smoke` first"):
        tk.load_tokenizer(os.path.join(smoke_out, "ckpt.pt"))  # the preset's own --out: implied


def test_encode_another_dataset(smoke_run, tmp_path):
    # `--encode --encode-data DIR` encodes a different dataset (e.g. a larger one).
    tmp, data_dir, out = smoke_run
    other = str(tmp_path / "other")
    run("data.py", "--preset", "smoke", "--episodes", "4", "--seed", "1", "--out", other)
    enc = tmp_path / "enc"
    enc.mkdir()
    shutil.copy(os.path.join(out, "ckpt.pt"), enc / "ckpt.pt")
    run("tokenizer.py", "--preset", "smoke", "--out", str(enc), "--encode", "--encode-data", other)
    index = json.load(open(enc / "latents" / "index.json"))
    assert index["data"] == os.path.abspath(other)
    assert sum(ep["length"] for s in index["splits"].values() for ep in s) == 4 * 64


def test_change_weights_against_a_hand_written_table():
    # Three frames of 2×2 pixels: pixel (0, 1) changes in one channel from frame 0 to 1,
    # pixel (1, 0) from frame 1 to 2.
    target = torch.zeros(1, 3, 2, 2, 3)
    target[0, 1:, 0, 1, 2] = 0.5
    target[0, 2, 1, 0, 0] = 0.5
    w = tk.change_weights(target, 9.0)[0, ..., 0]  # (T, H, W)
    want = torch.tensor([[[1.0, 1.0], [1.0, 1.0]],     # frame 0: no frame before it
                         [[1.0, 10.0], [1.0, 1.0]],    # frame 1: (0, 1) differs from frame 0
                         [[1.0, 1.0], [10.0, 1.0]]])   # frame 2: only (1, 0) differs
    assert torch.equal(w, want), f"expected the weights\n{want}\ngot\n{w}"


def test_change_weight_is_a_weighted_mean_of_the_squared_errors():
    recon, target = error_in_one_patch()
    target[:, 1:, :2, :2] = 0.0  # frames 1, 2 differ from the frame before outside this corner
    w = tk.change_weights(target, 4.0).expand_as(target)
    slow = float(sum((w[i] * (recon[i] - target[i]) ** 2).sum() for i in range(2)) / w.sum())
    out = tk.tokenizer_loss(recon, target, None, norms(ms_mse=1.0), change_weight=4.0)
    want = slow / rms_after(1.0, slow)
    assert float(out["loss"]) == pytest.approx(want, rel=1e-5), (
        f"expected Σ w·(recon − target)² / Σ w = {slow:.6g}, divided by its running RMS, "
        f"= {want:.6g}; got {float(out['loss']):.6g}")
