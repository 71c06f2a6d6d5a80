"""Stage 1a — the causal tokenizer (Dreamer 4 §3.1, Eq 5; Appendix A).

The tokenizer compresses every video frame into a few continuous latent tokens, so the dynamics
model (dynamics.py) can predict the future in a small space. It is a masked autoencoder built from
the §3.4 space/time transformer (common.py), causal in time:

    frame ──patchify──▶ patch tokens ─┐                       ┌─▶ read-out tokens ──▶ pixels
                                      ├─ encoder ─▶ tanh bottleneck z (N_b × D_b) ─ decoder ┤
          learned latent tokens ──────┘                       └─▶ latents (see only latents)

Reads:  the dataset (data.py; generated if missing).
Writes: runs/tokenizer/  ckpt.pt, args.json, metrics.jsonl, summary.json, recon.png, curves.png,
        and latents/ — the whole dataset encoded once (the "latent cache"), so the dynamics stage
        never runs the encoder in its training loop.

Run:
    python tokenizer.py                    # default preset: 64×64 frames, one GPU
    python tokenizer.py --preset cpu       # 32×32 frames, 2 CPU cores, ≈ 16 min (README)
    python tokenizer.py --preset smoke     # seconds; used by the tests
    python tokenizer.py --encode           # only (re)build the latent cache from ckpt.pt
    python tokenizer.py --encode --encode-data data/NAME   # encode another dataset of the same frame size

Equation map:
    Eq 5   L = L_MSE + 0.2·L_LPIPS, each term ÷ running RMS  -> tokenizer_loss
    §3.1   MAE: p ~ U(0, 0.9) per image, learned mask token    -> sample_mae_mask, Tokenizer.encode
    §3.1   encoder / decoder attention masks                  -> encoder_mask, decoder_mask
    §3.1   bottleneck: linear → tanh                          -> Tokenizer.encode
    App A  packing N_b × D_b → N_b/2 × 2·D_b for the dynamics -> pack, unpack

Deviations and ambiguities (PAPER.md §2, §12):
  - The reconstruction loss covers ALL patches, masked or not (the paper does not restrict it;
    DESIGN.md §5). Restricting it to masked patches is a known way to get a blurry tokenizer
    (PITFALLS.md 7).
  - LPIPS backbone: VGG, the lpips authors' advice for use as an optimisation loss ("closer to a
    traditional perceptual loss"); AlexNet is their recommendation as an evaluation metric.
    The paper does not say which. Without internet the backbone weights cannot be downloaded:
    we warn, train with MSE only and record `lpips_used: false` (DESIGN.md §5).
  - Time attention: every token slot attends to the same slot in the previous C_tok − 1 frames
    (window C_tok = `--window`, default 4). The paper does not say which tokens take part.
    The window makes a frame's latents independent of frames more than
    n_time_layers·(C_tok − 1) steps back, so encoding a whole episode in one pass gives exactly
    the latents a training-length window gives (tested) — the latent cache relies on this.
  - Spatial positions: 2-D RoPE over the patch grid with base 10 (not 10⁴: on a 4×4 or 8×8 grid
    base 10⁴ leaves most frequencies unrotated, so nearby patches look alike); the latent tokens
    are spread evenly over the same grid (latent_grid). Not in paper.
  - Locality initialisation (Tokenizer.locality_init, not in paper): latents start out reading
    their own image region and read-outs their nearest latents. Without it the learned-latent
    bottleneck sat at the "average frame" (≈ 19.6 dB) for thousands of CPU steps; with it the
    same shapes reach 26.7 dB in 1,000 steps. Only the initial weights change, not the model.
  - Patch size and bottleneck follow the built-in world's tiles (not in paper): one patch is one tile at both
    presets (8 px at 64×64, 4 px at 32×32) and the bottleneck is 32 × 16 at both, packed into 16 dynamics
    tokens of 32 channels that each cover 2×2 tiles. The cpu preset used 8-pixel patches and 16 × 8 latents
    before: 2×2 tiles in 8 numbers, so a dynamics token packed 8 tiles into 16 channels and moving the agent
    one tile meant re-encoding a dense code. Measured at the cpu preset (same data, seed, dynamics preset):
    held-out PSNR 33.9 → 45.1 dB (5,000 instead of 8,000 steps), and the world model started to use the
    actions (README "How we got here"). Three times the tokens per frame (96 vs 32) cost 2× per
    training step and 2.2× in the latent cache (the cpu stage now takes ≈ 16 min).
  - Optimiser: AdamW with linear warm-up and cosine decay, gradient clipping. The paper gives no
    optimiser, learning rate or schedule (PAPER.md §8).
  - Pixels are predicted directly by a linear head (no sigmoid) and clamped to [0, 1] only for
    metrics and pictures.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data


@dataclass
class Args:
    preset: str = "default"  # smoke | cpu | default (one GPU, 64×64)
    data: str = "data/diamond64"  # dataset folder (generated by data.py if it is a built-in one)
    out: str = "runs/tokenizer"  # run folder: checkpoint, metrics, pictures, latent cache
    image_size: int = 64  # frame size the preset expects; must match the dataset
    patch: int = 8  # patch size P (App A uses 16 at 384×640; 8 at 64×64 keeps 64 patches)
    width: int = 256  # model width D (not in paper)
    depth: int = 8  # layers in the encoder and in the decoder each (not in paper)
    heads: int = 8  # attention heads (not in paper)
    n_latents: int = 32  # N_b latent tokens per frame (App A: 512 at 384×640)
    latent_dim: int = 16  # D_b bottleneck channels (App A: 16)
    window: int = 4  # C_tok: frames a time-attention layer sees, itself included (not in paper)
    seq_len: int = 8  # frames per training sequence; > n_time_layers·(window − 1) (not in paper)
    batch_size: int = 16  # sequences per batch (not in paper)
    steps: int = 10000  # optimiser steps (not in paper)
    lr: float = 3e-4  # AdamW peak learning rate (not in paper)
    warmup: int = 500  # linear warm-up steps, then cosine decay to 10 % (not in paper)
    weight_decay: float = 0.01  # AdamW weight decay (not in paper)
    grad_clip: float = 1.0  # gradient-norm clipping (not in paper)
    mae_max: float = 0.9  # MAE drop probability p ~ U(0, mae_max) per image (§3.1: 0.9)
    lpips_weight: float = 0.2  # weight of the LPIPS term (Eq 5: 0.2)
    lpips_net: str = "vgg"  # LPIPS backbone: vgg (for optimisation) or alex (not in paper)
    soft_cap: float = 50.0  # attention-logit soft cap (§3.4; value from Gemma 2, not in paper)
    space_rope_base: float = 10.0  # 2-D RoPE base over the patch grid (not in paper; 10⁴ cannot tell near patches apart)
    locality_init: bool = True  # start latents attending to their own grid region (not in paper; see Deviations)
    log_every: int = 100  # steps between log lines
    eval_every: int = 1000  # steps between held-out evaluations and checkpoints
    eval_batches: int = 8  # held-out batches per evaluation
    encode: bool = False  # only build the latent cache from an existing checkpoint
    encode_data: str = ""  # with --encode: encode this dataset instead of the checkpoint's own (e.g. a larger one)
    resume: bool = False  # continue the run in --out from its ckpt.pt
    stop_at: int = 0  # stop after this step as if interrupted (to test --resume); 0 = never
    seed: int = 0  # seed for model init, data sampling and MAE masks
    device: str = "auto"  # auto | cpu | cuda | mps
    compile: bool = False  # torch.compile the model (off by default)


PRESETS = {
    "smoke": dict(data="data/smoke", out="runs/smoke/tokenizer", image_size=32, patch=8, width=32, depth=4,
                  heads=2, n_latents=8, latent_dim=4, window=2, seq_len=4, batch_size=2, steps=6,
                  warmup=2, log_every=2, eval_every=3, eval_batches=1),
    # One 4-pixel tile per patch and 32 × 16 latents, as the default preset at 64×64 (8-pixel tiles, patch 8):
    # the 8-pixel patches and 16 × 8 latents used before packed 2×2 tiles into 8 numbers (see Deviations).
    "cpu": dict(data="data/diamond32", out="runs/cpu/tokenizer", image_size=32, patch=4, width=64, depth=4,
                heads=2, n_latents=32, latent_dim=16, window=4, seq_len=4, batch_size=6, steps=5000,
                lr=1e-3, warmup=200, log_every=100, eval_every=1000, eval_batches=8),
}

FORMAT_VERSION = 1


# ==============================================================================================
# Model
# ==============================================================================================


def patchify(x: torch.Tensor, P: int) -> torch.Tensor:
    """(B, T, H, W, 3) → (B, T, N_p, P·P·3), patches in row-major grid order."""
    B, T, H, W, C = x.shape
    x = x.reshape(B, T, H // P, P, W // P, P, C)  # (B, T, H/P, P, W/P, P, 3)
    return x.permute(0, 1, 2, 4, 3, 5, 6).reshape(B, T, (H // P) * (W // P), P * P * C)  # (B, T, N_p, P·P·3)


def unpatchify(x: torch.Tensor, P: int, H: int, W: int) -> torch.Tensor:
    """(B, T, N_p, P·P·3) → (B, T, H, W, 3): the inverse of patchify."""
    B, T, N, _ = x.shape
    x = x.reshape(B, T, H // P, W // P, P, P, 3)  # (B, T, H/P, W/P, P, P, 3)
    return x.permute(0, 1, 2, 4, 3, 5, 6).reshape(B, T, H, W, 3)  # (B, T, H, W, 3)


def encoder_mask(n_patches: int, n_latents: int) -> torch.Tensor:
    """§3.1 encoder: latents attend to all tokens; patches only to patches. Order [patches, latents].

    Returns (N, N) bool, row = query, column = key, True = may attend.
    """
    N = n_patches + n_latents
    mask = torch.zeros(N, N, dtype=torch.bool)
    mask[:n_patches, :n_patches] = True  # patch → patch
    mask[n_patches:, :] = True  # latent → everything
    return mask


def decoder_mask(n_patches: int, n_latents: int) -> torch.Tensor:
    """§3.1 decoder: read-out tokens attend to read-outs and latents; latents only to latents.

    Order [read-outs, latents]. Returns (N, N) bool, True = may attend.
    """
    N = n_patches + n_latents
    mask = torch.zeros(N, N, dtype=torch.bool)
    mask[:n_patches, :] = True  # read-out → read-outs and latents
    mask[n_patches:, n_patches:] = True  # latent → latents
    return mask


def sample_mae_mask(B: int, T: int, n_patches: int, p_max: float, gen: torch.Generator,
                    device=None) -> torch.Tensor:
    """§3.1 MAE: per image p ~ U(0, p_max); each patch is dropped with probability p.

    Returns (B, T, N_p) bool, True = replaced by the learned mask embedding. Because p is drawn
    per image from U(0, 0.9), images with almost nothing dropped (the inference case p = 0) are
    trained too; the mean dropped share is p_max / 2 = 0.45.
    """
    p = torch.rand(B, T, 1, generator=gen) * p_max  # (B, T, 1) one drop probability per image
    return (torch.rand(B, T, n_patches, generator=gen) < p).to(device)  # (B, T, N_p)


def latent_grid(n_latents: int, g: int) -> torch.Tensor:
    """Spread n_latents over a g×g patch grid: an r×c lattice (r ≤ c, r·c = n_latents, as square as
    possible), each latent at the centre of its cell. Returns (n_latents, 2) float (row, col)."""
    r = max(d for d in range(1, int(n_latents ** 0.5) + 1) if n_latents % d == 0)
    c = n_latents // r
    rows = (torch.arange(r) + 0.5) * g / r - 0.5  # (r,) cell centres in patch units
    cols = (torch.arange(c) + 0.5) * g / c - 0.5  # (c,)
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), -1).view(-1, 2)  # (n_latents, 2)


def pack(z: torch.Tensor) -> torch.Tensor:
    """App A: (…, N_b, D_b) → (…, N_b/2, 2·D_b): concatenate latent tokens two by two."""
    *lead, N, D = z.shape
    assert N % 2 == 0, f"packing needs an even number of latents, got {N}"
    return z.reshape(*lead, N // 2, 2 * D)  # (…, N_b/2, 2·D_b)


def unpack(z: torch.Tensor) -> torch.Tensor:
    """The inverse of pack: (…, N_b/2, 2·D_b) → (…, N_b, D_b)."""
    *lead, N, D = z.shape
    return z.reshape(*lead, 2 * N, D // 2)  # (…, N_b, D_b)


class Tokenizer(nn.Module):
    """Causal masked-autoencoder tokenizer (§3.1). Pixels are floats in [0, 1] at the interface."""

    def __init__(self, image_size: int, patch: int, width: int, depth: int, heads: int, n_latents: int,
                 latent_dim: int, window: int, soft_cap: float = 50.0, space_rope_base: float = 10.0,
                 locality_init: bool = True):
        super().__init__()
        assert image_size % patch == 0, f"image size {image_size} is not a multiple of patch {patch}"
        self.image_size, self.patch = image_size, patch
        self.n_latents, self.latent_dim = n_latents, latent_dim
        g = image_size // patch
        self.n_patches = g * g
        # Grid position of every token for 2-D RoPE: patches at (row, col); latents spread evenly
        # over the same grid (latent_grid), so each latent has a region of the image "near" it.
        grid = torch.stack(torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij"), -1).view(-1, 2)
        self.register_buffer("pos", torch.cat([grid.float(), latent_grid(n_latents, g)]), persistent=False)
        self.register_buffer("enc_mask", encoder_mask(self.n_patches, n_latents), persistent=False)
        self.register_buffer("dec_mask", decoder_mask(self.n_patches, n_latents), persistent=False)

        def transformer():
            return common.SpaceTimeTransformer(width, depth, heads, heads, window=window, soft_cap=soft_cap,
                                               space_rope_base=space_rope_base)

        # Encoder: patch embedding, learned MAE mask embedding, learned latent tokens.
        self.patch_embed = nn.Linear(patch * patch * 3, width)
        self.mask_token = nn.Parameter(torch.randn(width) * 0.02)
        self.latent_tokens = nn.Parameter(torch.randn(n_latents, width) * 0.02)
        self.encoder = transformer()
        self.to_bottleneck = nn.Linear(width, latent_dim)
        # Decoder: linear up from the bottleneck (+ which latent slot it is), learned read-out tokens.
        self.from_bottleneck = nn.Linear(latent_dim, width)
        self.latent_slot = nn.Parameter(torch.randn(n_latents, width) * 0.02)
        self.readout_tokens = nn.Parameter(torch.randn(self.n_patches, width) * 0.02)
        self.decoder = transformer()
        self.to_pixels = nn.Linear(width, patch * patch * 3)
        if locality_init:
            self.locality_init()

    @torch.no_grad()
    def locality_init(self):
        """Start every latent attending to its own region of the image (not in paper).

        Why: with learned latent tokens, the encoder must learn *which* patches each latent reads
        and the decoder *which* latent each read-out reads — at the same time. At initialisation
        every latent reads the same uniform average of the patches (which loses where things are),
        so neither side gets a useful gradient: training sits for thousands of steps at the
        "average frame" (≈ 19.6 dB at the cpu preset, a blur of the static layout) — the slow
        start known from other learned-latent tokenizers (TiTok/Perceiver-style autoencoders).
        The fix is only an initialisation: patch tokens, the MAE mask token and the latent tokens
        start with the same shared vector (the patch content adds to it), read-out tokens and latent
        slots with another, and in the space layers W_q starts equal to W_k. Then q·k between two
        tokens is largest when 2-D RoPE rotates them least — when they sit at the same grid
        position — so latents begin by reading their neighbourhood and read-outs by reading
        their nearest latents. Training is free to change all of it. Measured (cpu preset shapes,
        1,000 steps): 26.7 dB with this init, 19.5–20.9 dB without (tokenizer.py docstring).
        """
        width = self.latent_tokens.shape[1]
        shared_in, shared_out = torch.randn(width), torch.randn(width)
        self.patch_embed.bias.copy_(shared_in)
        self.mask_token.copy_(shared_in + 0.02 * torch.randn(width))
        self.latent_tokens.copy_(shared_in + 0.02 * torch.randn_like(self.latent_tokens))
        self.readout_tokens.copy_(shared_out + 0.02 * torch.randn_like(self.readout_tokens))
        self.latent_slot.copy_(shared_out + 0.02 * torch.randn_like(self.latent_slot))
        for transformer in (self.encoder, self.decoder):
            for blk in transformer.blocks:
                if not blk.is_time:  # W_q ← W_k (per query head, its GQA key head)
                    att = blk.attn
                    w_k = att.wkv.weight[:att.n_kv_heads * att.head_dim].view(att.n_kv_heads, att.head_dim, -1)
                    att.wq.weight.copy_(w_k.repeat_interleave(att.n_heads // att.n_kv_heads, 0).flatten(0, 1))

    def encode(self, frames: torch.Tensor, mae_mask: torch.Tensor | None = None,
               cache: common.KVCache | None = None) -> torch.Tensor:
        """frames (B, T, H, W, 3) uint8 or float in [0, 1] → z (B, T, N_b, D_b) in (−1, 1).

        cache: optional time-attention KV cache, to encode a long video chunk by chunk (committed).
        """
        if frames.dtype == torch.uint8:
            frames = frames.float() / 255
        B, T, H, W, _ = frames.shape
        assert H == W == self.image_size, f"expected {self.image_size}×{self.image_size} frames, got {H}×{W}"
        x = self.patch_embed(patchify(frames * 2 - 1, self.patch))  # (B, T, N_p, D)
        if mae_mask is not None:  # MAE (§3.1): dropped patches become the learned mask embedding
            x = torch.where(mae_mask[..., None], self.mask_token.to(x.dtype), x)  # (B, T, N_p, D)
        lat = self.latent_tokens.expand(B, T, -1, -1).to(x.dtype)  # (B, T, N_b, D)
        h = self.encoder(torch.cat([x, lat], dim=2), self.pos, self.enc_mask,
                         cache=cache, commit=cache is not None)  # (B, T, N_p + N_b, D)
        # Bottleneck (§3.1): read the latent tokens, linear projection to D_b channels, then tanh.
        return torch.tanh(self.to_bottleneck(h[:, :, self.n_patches:]))  # (B, T, N_b, D_b)

    def decode(self, z: torch.Tensor, cache: common.KVCache | None = None) -> torch.Tensor:
        """z (B, T, N_b, D_b) → frames (B, T, H, W, 3), floats ≈ [0, 1] (not clamped).

        cache: optional time-attention KV cache, to decode a stream frame by frame (committed).
        """
        B, T, Nb, Db = z.shape
        lat = self.from_bottleneck(z) + self.latent_slot  # (B, T, N_b, D)
        ro = self.readout_tokens.expand(B, T, -1, -1).to(lat.dtype)  # (B, T, N_p, D)
        h = self.decoder(torch.cat([ro, lat], dim=2), self.pos, self.dec_mask,
                         cache=cache, commit=cache is not None)  # (B, T, N_p + N_b, D)
        patches = self.to_pixels(h[:, :, :self.n_patches])  # (B, T, N_p, P·P·3)
        return (unpatchify(patches, self.patch, self.image_size, self.image_size) + 1) / 2  # (B, T, H, W, 3)

    def forward(self, frames, mae_mask=None):
        return self.decode(self.encode(frames, mae_mask))


def build_tokenizer(a: dict) -> Tokenizer:
    """Rebuild the model from a plain args dict (as stored in the checkpoint)."""
    return Tokenizer(a["image_size"], a["patch"], a["width"], a["depth"], a["heads"], a["n_latents"],
                     a["latent_dim"], a["window"], a["soft_cap"], a.get("space_rope_base", 10.0),
                     a.get("locality_init", True))


def load_tokenizer(path: str = "runs/tokenizer/ckpt.pt", device="cpu"):
    """Frozen, eval-mode tokenizer for the later stages. Returns (model, checkpoint dict)."""
    ckpt = common.load_checkpoint(path, "tokenizer", "python tokenizer.py")
    model = build_tokenizer(ckpt["args"])
    model.load_state_dict(ckpt["model"])
    model.eval().requires_grad_(False)
    return model.to(device), ckpt


# ==============================================================================================
# Loss (Eq 5)
# ==============================================================================================


def make_lpips(net: str, device, pretrained_backbone: bool = True):
    """The LPIPS module of the `lpips` package, or None when its backbone weights cannot be loaded.

    lpips downloads torchvision's ImageNet backbone on first use. Offline that fails: DESIGN.md §5
    says warn loudly, train with MSE only, and record `lpips_used: false` in summary.json.
    pretrained_backbone=False builds a random backbone (tests only: exercises the path offline).
    """
    try:
        import lpips
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = lpips.LPIPS(net=net, pnet_rand=not pretrained_backbone, verbose=False)
    except Exception as e:  # no internet, no cached weights, broken install
        print("\n" + "!" * 100 + f"\n!! WARNING: LPIPS ({net}) is unavailable ({type(e).__name__}: {str(e)[:120]})."
              "\n!! Training the tokenizer with the MSE term only; summary.json records lpips_used: false."
              f"\n!! To use LPIPS, run once with internet access (torchvision caches the {net} weights).\n" + "!" * 100)
        return None
    return module.to(device).eval().requires_grad_(False)


def tokenizer_loss(recon: torch.Tensor, target: torch.Tensor, lpips_fn, norms: dict,
                   lpips_weight: float = 0.2) -> dict:
    """Eq 5: L = L_MSE/RMS(L_MSE) + 0.2·L_LPIPS/RMS(L_LPIPS), both over all patches of all frames.

    recon, target: (B, T, H, W, 3) in [0, 1]. norms: {"mse": RunningRMS, "lpips": RunningRMS}.
    Returns the total and its named terms (raw, un-normalised values for logging).
    """
    mse = (recon - target).pow(2).mean()  # every pixel of every patch: masked or not (DESIGN.md §5)
    loss = norms["mse"](mse)
    out = {"mse": mse.detach()}
    if lpips_fn is not None:
        B, T, H, W, C = recon.shape
        # lpips wants (N, 3, H, W) images in [−1, 1].
        r = recon.reshape(B * T, H, W, C).permute(0, 3, 1, 2) * 2 - 1  # (B·T, 3, H, W)
        t = target.reshape(B * T, H, W, C).permute(0, 3, 1, 2) * 2 - 1  # (B·T, 3, H, W)
        lp = lpips_fn(r.float(), t.float()).mean()
        loss = loss + lpips_weight * norms["lpips"](lp)
        out["lpips"] = lp.detach()
    out["loss"] = loss
    return out


# ==============================================================================================
# Evaluation and pictures
# ==============================================================================================


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, pixels in [0, 1]: 10·log10(1 / MSE). (…, H, W, 3) → (…)"""
    mse = (x.clamp(0, 1) - y).pow(2).mean(dim=(-3, -2, -1))
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


