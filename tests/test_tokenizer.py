"""Tests of the causal tokenizer (tokenizer.py, §3.1, Eq 5), STYLE.md tiers 1-4."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import tokenizer as tk
from conftest import ROOT, run

torch.set_num_threads(2)


def tiny(**kw):
    torch.manual_seed(0)
    cfg = dict(image_size=16, patch=4, width=32, depth=4, heads=2, n_latents=4, latent_dim=4, window=2)
    cfg.update(kw)
    return tk.Tokenizer(**cfg)


def blocky_frames(B, T, size=16, tile=4, seed=0):
    """Frames made of flat-coloured tiles, like the built-in environment: (B, T, H, W, 3) uint8."""
    g = np.random.default_rng(seed)
    palette = g.integers(0, 256, (6, 3))
    idx = g.integers(0, 6, (B, T, size // tile, size // tile))
    img = palette[idx].repeat(tile, 2).repeat(tile, 3)  # (B, T, H, W, 3)
    return torch.from_numpy(img.astype(np.uint8))


# ---------------------------------------------------------------- masks, patches, packing

def test_encoder_mask_matches_hand_written_table():
    # 3 patches (P) then 2 latents (L). Rows: queries. Patches see patches; latents see everything.
    expected = torch.tensor([
        # P  P  P  L  L
        [1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(tk.encoder_mask(3, 2), expected)


def test_decoder_mask_matches_hand_written_table():
    # 3 read-outs (R) then 2 latents (L). Read-outs see read-outs and latents; latents only latents.
    expected = torch.tensor([
        # R  R  R  L  L
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1],
        [0, 0, 0, 1, 1],
        [0, 0, 0, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(tk.decoder_mask(3, 2), expected)


def test_latent_grid_matches_hand_written_table():
    # 16 latents on a 4×4 patch grid: one per patch, at the patch itself.
    want16 = torch.tensor([[r, c] for r in range(4) for c in range(4)], dtype=torch.float)
    assert torch.equal(tk.latent_grid(16, 4), want16)
    # 32 latents on an 8×8 grid: a 4×8 lattice, rows at the centres of 2-patch-high cells.
    want32 = torch.tensor([[r, c] for r in (0.5, 2.5, 4.5, 6.5) for c in range(8)], dtype=torch.float)
    assert torch.equal(tk.latent_grid(32, 8), want32)


def test_locality_init_makes_latents_read_their_own_patch():
    # Tokenizer.locality_init: in the first encoder layer every latent attends most to the patch at
    # its own grid position, whatever the image; without it the choice is arbitrary.
    def first_layer_argmax(model, frames):
        x = model.patch_embed(tk.patchify(frames * 2 - 1, model.patch))[:, 0]  # (B, N_p, D)
        tokens = torch.cat([x, model.latent_tokens.expand(len(x), -1, -1)], 1)  # (B, N_p + N_b, D)
        att = model.encoder.blocks[0].attn
        h = model.encoder.blocks[0].norm1(tokens)
        B, S, D = h.shape
        q = att.q_norm(att.wq(h).view(B, S, att.n_heads, -1))  # (B, S, H, Dh)
        k = att.k_norm(att.wkv(h).view(B, S, 2, att.n_kv_heads, -1)[:, :, 0])  # (B, S, Hk, Dh)
        ang = common.rope_angles_2d(model.pos[:, 0], model.pos[:, 1], att.head_dim, model.encoder.space_rope_base)
        q = common.apply_rope(q.transpose(1, 2), ang)  # (B, H, S, Dh)
        k = common.apply_rope(k.transpose(1, 2), ang)  # (B, Hk, S, Dh)
        logits = (q[:, :1] @ k[:, :1].transpose(-1, -2))[:, 0]  # (B, S, S) head 0
        return logits[:, model.n_patches:, :model.n_patches].argmax(-1)  # (B, N_b) patch each latent reads most
    torch.manual_seed(0)
    frames = torch.rand(8, 1, 32, 32, 3)
    local = tk.Tokenizer(32, 8, 64, 4, 2, 16, 8, 2, locality_init=True)
    own = torch.arange(16).expand(8, -1)
    assert (first_layer_argmax(local, frames) == own).float().mean() > 0.75
    plain = tk.Tokenizer(32, 8, 64, 4, 2, 16, 8, 2, locality_init=False)
    assert (first_layer_argmax(plain, frames) == own).float().mean() < 0.3


def test_patchify_roundtrip_and_order():
    x = torch.arange(2 * 3 * 8 * 8 * 3).reshape(2, 3, 8, 8, 3).float()
    p = tk.patchify(x, 4)
    assert p.shape == (2, 3, 4, 48)
    torch.testing.assert_close(p[0, 0, 1].view(4, 4, 3), x[0, 0, :4, 4:8])  # patch 1 = top row, 2nd column
    torch.testing.assert_close(tk.unpatchify(p, 4, 8, 8), x)


def test_packing_roundtrip():
    z = torch.randn(2, 5, 8, 3)
    packed = tk.pack(z)
    assert packed.shape == (2, 5, 4, 6)
    torch.testing.assert_close(packed[0, 0, 1], torch.cat([z[0, 0, 2], z[0, 0, 3]]))  # tokens 2,3 → token 1
    torch.testing.assert_close(tk.unpack(packed), z)


# ---------------------------------------------------------------- model properties

def test_encoder_is_causal_in_time_and_bottleneck_in_range():
    model = tiny().eval()
    x = blocky_frames(2, 4)
    z = model.encode(x)
    assert z.shape == (2, 4, 4, 4) and z.abs().max() < 1  # tanh bottleneck: (−1, 1)
    x2 = x.clone()
    x2[:, 2] = 255 - x2[:, 2]  # change frame 2
    z2 = model.encode(x2)
    torch.testing.assert_close(z[:, :2], z2[:, :2], atol=0, rtol=0)  # latents ≤ 1 unchanged
    assert not torch.allclose(z[:, 2], z2[:, 2])
    # The decoder is causal too.
    y, y2 = model.decode(z), model.decode(z2)
    torch.testing.assert_close(y[:, :2], y2[:, :2], atol=0, rtol=0)


def test_patches_cannot_see_latents_in_encoder():
    """Patch tokens see only patches, so the latent-token parameters cannot change their outputs."""
    model = tiny().eval()
    x = model.patch_embed(tk.patchify(blocky_frames(1, 2).float() / 255 * 2 - 1, 4))
    lat = model.latent_tokens.expand(1, 2, -1, -1)
    h = model.encoder(torch.cat([x, lat], 2), model.pos, model.enc_mask)
    h2 = model.encoder(torch.cat([x, lat + 1], 2), model.pos, model.enc_mask)
    torch.testing.assert_close(h[:, :, :16], h2[:, :, :16], atol=0, rtol=0)
    assert not torch.allclose(h[:, :, 16:], h2[:, :, 16:])


def test_mae_mask_statistics():
    gen = torch.Generator().manual_seed(0)
    m = tk.sample_mae_mask(400, 8, 64, 0.9, gen)  # (B, T, N_p)
    share = m.float().mean(-1)  # per-image drop share ≈ its p
    assert abs(float(share.mean()) - 0.45) < 0.01  # E[p] = 0.9 / 2
    assert float(share.min()) < 0.05 and float(share.max()) > 0.8  # p varies per image over (0, 0.9)
    assert float(share.max()) < 1.0
    # Within one image the drops are independent with one shared p: variance across images ≫ binomial.
    assert float(share.std()) > 0.2


def test_mae_mask_replaces_patches_with_learned_embedding():
    model = tiny().eval()
    x = blocky_frames(1, 1)
    all_masked = torch.ones(1, 1, 16, dtype=torch.bool)
    z1 = model.encode(x, all_masked)
    z2 = model.encode(255 - x, all_masked)  # content is invisible when every patch is dropped
    torch.testing.assert_close(z1, z2)


# ---------------------------------------------------------------- loss (Eq 5)

def test_loss_covers_all_patches_and_is_rms_normalised():
    target = torch.rand(2, 3, 16, 16, 3)
    recon = target.clone()
    recon[0, 0, :4, :4] += 0.5  # an error in one patch only
    norms = {"mse": common.RunningRMS(), "lpips": common.RunningRMS()}
    out = tk.tokenizer_loss(recon, target, None, norms)
    slow = sum(float((recon[b, t] - target[b, t]).pow(2).sum()) for b in range(2) for t in range(3)) / target.numel()
    assert float(out["mse"]) == pytest.approx(slow, rel=1e-5)  # the mean over ALL pixels of all patches
    assert float(out["loss"]) == pytest.approx(1.0, rel=1e-5)  # first step: loss / RMS(loss) = 1
    assert "lpips" not in out  # MSE only without LPIPS (the offline fallback)


def test_lpips_path_with_random_backbone():
    fn = tk.make_lpips("alex", "cpu", pretrained_backbone=False)  # no download: random backbone
    assert fn is not None
    target = torch.rand(2, 2, 32, 32, 3)
    recon = (target + 0.2 * torch.randn_like(target)).clamp(0, 1).requires_grad_()
    norms = {"mse": common.RunningRMS(), "lpips": common.RunningRMS()}
    out = tk.tokenizer_loss(recon, target, fn, norms, lpips_weight=0.2)
    assert float(out["lpips"]) > 0
    assert out["loss"].item() == pytest.approx(1.0 + 0.2 * 1.0, rel=1e-4)  # each term ÷ its own RMS
    out["loss"].backward()
    assert recon.grad is not None and recon.grad.abs().sum() > 0
    same = tk.tokenizer_loss(target, target, fn, {"mse": common.RunningRMS(), "lpips": common.RunningRMS()})
    assert float(same["lpips"]) < 1e-6


def test_lpips_offline_fallback_warns_and_returns_none(monkeypatch, capsys):
    import lpips

    def offline(*args, **kwargs):
        raise OSError("Name or service not known")
    monkeypatch.setattr(lpips, "LPIPS", offline)
    assert tk.make_lpips("vgg", "cpu") is None
    assert "LPIPS (vgg) is unavailable" in capsys.readouterr().out


def test_psnr_and_ssim_against_formulas():
    x = torch.rand(4, 16, 16, 3)
    y = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    mse = (x - y).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(tk.psnr(y, x), 10 * torch.log10(1 / mse))
    assert torch.allclose(tk.ssim(x, x), torch.ones(4), atol=1e-5)
    assert (tk.ssim(y, x) < 1).all() and (tk.ssim(y, x) > tk.ssim(torch.rand_like(x), x)).all()


def test_psnr_of_mean_mse_is_fair_to_exact_copies():
    # Two windows × 1 horizon: one frame copied exactly (per-frame PSNR clamps to 100 dB), one with
    # MSE 0.01 (20 dB). The per-frame mean says 60 dB; the PSNR of the mean MSE says 10·log10(1/0.005).
    y = torch.zeros(2, 1, 4, 4, 3)
    x = y.clone()
    x[1] += 0.1  # squared error 0.01 on every pixel of window 1
    assert abs(float(tk.psnr(x, y).mean()) - 60.0) < 1e-3
    torch.testing.assert_close(tk.psnr_of_mean_mse(x, y), torch.tensor([10 * math.log10(1 / 0.005)]))


# ---------------------------------------------------------------- learning

def test_overfits_one_batch():
    model = tiny(depth=4, width=64, heads=4, n_latents=8, latent_dim=8)
    x = blocky_frames(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    norms = {"mse": common.RunningRMS(), "lpips": common.RunningRMS()}
    for _ in range(250):
        out = tk.tokenizer_loss(model(x), x.float() / 255, None, norms)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    with torch.no_grad():
        p = float(tk.psnr(model(x), x.float() / 255).mean())
    assert p > 30, f"PSNR after overfitting one batch: {p:.1f} dB"


def test_long_episode_encoding_equals_training_windows():
    """One pass over a long episode == encoding the training-length window that ends at each frame."""
    model = tiny(depth=8, window=3).eval()  # 2 time layers: frame t depends on frames t−4 … t
    frames = blocky_frames(1, 11)[0].numpy()  # (T, H, W, 3)
    full = tk.encode_episode(model, frames, "cpu", chunk=4)  # chunked with the KV cache
    seq_len = 5  # = 2·(window − 1) + 1, the receptive field
    with torch.no_grad():
        for t in range(seq_len - 1, 11):
            win = model.encode(torch.from_numpy(frames[t - seq_len + 1:t + 1])[None])[0, -1]
            np.testing.assert_allclose(full[t], win.numpy(), atol=1e-5, rtol=1e-4)
        direct = model.encode(torch.from_numpy(frames)[None])[0].numpy()
    np.testing.assert_allclose(full, direct, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- pipeline: smoke run, cache, resume


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tok")
    data_dir = str(tmp / "data")
    run("data.py", "--preset", "smoke", "--out", data_dir)
    out = str(tmp / "full")
    run("tokenizer.py", "--preset", "smoke", "--data", data_dir, "--out", out, "--lpips-weight", "0")
    return tmp, data_dir, out


def test_smoke_run_writes_outputs_and_latent_cache(smoke_run):
    tmp, data_dir, out = smoke_run
    for f in ("ckpt.pt", "args.json", "metrics.jsonl", "summary.json", "recon.png", "curves.png"):
        assert os.path.exists(os.path.join(out, f)), f
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["stage"] == "tokenizer" and summary["lpips_used"] is False and summary["steps"] == 6
    # The latent cache equals encoding the episodes directly with the saved model.
    model, ckpt = tk.load_tokenizer(os.path.join(out, "ckpt.pt"))
    cache = tk.LatentCache(out, "heldout", seed=0)
    ep = cache.episodes[0]
    import data
    frames = np.array(data.mapped_frames(data_dir, ep["id"]))  # a writable copy of the memory map
    with torch.no_grad():
        direct = model.encode(torch.from_numpy(frames)[None])[0].numpy()
    np.testing.assert_allclose(cache.latents[ep["offset"]:ep["offset"] + ep["length"]], direct, atol=1e-5, rtol=1e-4)
    batch = cache.sample(3, 4, with_frames=True)
    assert batch["latents"].shape == (3, 4, 8, 4) and batch["frames"].shape[:2] == (3, 4)
    if batch["actions"] is not None:
        assert batch["actions"].dtype == torch.int64 and batch["actions"].shape[:2] == (3, 4)
    # Many windows with frames must not hold one open memory map per window (it once ran out of
    # file handles at ~1,000 windows): with a limit of 48 open files, 300 windows still load.
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(48, hard), hard))
    try:
        assert cache.sample(300, 2, with_frames=True)["frames"].shape[:2] == (300, 2)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_resume_gives_the_same_result_as_an_uninterrupted_run(smoke_run):
    tmp, data_dir, full = smoke_run
    part = str(tmp / "part")
    common_args = ["tokenizer.py", "--preset", "smoke", "--data", data_dir, "--out", part, "--lpips-weight", "0"]
    run(*common_args, "--stop-at", "3")
    run(*common_args, "--resume")
    a = torch.load(os.path.join(full, "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(part, "ckpt.pt"), weights_only=True)
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-6, rtol=1e-5)


def test_bad_inputs_give_clear_errors(smoke_run, tmp_path):
    tmp, data_dir, out = smoke_run
    # A dataset whose image size does not match the preset.
    r = subprocess.run([sys.executable, "tokenizer.py", "--preset", "smoke", "--data", data_dir, "--image-size", "64",
                        "--out", str(tmp_path / "x")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "expects 64×64" in r.stderr
    # A corrupt checkpoint for --resume.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ckpt.pt").write_bytes(b"not a checkpoint")
    r = subprocess.run([sys.executable, "tokenizer.py", "--preset", "smoke", "--data", data_dir, "--out", str(bad),
                        "--resume"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "not a readable checkpoint" in r.stderr
    # A missing latent cache.
    with pytest.raises(FileNotFoundError, match="tokenizer.py --encode"):
        tk.LatentCache(str(tmp_path / "nowhere"))


def test_encode_another_dataset(smoke_run, tmp_path):
    # `--encode --encode-data DIR` encodes a different dataset (e.g. a larger one) with a trained tokenizer.
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