def psnr_of_mean_mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR of the squared error averaged over the leading (batch) dim: 10·log10(1 / mean_b MSE_b).

    (B, …, H, W, 3) → (…). Unlike the mean of per-image PSNRs it stays finite and fair when some
    images are reproduced exactly (a copy baseline on frames where nothing changed).
    """
    mse = (x.clamp(0, 1) - y).pow(2).mean(dim=(-3, -2, -1)).mean(0)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004), Gaussian window, averaged over channels.

    (…, H, W, 3) in [0, 1] → (…). A 7-pixel window (not the usual 11) suits 32×32 frames.
    """
    lead = x.shape[:-3]
    H, W, C = x.shape[-3:]
    x = x.clamp(0, 1).reshape(-1, H, W, C).permute(0, 3, 1, 2).float()  # (M, 3, H, W)
    y = y.reshape(-1, H, W, C).permute(0, 3, 1, 2).float()  # (M, 3, H, W)
    g = torch.exp(-(torch.arange(window, device=x.device) - window // 2).float() ** 2 / (2 * sigma ** 2))
    k = (g[:, None] * g[None, :] / g.sum() ** 2).expand(C, 1, window, window)  # (3, 1, w, w)
    blur = lambda v: F.conv2d(v, k, groups=C)  # noqa: E731  (valid-mode Gaussian mean)
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3)).reshape(lead)


@torch.no_grad()
def evaluate(model: Tokenizer, loader, batches: int, batch_size: int, device, seed: int) -> dict:
    """Held-out reconstruction at MAE p = 0: PSNR (dB) on un-normalised MSE, and SSIM."""
    model.eval()
    loader.rng = np.random.default_rng([seed, 12345])  # the same held-out windows every evaluation
    p, s = [], []
    for _ in range(batches):
        frames = loader.sample(batch_size)["frames"].to(device)  # (B, T, H, W, 3) uint8
        with common.autocast(device):
            recon = model(frames).float()
        target = frames.float() / 255
        p.append(psnr(recon, target).flatten())
        s.append(ssim(recon, target).flatten())
    model.train()
    return {"psnr": float(torch.cat(p).mean()), "ssim": float(torch.cat(s).mean())}


@torch.no_grad()
def save_recon_picture(model: Tokenizer, frames: torch.Tensor, path: str, gen: torch.Generator) -> None:
    """Rows: true | reconstruction | |error|, at MAE p = 0 and at p = 0.5 (masked patches grey)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    model.eval()
    x = frames[:1, :8]  # (1, T, H, W, 3) uint8, one sequence
    T = x.shape[1]
    target = x.float() / 255
    m = torch.rand(1, T, model.n_patches, generator=gen) < 0.5  # p = 0.5 mask (1, T, N_p)
    rows = []
    for mask in (None, m.to(x.device)):
        recon = model(x, mask).float().clamp(0, 1)
        shown = target
        if mask is not None:  # show dropped patches in grey
            grey = unpatchify(mask[..., None].float().expand(-1, -1, -1, model.patch ** 2 * 3),
                              model.patch, model.image_size, model.image_size)  # (1, T, H, W, 3)
            shown = target * (1 - grey) + 0.5 * grey
        err = (recon - target).abs().mean(-1, keepdim=True).expand_as(recon) * 4  # ×4 to be visible
        rows += [shown[0], recon[0], err.clamp(0, 1)[0]]
    names = ["true (p=0)", "recon (p=0)", "|err|×4", "input (p=0.5)", "recon (p=0.5)", "|err|×4"]
    fig, axes = plt.subplots(len(rows), T, figsize=(1.3 * T, 1.4 * len(rows)), squeeze=False)
    for r, (row, name) in enumerate(zip(rows, names)):
        for t in range(T):
            axes[r, t].imshow(row[t].cpu().numpy(), interpolation="nearest")
            axes[r, t].set_xticks([]), axes[r, t].set_yticks([])
        axes[r, 0].set_ylabel(name, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    model.train()


def save_curves(out: str) -> None:
    """Loss and held-out PSNR over training steps, read back from metrics.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3))
    tr = [r for r in rows if "mse" in r]
    a.semilogy([r["step"] for r in tr], [r["mse"] for r in tr], label="MSE")
    if any("lpips" in r for r in tr):
        a.semilogy([r["step"] for r in tr if "lpips" in r], [r["lpips"] for r in tr if "lpips" in r], label="LPIPS")
    a.set_xlabel("step"), a.legend(), a.set_title("training loss terms (raw)")
    ev = [r for r in rows if "eval_psnr" in r]
    b.plot([r["step"] for r in ev], [r["eval_psnr"] for r in ev], "o-")
    b.set_xlabel("step"), b.set_ylabel("dB"), b.set_title("held-out PSNR (p = 0)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=80)
    plt.close(fig)


# ==============================================================================================
# The latent cache: the whole dataset encoded once, for the dynamics stage
# ==============================================================================================


@torch.no_grad()
def encode_episode(model: Tokenizer, frames: np.ndarray, device, chunk: int = 64) -> np.ndarray:
    """Encode a whole episode (T, H, W, 3) uint8 → (T, N_b, D_b) float32, in one causal pass.

    The episode goes through in chunks with the time-attention KV cache, which gives exactly the
    single-pass result (tested in test_common.py); the window C_tok bounds how far back a frame
    looks, so the result also equals encoding any training-length window that ends at that frame.
    Chunks of 64 frames encode up to twice as fast as one 256-frame pass on CPU (the masked time
    attention is quadratic in the chunk length although only C_tok frames are visible).
    """
    cache = common.KVCache(model.encoder.window)
    x = torch.from_numpy(frames).to(device)[None]  # (1, T, H, W, 3) uint8
    with common.autocast(device):
        z = [model.encode(x[:, s:s + chunk], cache=cache).float() for s in range(0, x.shape[1], chunk)]
    return torch.cat(z, dim=1)[0].cpu().numpy()  # (T, N_b, D_b)


def build_latent_cache(model: Tokenizer, data_root: str, out_dir: str, device) -> dict:
    """Encode every episode of both splits; write latents/actions/rewards as .npy per split.

    Layout (memory-mapped by LatentCache): latents/{split}_latents.npy (ΣT, N_b, D_b) float32,
    {split}_actions.npy (ΣT, A) int64 (if labelled), {split}_rewards.npy (ΣT, n_tasks) float32
    (if labelled), and latents/index.json with each episode's offset and length.
    """
    cache_dir = os.path.join(out_dir, "latents")
    os.makedirs(cache_dir, exist_ok=True)
    index = {"data": os.path.abspath(data_root), "n_latents": model.n_latents, "latent_dim": model.latent_dim,
             "splits": {}}
    t0, n_frames = time.time(), 0
    for split in ("train", "heldout"):
        lat, act, rew, episodes, offset = [], [], [], [], 0
        for ep in data.iter_episodes(data_root, split):
            lat.append(encode_episode(model, ep["frames"], device))
            if ep.get("actions") is not None:
                act.append(ep["actions"])
            if ep.get("rewards") is not None:
                rew.append(ep["rewards"])
            T = len(ep["frames"])
            episodes.append({"id": ep["id"], "offset": offset, "length": T})
            offset += T
        np.save(os.path.join(cache_dir, f"{split}_latents.npy"), np.concatenate(lat))
        if act and len(act) == len(lat):
            np.save(os.path.join(cache_dir, f"{split}_actions.npy"), np.concatenate(act))
        if rew and len(rew) == len(lat):
            np.save(os.path.join(cache_dir, f"{split}_rewards.npy"), np.concatenate(rew))
        index["splits"][split] = episodes
        n_frames += offset
    common.write_json(os.path.join(cache_dir, "index.json"), index)
    dt = time.time() - t0
    print(f"latent cache: {n_frames:,} frames encoded in {dt:.1f}s ({n_frames / max(dt, 1e-9):,.0f} frames/s) "
          f"-> {cache_dir}")
    return {"frames": n_frames, "seconds": dt}


class LatentCache:
    """Windows of (latents, actions, rewards) sampled from the latent cache (memory-mapped).

    sample(B, T) draws B windows uniformly over all valid start positions (windows may overlap);
    relevant=True draws windows that contain at least one reward event (the "task-relevant"
    half of the Phase 2/3 mixture, PAPER.md §5). The generator `rng` is the sampler's own.
    """

    def __init__(self, tokenizer_dir: str = "runs/tokenizer", split: str = "train", seed: int = 0):
        cache_dir = os.path.join(tokenizer_dir, "latents")
        path = os.path.join(cache_dir, "index.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no latent cache at {cache_dir}: run `python tokenizer.py --encode "
                                    f"--out {tokenizer_dir}` (or train the tokenizer first)")
        index = json.load(open(path))
        self.data_root, self.split = index["data"], split
        self.episodes = index["splits"][split]
        if not self.episodes:
            raise ValueError(f"the '{split}' split of {self.data_root} has no episodes")
        load = lambda name: np.load(os.path.join(cache_dir, f"{split}_{name}.npy"), mmap_mode="r") \
            if os.path.exists(os.path.join(cache_dir, f"{split}_{name}.npy")) else None  # noqa: E731
        self.latents, self.actions, self.rewards = load("latents"), load("actions"), load("rewards")
        self.meta = data.load_meta(self.data_root)
        self.rng = np.random.default_rng(seed)

    def _starts(self, T: int, relevant: bool):
        """All (global offset) window starts of length T; for `relevant`, only windows with a reward."""
        starts = []
        for ep in self.episodes:
            s = np.arange(ep["offset"], ep["offset"] + ep["length"] - T + 1)
            if relevant:
                r = (np.asarray(self.rewards[ep["offset"]:ep["offset"] + ep["length"]]) > 0).any(-1)  # (T_ep,)
                c = np.concatenate([[0], np.cumsum(r)])  # c[j] = reward events before frame j
                s = s[(c[s - ep["offset"] + T] - c[s - ep["offset"]]) > 0]
            starts.append(s)
        return np.concatenate(starts) if starts else np.zeros(0, int)

    def sample(self, batch_size: int, seq_len: int, relevant: bool = False, with_frames: bool = False) -> dict:
        if not hasattr(self, "_valid"):
            self._valid = {}  # start lists per (T, relevant): the stages alternate lengths and halves
        key = (seq_len, relevant)
        if key not in self._valid:
            self._valid[key] = self._starts(seq_len, relevant)
            if len(self._valid[key]) == 0:
                raise ValueError(f"no {'reward-containing ' if relevant else ''}window of {seq_len} frames "
                                 f"in the '{self.split}' split: use shorter sequences or more data")
        starts = self.rng.choice(self._valid[key], size=batch_size)
        idx = starts[:, None] + np.arange(seq_len)  # (B, T) global frame indices
        out = {"latents": torch.from_numpy(np.asarray(self.latents[idx], dtype=np.float32)),  # (B, T, N_b, D_b)
               "actions": None if self.actions is None else torch.from_numpy(np.asarray(self.actions[idx])),
               "rewards": None if self.rewards is None else torch.from_numpy(np.asarray(self.rewards[idx]))}
        if with_frames:  # evaluation: the pixels, and where each window sits (episode id, first frame)
            where = [next((e["id"], s - e["offset"]) for e in self.episodes
                          if e["offset"] <= s < e["offset"] + e["length"]) for s in starts]
            out["episode_ids"], out["episode_starts"] = [w[0] for w in where], [int(w[1]) for w in where]
            out["frames"] = torch.from_numpy(np.stack([np.array(  # a copy frees the memory map (open files)
                data.mapped_frames(self.data_root, i)[s:s + seq_len]) for i, s in where]))  # (B, T, H, W, 3) uint8
        return out


# ==============================================================================================
# Training
# ==============================================================================================


def train(a: Args) -> dict:
    common.seed_everything(a.seed)
    device = common.pick_device(a.device)
    os.makedirs(a.out, exist_ok=True)
    ckpt_path = os.path.join(a.out, "ckpt.pt")

    if a.encode:  # only (re)build the latent cache
        model, ckpt = load_tokenizer(ckpt_path, device)
        root = data.ensure_dataset(a.encode_data) if a.encode_data else ckpt["args"]["data"]
        size = data.load_meta(root)["image_size"]
        if size != model.image_size:
            raise ValueError(f"{root} holds {size}-pixel frames but the tokenizer in "
                             f"{ckpt_path} was trained on {model.image_size}-pixel frames: encode a dataset of that size")
        return build_latent_cache(model, root, a.out, device)

    a.data = data.ensure_dataset(a.data)  # generates a missing built-in dataset
    meta = data.load_meta(a.data)
    if meta["image_size"] != a.image_size:
        raise ValueError(f"{a.data} holds {meta['image_size']}×{meta['image_size']} frames but this run expects "
                         f"{a.image_size}×{a.image_size} (preset '{a.preset}'). Pass --image-size "
                         f"{meta['image_size']} (and a matching --patch), or point --data at a "
                         f"{a.image_size}×{a.image_size} dataset (`python data.py --image-size {a.image_size}`).")
    n_time = a.depth // 4
    if a.seq_len <= n_time * (a.window - 1):
        print(f"note: seq_len {a.seq_len} ≤ {n_time}·(window − 1): no training frame sees its full time context")
    train_loader = data.SequenceDataset(a.data, "train", a.seq_len, seed=a.seed)
    held_loader = data.SequenceDataset(a.data, "heldout", a.seq_len, seed=a.seed + 1)

    model = build_tokenizer(asdict(a)).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tokenizer: {n_params / 1e6:.2f}M parameters, {model.n_patches} patches + {a.n_latents} latents per frame, "
          f"bottleneck {a.n_latents}×{a.latent_dim} (packed {a.n_latents // 2}×{2 * a.latent_dim})")
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay, betas=(0.9, 0.95))
    lpips_fn = make_lpips(a.lpips_net, device) if a.lpips_weight > 0 else None
    norms = {"mse": common.RunningRMS(), "lpips": common.RunningRMS()}
    step = 0
    if a.resume:
        ckpt = common.load_checkpoint(ckpt_path, "tokenizer", f"python tokenizer.py --out {a.out}")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        for k, v in ckpt["normalizers"].items():
            norms[k].load_state_dict(v)
        step = ckpt["step"]
        print(f"resumed from {ckpt_path} at step {step}")
    elif device.type == "cpu" and a.preset == "default":
        print("!! the default preset is sized for a GPU; on this CPU it would take hours. Try --preset cpu.")
    common.write_json(os.path.join(a.out, "args.json"), asdict(a))
    print("args:", json.dumps(asdict(a)))
    fwd = torch.compile(model) if a.compile else model
    log = common.MetricsLog(a.out, a.steps, resume=a.resume, start_step=step)

    def save(step):
        common.save_checkpoint(ckpt_path, {
            "format_version": FORMAT_VERSION, "stage": "tokenizer", "step": step, "model": model.state_dict(),
            "optimizer": opt.state_dict(), "normalizers": {k: n.state_dict() for k, n in norms.items()},
            "args": asdict(a), "parent": {"stage": "data", "path": os.path.abspath(a.data), "step": 0},
            "lpips_used": lpips_fn is not None})

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_start, steps_run, result = time.time(), 0, {}
    while step < a.steps:
        # Per-step generators seeded from (seed, step): the data stream and MAE masks do not depend on
        # model initialisation, and --resume reproduces exactly the batches an uninterrupted run sees.
        train_loader.rng = np.random.default_rng([a.seed, step])
        gen = torch.Generator().manual_seed(a.seed * 1_000_003 + step)
        frames = train_loader.sample(a.batch_size)["frames"].to(device)  # (B, T, H, W, 3) uint8
        B, T = frames.shape[:2]
        mae = sample_mae_mask(B, T, model.n_patches, a.mae_max, gen, device)  # (B, T, N_p)
        for g in opt.param_groups:
            g["lr"] = common.lr_at(step, a.lr, a.warmup, a.steps)
        with common.autocast(device):
            recon = fwd(frames, mae).float()  # (B, T, H, W, 3)
        terms = tokenizer_loss(recon, frames.float() / 255, lpips_fn, norms, a.lpips_weight)
        common.check_finite(step, **terms)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
        opt.step()
        step += 1
        steps_run += 1
        if step % a.log_every == 0 or step == a.steps:
            with torch.no_grad():
                train_psnr = float(psnr(recon.detach(), frames.float() / 255).mean())
            log.log(step, {**{k: v for k, v in terms.items() if k != "loss"}, "loss": terms["loss"],
                           "psnr": train_psnr, "grad_norm": gnorm, "lr": common.lr_at(step - 1, a.lr, a.warmup, a.steps)}, B * T)
        if step % a.eval_every == 0 or step == a.steps:
            result = evaluate(model, held_loader, a.eval_batches, a.batch_size, device, a.seed)
            print(f"eval step {step}: held-out PSNR {result['psnr']:.2f} dB | SSIM {result['ssim']:.4f} (MAE p = 0)")
            with open(log.path, "a") as f:
                f.write(json.dumps({"step": step, "eval_psnr": result["psnr"], "eval_ssim": result["ssim"]}) + "\n")
            save(step)
        if a.stop_at and step >= a.stop_at:
            print(f"stopping at step {step} (--stop-at); continue with --resume")
            return {}
    wall = time.time() - t_start

    # Final evaluation, pictures, latent cache, summary.json (DESIGN.md §7).
    held_loader.rng = np.random.default_rng([a.seed, 999])
    save_recon_picture(model, held_loader.sample(1)["frames"].to(device), os.path.join(a.out, "recon.png"),
                       torch.Generator().manual_seed(a.seed))
    save_curves(a.out)
    cache = build_latent_cache(model, a.data, a.out, device)
    summary = {
        "stage": "tokenizer", "preset": a.preset, "device": str(device),
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "steps": step, "steps_this_run": steps_run, "wall_s": wall, "steps_per_s": steps_run / max(wall, 1e-9),
        "frames_per_s": steps_run * a.batch_size * a.seq_len / max(wall, 1e-9),
        "peak_mem_gb": common.peak_memory_gb(device),
        "params_m": n_params / 1e6, "heldout_psnr_db": result.get("psnr"), "heldout_ssim": result.get("ssim"),
        "lpips_used": lpips_fn is not None, "lpips_net": a.lpips_net if lpips_fn is not None else None,
        "latent_cache_frames": cache["frames"], "latent_cache_s": cache["seconds"],
        "bottleneck": [a.n_latents, a.latent_dim], "image_size": a.image_size,
    }
    common.write_json(os.path.join(a.out, "summary.json"), summary)
    print("summary:", json.dumps(summary))
    return summary


def main():
    train(common.parse_args(Args, PRESETS))


if __name__ == "__main__":
    main()
