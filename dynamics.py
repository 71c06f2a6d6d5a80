"""Stage 1b — interactive dynamics with shortcut forcing (Dreamer 4 §3.2, Eqs 1–4, 6–8; §3.4).

The dynamics model predicts the next frame's latents from the past frames and the player's
actions. It is a diffusion-forcing transformer over the frozen tokenizer's latents (tokenizer.py):
every frame gets its own signal level τ_t and step size d_t, the network predicts the clean
latents ẑ₁ (x-prediction), and it is trained with shortcut forcing so that K = 4 sampling steps
per frame are enough (the paper's 64 → 4, "16× faster", Fig 8).

Signal-level convention (the paper's, PAPER.md §1): τ = 0 is pure noise, τ = 1 is clean data,
z̃ = (1 − τ)·noise + τ·clean. Many flow-matching libraries use the opposite (t = 1 is noise);
nothing in this file does.

Per time step t the transformer sees (DESIGN.md §3, token order):
    [ action a_{t−1} | (τ_t, d_t) | N_z packed latent tokens of z̃_t | S_r registers ]
a_{t−1} is the action that *led into* frame t; frame 0 and unlabelled clips get the learned
"no action" base embedding alone.

Reads:  runs/tokenizer/ckpt.pt and its latent cache runs/tokenizer/latents/ (`python tokenizer.py`).
Writes: runs/dynamics/  ckpt.pt, args.json, metrics.jsonl, summary.json, rollout.png, rollout.gif,
        rollout_psnr.png, loss_tau_d.png.

Run:
    python dynamics.py --steps 10000     # default preset: 64×64, one GPU
    python dynamics.py --preset cpu      # 32×32, 2 CPU cores, ≤ 15 min (after tokenizer.py --preset cpu)
    python dynamics.py --preset smoke    # seconds; used by the tests
    python dynamics.py --eval-only --out runs/cpu/dynamics --eval-seqs 128   # re-evaluate a trained run

Equation map:
    Eq 4   d ~ 1/U{1, 2, 4, …, K_max},  τ ~ U{0, d, …, 1 − d}     -> sample_tau_d
    Eq 6   z̃ = (1 − τ)·z₀ + τ·z₁,  ẑ₁ = f_θ(z̃, τ, d, a)          -> corrupt, DynamicsModel
    Eq 7   footnote: v̂ = (ẑ₁ − z̃)/(1 − τ)                        -> x_to_velocity
    Eq 7   shortcut forcing: flow term at d = d_min, bootstrap
           term (1 − τ)²·‖v̂ − sg(b′ + b″)/2‖² above it             -> shortcut_forcing_loss
    Eq 8   w(τ) = 0.9τ + 0.1                                      -> ramp_weight
    Eq 2   Euler in x-form: z ← z + (ẑ₁ − z)·d/(1 − τ)             -> sample_frame, rollout
    §3.4   start frames, alternating batch lengths, KV cache      -> forcing_batch, batch_shape, rollout

Deviations and ambiguities (DESIGN.md §5; each is also noted where it applies):
  - K_max = 64 (not stated in the paper; its K = 64 baseline suggests it).
  - `--k-min` (default 1 = every step size of Eq 4): `--k-min 4` trains d ∈ {1/4, …, 1/64} only, the
    steps K = 4 sampling needs (with the literal 1-in-7 share of flow frames, d = ½ and 1 derailed
    our small model; with `--flow-frac 0.75` they train fine: README "How we got here").
  - Share of flow frames (`--flow-frac 0.75`, not in the paper): the literal Eq 4 (`--flow-frac 0`)
    puts d = d_min, the only step whose target is the data, on 1 frame in 7; every other frame
    learns only self-consistency with the network's own half steps. We make 75 % of the sequences
    flow rows (every frame d = d_min) and draw the other step sizes per frame in the rest, the split
    of the shortcut-models paper (Frans et al. 2024: ¾ of the batch rows flow targets, ¼
    self-consistency) and of edwhu/dreamer4-jax. At our budgets the data term is what limits the
    model (cpu preset, 3,000 steps: 21.97 dB rollout PSNR with 1 in 5 flow frames, 23.64 with flow
    frames only; the README has the table).
  - Flow and bootstrap by rows, not by frames (with `--flow-frac`): a row with one bootstrap frame
    costs the two half-step passes of Eq 7 over the whole sequence, so they run only on the ¼ of rows
    that are bootstrap rows (×1.4 faster, same rollout PSNR); τ stays per frame, d per frame in a row.
  - Weight EMA (`--ema 0.999`, not in the paper): sampling, evaluation and the later stages use an EMA
    of the weights (ema_update); the bootstrap targets come from the online weights, as Eq 7 writes f_θ.
  - τ is drawn per frame (diffusion forcing), and so is d within a bootstrap row (with `--flow-frac
    0`, the literal Eq 4, for every frame). The paper does not say whether d is per frame or per
    sequence.
  - Eq 4 typo fixed: τ ∈ {0, d, …, 1 − d} (the paper prints 1/d; PAPER.md §9).
  - The ramp weight multiplies both the flow and the bootstrap term (the paper does not say which).
  - The two half-step passes move every bootstrap frame of the sequence in parallel, each with its
    own τ_t (PAPER.md §4.4). Flow frames (d = d_min) are not moved in those passes: d_min/2 is not
    on the grid; they stay at (z̃_t, τ_t, d_min) as context.
  - Safeguard (not in the paper): the two half-step x-predictions that build the bootstrap target
    are clamped to the latent range [−1, 1] (the tokenizer's tanh bottleneck; `--boot-clip`). The
    ideal denoiser E[z₁ | z̃] always lies in that range, so the clamp never changes its target; it
    stops a runaway seen with online-weight targets on a 1-D two-mode toy (tests/test_dynamics.py),
    where an expansive f makes the target f(z′) larger than f(z̃) and the shared weights chase it.
  - Loss: one running-RMS normaliser on the whole Eq 7 loss (common.RunningRMS). Squared norms are
    means over tokens and channels (a constant factor the normaliser removes).
  - Context frames at inference are corrupted to "signal level 0.9" (the paper's τ_ctx = 0.1 read as
    10 % noise, PAPER.md §9), snapped to the nearest grid point of the step they are tagged with,
    d_min: τ_ctx = 58/64 ≈ 0.906. `--ctx-tau 1` gives clean context (edwhu's choice).
  - Each generated frame costs K denoising passes plus one that writes it into the KV cache at τ_ctx (not in paper).
  - 30 % of the sequences of a batch are independent images (§3.4): their frames see only
    themselves in time attention and carry the "no action" embedding, like any frame 0.
  - The packed latent tokens have no pixel grid: each slot gets a learned embedding; RoPE is used
    over time only (the paper says RoPE, not over what).
  - One action token per step (S_a = 1): per-component embeddings summed with the base embedding.
  - Which layer of each group of four attends over time (§3.4 says "every 4 layers", not which): the
    first (`--time-layer 0`), so the space layers after it can move what it read within the frame; the
    last (`-1`) leaves the cpu preset's 4 layers no space layer after their only time layer. Cpu preset:
    action-shuffle gap 0.59–0.60 dB first (two runs) vs 0.18 dB last; the default preset is not measured.
  - Experiment switches, off by default: `--no-ramp` (w = 1, not Eq 8), `--ctx-frac p` (rows with history at τ_ctx).
  - Rollout PSNR is averaged as the PSNR of the mean squared error per horizon (not in paper; see
    evaluate_rollouts): the mean of per-frame PSNRs rates exact copies of unchanged frames at 100 dB,
    which lifted the pixel copy baseline from 24.2 to 27.8 dB at the cpu preset.
  - Sizes, optimiser (AdamW, warm-up, cosine), batch-length ratio and long-only share: not in paper.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn

import common
import data
from tokenizer import LatentCache, load_tokenizer, pack, psnr, psnr_of_mean_mse, unpack


@dataclass
class Args:
    preset: str = "default"  # smoke | cpu | default (one GPU, 64×64)
    tokenizer: str = "runs/tokenizer/ckpt.pt"  # parent checkpoint, written by `python tokenizer.py`
    out: str = "runs/dynamics"  # run folder: checkpoint, metrics, summary, pictures
    dim: int = 384  # model width D (not in paper)
    depth: int = 8  # transformer layers (not in paper)
    time_every: int = 4  # every n-th layer attends over time (§3.4: 4; every 2nd did not help at the cpu preset)
    time_layer: int = 0  # which layer of each group of time_every attends over time: 0 first, -1 last (not in paper; see docstring)
    heads: int = 8  # query heads (not in paper)
    kv_heads: int = 2  # key/value heads: GQA in every attention layer (§3.4; ratio not in paper)
    registers: int = 4  # S_r register tokens per frame (§3.4; count not in paper)
    context: int = 32  # C: time attention sees the last C frames (§3.4; 192 for Minecraft)
    mlp_ratio: float = 4.0  # SwiGLU hidden width / D (not in paper)
    soft_cap: float = 50.0  # attention-logit soft cap (§3.4; value from Gemma 2, not in paper)
    k_max: int = 64  # K_max: finest step d_min = 1/K_max (Eq 4; DESIGN.md §5)
    k_min: int = 1  # coarsest step trained, d ≤ 1/k_min (Eq 4: 1; see docstring)
    flow_frac: float = 0.75  # share of sequences with every frame at d = d_min (flow term); 0 = literal Eq 4 (1 in 7); not in paper
    boot_clip: float = 1.0  # clamp bootstrap x-predictions to the tanh latent range ±1; 0 = off (not in paper)
    ramp: bool = True  # Eq 8 ramp weight w(τ) = 0.9τ + 0.1 on the loss; --no-ramp: w = 1 (an experiment, see docstring)
    ctx_frac: float = 0.0  # share of sequences in the sampling setting: history at τ_ctx (an experiment, see docstring)
    start_frac: float = 0.3  # share of sequences per batch trained as independent images (§3.4: 30 %)
    batch: int = 32  # sequences per short batch (not in paper)
    seq_len: int = 16  # T₁ ≤ C, length of short batches (§3.4; Minecraft 64 with C = 192)
    batch_long: int = 8  # sequences per long batch: the same frames per step (not in paper)
    seq_len_long: int = 64  # T₂ > C, length of long batches (§3.4: "must exceed the context length")
    long_every: int = 8  # every n-th step is a long batch (ratio not in paper)
    long_only_frac: float = 0.1  # final share of steps with long batches only (§3.4; share not in paper)
    steps: int = 10000  # optimiser steps (not in paper)
    lr: float = 3e-4  # AdamW peak learning rate (not in paper)
    warmup: int = 500  # linear warm-up steps, then cosine decay to 10 % (not in paper)
    weight_decay: float = 0.01  # AdamW weight decay (not in paper)
    grad_clip: float = 1.0  # gradient-norm clipping (not in paper)
    ema: float = 0.999  # decay of the weight EMA used for sampling, evaluation and later stages; 0 = off (not in paper)
    sample_k: int = 4  # K sampling steps per generated frame (§3.2: K = 4)
    ctx_tau: float = 0.9  # signal level of context frames at inference (τ_ctx, PAPER.md §9; 1 = clean)
    log_every: int = 100  # steps between log lines
    ckpt_every: int = 1000  # steps between checkpoints
    eval_seqs: int = 64  # held-out sequences for rollout evaluation (DESIGN.md §7); 0 skips evaluation
    eval_context: int = 8  # context frames of the held-out rollouts (DESIGN.md §7)
    eval_horizon: int = 16  # generated frames of the held-out rollouts (DESIGN.md §7)
    fps_frames: int = 64  # frames generated at batch 1 to time generation (not in paper)
    stop_at: int = 0  # stop after this step as if interrupted (to test --resume); 0 = never
    resume: bool = False  # continue the run in --out from its ckpt.pt
    eval_only: bool = False  # no training: evaluate the checkpoint in --out (its model args) and update its summary.json
    seed: int = 0  # seed for model init; data and noise streams are derived from (seed, step)
    device: str = "auto"  # auto | cpu | cuda | mps
    compile: bool = False  # torch.compile the training forward (off by default)


PRESETS = {
    "smoke": dict(tokenizer="runs/smoke/tokenizer/ckpt.pt", out="runs/smoke/dynamics", dim=32, depth=4, heads=2,
                  kv_heads=1, registers=2, context=4, batch=4, seq_len=4, batch_long=2, seq_len_long=6,
                  long_every=2, steps=6, warmup=2, log_every=2, ckpt_every=3, eval_seqs=2, eval_context=2,
                  eval_horizon=3, fps_frames=4),
    "cpu": dict(tokenizer="runs/cpu/tokenizer/ckpt.pt", out="runs/cpu/dynamics", dim=128, depth=4, heads=4,
                kv_heads=2, registers=4, context=16, batch=8, seq_len=8, batch_long=3, seq_len_long=24,
                long_every=8, steps=6000, lr=1e-3, warmup=200, ckpt_every=1000, eval_seqs=32, fps_frames=64),
}

FORMAT_VERSION = 1


# ==============================================================================================
# The signal-level / step-size grid and the small identities (Eqs 2, 4, 6, 7, 8)
# ==============================================================================================


def sample_tau_d(shape, k_max: int, gen: torch.Generator | None = None, device=None, k_min: int = 1,
                 flow_frac: float = 0.0):
    """Eq 4: d ~ 1/U{1, 2, 4, …, K_max}, then τ ~ U{0, d, 2d, …, 1 − d}; one pair per frame.

    k_min > 1 leaves out the largest steps: d ~ 1/U{k_min, 2·k_min, …, K_max} (see `--k-min`).
    flow_frac > 0 (not Eq 4, see `--flow-frac`): each sequence (row, the last dim of `shape` is time) is
    a flow row with probability flow_frac, where every frame has d = d_min = 1/K_max; in the other rows
    each frame draws d uniformly from the remaining step sizes {1/k_min, …, 2/K_max}. So flow_frac of
    the frames are flow frames, and only the bootstrap rows need the two half-step passes of Eq 7.
    flow_frac = 0 is the literal Eq 4, where d_min is one of the uniform choices for every frame.
    (The paper prints U{0, 1/d, …, 1 − 1/d}: a typo, PAPER.md §9.) τ = 1 is never drawn and
    1 − τ ≥ d always holds, so every division by (1 − τ) in Eq 7 is safe (PITFALLS.md 12).
    Returns τ, d: float tensors of `shape` (e.g. (B, T)).
    """
    e_lo, e_hi = int(round(math.log2(k_min))), int(round(math.log2(k_max)))  # d ∈ {1/k_min, …, 1/K_max}
    if flow_frac > 0 and e_hi > e_lo:
        e = torch.randint(e_lo, e_hi, shape, generator=gen, device=device)  # bootstrap: d ∈ {1/k_min, …, 2/K_max}
        flow = torch.rand(shape[:-1], generator=gen, device=device) < flow_frac  # flow rows: d = d_min
        e = torch.where(flow[..., None], torch.full_like(e, e_hi), e)  # (…, T)
    else:
        e = torch.randint(e_lo, e_hi + 1, shape, generator=gen, device=device)  # d = 2^−e, e uniform
    d = 2.0 ** (-e.float())
    j = (torch.rand(shape, generator=gen, device=device) * 2.0 ** e).floor()  # j ~ U{0, …, 1/d − 1}
    return j * d, d  # τ = j·d (τ = 0 is noise), d


def corrupt(noise: torch.Tensor, clean: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Eq 6: z̃ = (1 − τ)·noise + τ·clean   (τ = 1 is clean data, τ = 0 pure noise — paper convention).

    noise, clean: (B, T, N, C); tau: (B, T) per-frame signal level (or a float).
    """
    tau = tau[..., None, None] if torch.is_tensor(tau) and tau.dim() == 2 else tau  # (B, T, 1, 1)
    return (1 - tau) * noise + tau * clean


def x_to_velocity(x_hat: torch.Tensor, z: torch.Tensor, tau) -> torch.Tensor:
    """Eq 7 footnote: v̂ = (x̂₁ − z_τ)/(1 − τ): the velocity that points from z_τ to the prediction x̂₁.

    (Under τ = 1 clean, v = clean − noise.) tau: (B, T) or a float; needs τ < 1.
    """
    tau = tau[..., None, None] if torch.is_tensor(tau) and tau.dim() == 2 else tau  # (B, T, 1, 1)
    return (x_hat - z) / (1 - tau)


def ramp_weight(tau: torch.Tensor) -> torch.Tensor:
    """Eq 8: w(τ) = 0.9τ + 0.1 — 0.1 at pure noise (τ = 0), 1.0 at clean data (τ = 1)."""
    return 0.9 * tau + 0.1


def context_signal_level(ctx_tau: float, k_max: int) -> float:
    """τ_ctx snapped to the nearest point of the d_min = 1/K_max grid: 0.9 → 58/64 ≈ 0.906 (DESIGN.md §5).

    Signal level, not noise level: 0.9 means 10 % noise (the paper's "τ_ctx = 0.1", PAPER.md §9).
    """
    return round(ctx_tau * k_max) / k_max


def shift_actions(actions: torch.Tensor):
    """DESIGN.md §3: actions[t] is taken AT frame t (it leads to t+1), so the action token of step t
    carries a_{t−1}. Returns prev (B, T, A) and valid (B, T) bool; step 0 has no previous action."""
    prev = torch.cat([torch.zeros_like(actions[:, :1]), actions[:, :-1]], dim=1)  # (B, T, A)
    valid = torch.ones(actions.shape[:2], dtype=torch.bool, device=actions.device)  # (B, T)
    valid[:, 0] = False
    return prev, valid


# ==============================================================================================
# Model (§3.2 inputs, §3.4 transformer)
# ==============================================================================================


class DynamicsModel(nn.Module):
    """ẑ₁ = f_θ(z̃, τ, d, a) (Eq 6): x-prediction of the clean packed latents of every frame.

    Tokens per frame (DESIGN.md §3): [action | (τ, d) | N_z latents | S_r registers], N = 2 + N_z + S_r.
    action_classes: classes per action component (0 = continuous, embedded by a linear map).
    """

    def __init__(self, latent_tokens: int, latent_dim: int, action_classes: list[int], dim: int, depth: int,
                 heads: int, kv_heads: int, registers: int, context: int, mlp_ratio: float = 4.0,
                 soft_cap: float = 50.0, k_max: int = 64, time_every: int = 4, time_layer: int = 0):
        super().__init__()
        self.latent_tokens, self.latent_dim, self.k_max, self.window = latent_tokens, latent_dim, k_max, context
        self.action_classes = list(action_classes)
        # §3.2 actions: each component separately (lookup if categorical/binary, linear if continuous),
        # summed with a learned base embedding; the base alone means "no action".
        self.action_base = nn.Parameter(torch.randn(dim) * 0.02)
        self.action_embed = nn.ModuleList(nn.Embedding(n, dim) if n > 0 else nn.Linear(1, dim)
                                          for n in action_classes)
        # §3.2 one (τ, d) token: two discrete embeddings concatenated along channels.
        self.tau_embed = nn.Embedding(k_max + 1, dim // 2)  # τ ∈ {0, 1/K_max, …, 1}
        self.d_embed = nn.Embedding(int(round(math.log2(k_max))) + 1, dim - dim // 2)  # d ∈ {1, ½, …, 1/K_max}
        self.latent_in = nn.Linear(latent_dim, dim)  # §3.2: linear projection to the model width
        self.latent_slot = nn.Parameter(torch.randn(latent_tokens, dim) * 0.02)  # which latent token
        self.register_tokens = nn.Parameter(torch.randn(registers, dim) * 0.02)  # S_r registers (§3.4)
        self.transformer = common.SpaceTimeTransformer(dim, depth, heads, kv_heads, time_every=time_every,
                                                       time_layer=time_layer, window=context, mlp_ratio=mlp_ratio,
                                                       soft_cap=soft_cap)
        self.latent_out = nn.Linear(dim, latent_dim)  # x-prediction head
        self.spatial = slice(2, 2 + latent_tokens)  # where the latent tokens sit in a frame

    def embed_actions(self, prev_actions, valid, B: int, T: int) -> torch.Tensor:
        """Action token per frame: base + Σ_components embed(a_{t−1}); base only where not valid."""
        tok = self.action_base.expand(B, T, -1)  # (B, T, D)
        if prev_actions is None or not self.action_classes:
            return tok
        parts = [emb(prev_actions[..., c].clamp_min(0).long()) if n > 0 else emb(prev_actions[..., c:c + 1].float())
                 for c, (n, emb) in enumerate(zip(self.action_classes, self.action_embed))]  # A × (B, T, D)
        return tok + torch.stack(parts).sum(0) * valid[..., None]  # (B, T, D)

    def tokens(self, z_tilde, tau, d, prev_actions=None, act_valid=None) -> torch.Tensor:
        """Assemble the per-frame tokens. z_tilde (B, T, N_z, C_z); tau, d (B, T) on the Eq 4 grid."""
        B, T, N, C = z_tilde.shape
        assert (N, C) == (self.latent_tokens, self.latent_dim), \
            f"expected packed latents (B, T, {self.latent_tokens}, {self.latent_dim}), got {tuple(z_tilde.shape)}"
        a = self.embed_actions(prev_actions, act_valid, B, T)  # (B, T, D)
        tau_i = torch.round(tau * self.k_max).long()  # τ = i / K_max
        d_i = torch.round(-torch.log2(d)).long()  # d = 2^−i
        td = torch.cat([self.tau_embed(tau_i), self.d_embed(d_i)], dim=-1)  # (B, T, D)
        z = self.latent_in(z_tilde) + self.latent_slot  # (B, T, N_z, D)
        reg = self.register_tokens.expand(B, T, -1, -1)  # (B, T, S_r, D)
        return torch.cat([a[:, :, None], td[:, :, None], z, reg], dim=2)  # (B, T, 2 + N_z + S_r, D)

    def forward(self, z_tilde, tau, d, prev_actions=None, act_valid=None, independent=None,
                cache: common.KVCache | None = None, commit: bool = False) -> torch.Tensor:
        """Eq 6: (B, T, N_z, C_z) corrupted latents → ẑ₁ (B, T, N_z, C_z) predicted clean latents.

        prev_actions (B, T, A): a_{t−1} per frame (see shift_actions); act_valid (B, T) bool.
        independent (B,) bool: start-frame sequences (§3.4). cache/commit: see common.KVCache.
        """
        x = self.tokens(z_tilde, tau, d, prev_actions, act_valid)  # (B, T, N, D)
        h = self.transformer(x, independent=independent, cache=cache, commit=commit)  # (B, T, N, D)
        return self.latent_out(h[:, :, self.spatial])  # (B, T, N_z, C_z)


# ==============================================================================================
# Objective: shortcut forcing (Eq 7) with diffusion forcing and the ramp weight (Eq 8)
# ==============================================================================================


def shortcut_forcing_loss(f, clean: torch.Tensor, noise: torch.Tensor, tau: torch.Tensor, d: torch.Tensor,
                          k_max: int, x_clip: float = 0.0, ramp: bool = True) -> dict:
    """Eq 7, per frame, weighted by Eq 8 and averaged over all frames.

    f(z̃, τ, d, rows=None) → ẑ₁: the network (actions, start-frame flags etc. closed over); `rows`
    (a LongTensor of batch rows; None = all) says which rows z̃, τ, d hold: the two half-step passes
    run only on the rows that contain a bootstrap frame (with `--flow-frac` most rows have none).
    clean z₁, noise z₀: (B, T, N, C); tau, d: (B, T) from sample_tau_d (τ = 1 is clean).
        flow frames (d = d_min):   L = ‖ẑ₁ − z₁‖²
        bootstrap (d > d_min):     b′ = (f(z̃, τ, d/2) − z̃)/(1 − τ),   z′ = z̃ + b′·d/2
                                   b″ = (f(z′, τ + d/2, d/2) − z′)/(1 − (τ + d/2))
                                   L = (1 − τ)²·‖(ẑ₁ − z̃)/(1 − τ) − sg(b′ + b″)/2‖²
    x_clip > 0 clamps the two half-step x-predictions to [−x_clip, x_clip] before they become b′, b″
    (a safeguard, not in the paper: see the module docstring). ramp=False replaces Eq 8 by w = 1 (`--no-ramp`,
    an experiment, see the module docstring). Returns loss = mean_t w(τ_t)·L_t, its
    flow and boot parts (loss = flow + boot), and the unweighted per-frame L (B, T) for the pictures.
    """
    d_min = 1.0 / k_max
    z_tilde = corrupt(noise, clean, tau)  # Eq 6: (B, T, N, C), τ = 0 noise … τ = 1 clean
    z1_hat = f(z_tilde, tau, d)  # ẑ₁ with the full step d: (B, T, N, C)
    is_flow = d <= d_min  # (B, T)
    v_target = torch.zeros_like(z_tilde)  # sg(b′ + b″)/2, filled on the rows that have bootstrap frames
    rows = (~is_flow).any(dim=1).nonzero()[:, 0]  # (R,) rows with at least one bootstrap frame
    if len(rows):
        zt, tr, dr, fl = z_tilde[rows], tau[rows], d[rows], is_flow[rows]  # (R, T, N, C), (R, T) ×3
        clip = (lambda x: x.clamp(-x_clip, x_clip)) if x_clip > 0 else (lambda x: x)  # noqa: E731
        with torch.no_grad():  # both half-step passes are targets: sg(·), online weights (no EMA)
            half = torch.where(fl, torch.zeros_like(dr), dr / 2)  # flow frames stay put (d_min/2 is off-grid)
            d_half = torch.where(fl, dr, dr / 2)  # step size the half passes are conditioned on
            b1 = x_to_velocity(clip(f(zt, tr, d_half, rows=rows)), zt, tr)  # b′ at (z̃, τ, d/2)
            z_prime = zt + b1 * half[..., None, None]  # z′ = z̃ + b′·d/2
            tau_prime = tr + half  # τ + d/2 ≤ 1 − d/2 < 1 on the Eq 4 grid
            b2 = x_to_velocity(clip(f(z_prime, tau_prime, d_half, rows=rows)), z_prime, tau_prime)  # b″ at (z′, τ + d/2, d/2)
            v_target[rows] = ((b1 + b2) / 2).to(v_target.dtype)  # sg(b′ + b″)/2
    flow = (z1_hat - clean).pow(2).mean(dim=(-2, -1))  # ‖ẑ₁ − z₁‖²: (B, T)
    v_hat = x_to_velocity(z1_hat, z_tilde, tau)  # (ẑ₁ − z̃)/(1 − τ): (B, T, N, C)
    boot = (1 - tau) ** 2 * (v_hat - v_target.detach()).pow(2).mean(dim=(-2, -1))  # (B, T)
    per_frame = torch.where(is_flow, flow, boot)  # each frame gets exactly one of the two terms
    w = ramp_weight(tau) if ramp else torch.ones_like(tau)  # Eq 8 on both terms (DESIGN.md §5)
    n = per_frame.numel()
    return {"loss": (w * per_frame).mean(),
            "flow": (w * per_frame * is_flow).sum().detach() / n,
            "boot": (w * per_frame * ~is_flow).sum().detach() / n,
            "per_frame": per_frame.detach()}


def forcing_batch(latents: torch.Tensor, actions, k_max: int, start_frac: float, gen: torch.Generator,
                  k_min: int = 1, flow_frac: float = 0.0, ctx_frac: float = 0.0, ctx_tau: float = 0.9) -> dict:
    """Diffusion-forcing inputs of one batch.

    latents (B, T, N_b, D_b) unpacked → clean (B, T, N_z, 2·D_b) packed (App A); per-frame (τ, d) (Eq 4);
    noise z₀; start-frame rows (§3.4: `start_frac` of the sequences are independent images, with
    no action); action tokens a_{t−1} (DESIGN.md §3; None for unlabelled clips).
    """
    clean = pack(latents)  # (B, T, N_z, C_z)
    B, T = clean.shape[:2]
    dev = clean.device
    tau, d = sample_tau_d((B, T), k_max, gen, dev, k_min, flow_frac)  # (B, T) each
    noise = torch.randn(clean.shape, generator=gen, device=dev)  # z₀ ~ N(0, I)
    independent = torch.zeros(B, dtype=torch.bool, device=dev)
    independent[torch.randperm(B, generator=gen, device=dev)[:round(start_frac * B)]] = True  # (B,)
    if ctx_frac > 0:  # sampling-setting rows (not in the paper, `--ctx-frac`): history at τ_ctx, last frame from Eq 4
        ctx = (torch.rand(B, generator=gen, device=dev) < ctx_frac) & ~independent  # (B,)
        tau[ctx, :-1], d[ctx, :-1] = context_signal_level(ctx_tau, k_max), 1.0 / k_max
    if actions is None:
        prev, valid = None, torch.zeros(B, T, dtype=torch.bool, device=dev)
    else:
        prev, valid = shift_actions(actions)  # (B, T, A), (B, T)
        valid = valid & ~independent[:, None]  # an independent image is a frame 0: no action
    return {"clean": clean, "noise": noise, "tau": tau, "d": d, "independent": independent,
            "prev_actions": prev, "act_valid": valid}


def row_select(fb: dict, rows=None) -> tuple:
    """(prev_actions, act_valid, independent) of a forcing batch, for the given rows (None: all)."""
    keys = ("prev_actions", "act_valid", "independent")
    return tuple(fb[k] if rows is None or fb[k] is None else fb[k][rows] for k in keys)


# ==============================================================================================
# Sampling (Eq 2 in x-prediction form), autoregressive rollouts with the KV cache
# ==============================================================================================


def sample_frame(f, noise: torch.Tensor, k: int) -> torch.Tensor:
    """Denoise one frame with K shortcut steps of d = 1/K, from τ = 0 (pure noise) to τ = 1.

    f(z, τ, d) → ẑ₁. Eq 2 with the velocity from x-prediction: z ← z + (ẑ₁ − z)·d/(1 − τ).
    At the last step τ = 1 − d, so z becomes ẑ₁ exactly.
    """
    d = 1.0 / k
    z = noise
    for i in range(k):
        tau = i * d  # signal level of z before this step
        z1_hat = f(z, tau, d)
        z = z + x_to_velocity(z1_hat, z, tau) * d  # z_{τ+d} = z_τ + v̂·d
    return z


@torch.no_grad()
def rollout(model: DynamicsModel, context: torch.Tensor, actions, horizon: int, k: int, ctx_tau: float,
            gen: torch.Generator, use_cache: bool = True) -> torch.Tensor:
    """Open-loop generation of `horizon` frames after `context`, frame by frame.

    context: (B, T_c, N_z, C_z) clean packed latents; actions: (B, T_c + horizon, A) in dataset
    convention (a_t taken at frame t) or None. K = k steps per frame (a power of two ≤ K_max).
    Context and generated frames enter the history at signal level τ_ctx (context_signal_level).
    use_cache=False recomputes the whole history at every step (the reference the cache must equal).
    Returns (B, horizon, N_z, C_z) generated clean latents.
    """
    assert k & (k - 1) == 0 and 1 <= k <= model.k_max, f"K must be a power of two ≤ {model.k_max}, got {k}"
    B, Tc, N, C = context.shape
    T, dev = Tc + horizon, context.device
    if actions is None:
        prev, valid = None, torch.zeros(B, T, dtype=torch.bool, device=dev)
    else:
        prev, valid = shift_actions(actions[:, :T])  # (B, T, A), (B, T)
    tau_c, d_c = context_signal_level(ctx_tau, model.k_max), 1.0 / model.k_max
    # All noise drawn up front, so the cached and uncached paths consume the same numbers.
    ctx_noise = torch.randn(B, T, N, C, generator=gen, device=dev)  # corruption of the history
    init_noise = torch.randn(B, horizon, N, C, generator=gen, device=dev)  # z at τ = 0 per new frame
    full = lambda t, v: torch.full((B, t), float(v), device=dev)  # noqa: E731  (B, t) constant τ or d
    pa = lambda s, e: None if prev is None else prev[:, s:e]  # noqa: E731
    history = corrupt(ctx_noise[:, :Tc], context, tau_c)  # (B, T_c, N, C) what the model sees of the past
    cache = common.KVCache(model.window) if use_cache else None
    if use_cache and Tc > 0:
        model(history, full(Tc, tau_c), full(Tc, d_c), pa(0, Tc), valid[:, :Tc], cache=cache, commit=True)
    frames = []
    for t in range(Tc, T):
        if use_cache:  # only the new frame's tokens; it attends to the cached history
            def f(z, tau, d):
                return model(z, full(1, tau), full(1, d), pa(t, t + 1), valid[:, t:t + 1], cache=cache)
        else:  # recompute everything: history at τ_ctx, then the frame being denoised
            def f(z, tau, d):
                x = torch.cat([history, z], dim=1)  # (B, t + 1, N, C)
                taus = torch.cat([full(t, tau_c), full(1, tau)], 1)
                ds = torch.cat([full(t, d_c), full(1, d)], 1)
                return model(x, taus, ds, pa(0, t + 1), valid[:, :t + 1])[:, -1:]
        z1 = sample_frame(f, init_noise[:, t - Tc:t - Tc + 1], k)  # (B, 1, N, C)
        frames.append(z1)
        if t < T - 1:  # write the new frame into the history at τ_ctx
            h_t = corrupt(ctx_noise[:, t:t + 1], z1, tau_c)  # (B, 1, N, C)
            if use_cache:
                model(h_t, full(1, tau_c), full(1, d_c), pa(t, t + 1), valid[:, t:t + 1], cache=cache, commit=True)
            else:
                history = torch.cat([history, h_t], dim=1)
    return torch.cat(frames, dim=1)  # (B, horizon, N, C)


# ==============================================================================================
# Evaluation and pictures
# ==============================================================================================


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def generation_speed(model: DynamicsModel, device, k: int, ctx_tau: float, n_frames: int, n_actions: int) -> dict:
    """Frames/s at batch 1 with the KV cache (K = k), and cached vs uncached at 32 context frames.

    Speed does not depend on content, so random latents and actions are used.
    """
    gen = torch.Generator(device).manual_seed(0)
    z = lambda T: torch.tanh(torch.randn(1, T, model.latent_tokens, model.latent_dim, device=device))  # noqa: E731
    acts = lambda T: torch.zeros(1, T, n_actions, dtype=torch.long, device=device) if n_actions else None  # noqa: E731

    def timed(Tc, n, use_cache):
        _sync(device)
        t0 = time.time()
        with common.autocast(device):
            rollout(model, z(Tc), acts(Tc + n), n, k, ctx_tau, gen, use_cache)
        _sync(device)
        return time.time() - t0

    timed(8, 2, True)  # warm-up
    fps = n_frames / timed(8, n_frames, True)
    n = max(2, min(8, n_frames))
    t_cached, t_uncached = timed(32, n, True), timed(32, n, False)
    return {"gen_fps": fps, "gen_fps_ctx32_uncached": n / t_uncached, "gen_fps_ctx32_cached": n / t_cached,
            "cache_speedup_ctx32": t_uncached / t_cached}


@torch.no_grad()
def evaluate_rollouts(model: DynamicsModel, tok, held: LatentCache, a: Args, device) -> dict:
    """Held-out open-loop rollouts in pixel space (DESIGN.md §7): context 8, generate 16, true actions.

    PSNR per horizon for K = sample_k and K = K_max, the repeat-last-context-frame baseline, the
    rollout with shuffled actions (the action-shuffle gap, PITFALLS.md 8) and the tokenizer's own
    reconstruction of the true frames (the ceiling the dynamics cannot beat).

    How PSNR is averaged (not in paper): `psnr_<name>_per_horizon[h]` = 10·log10(1 / MSE_h), MSE_h the
    squared pixel error averaged over all held-out windows at horizon h; `psnr_<name>` averages those dB
    over the horizons. The mean of per-frame PSNRs (`psnr_<name>_frame_mean`, also written) cannot rank
    a copy baseline: a frame where nothing changed is copied exactly, its PSNR is infinite (clamped to
    100 dB), and at horizon 1 a quarter of the held-out frames are unchanged — that alone lifts the
    pixel copy baseline by ≈ 3.5 dB, while a decoded rollout never scores an exact frame.
    """
    Tc, H = a.eval_context, a.eval_horizon
    held.rng = np.random.default_rng([a.seed, 999])  # the same held-out windows every evaluation
    batch = held.sample(a.eval_seqs, Tc + H, with_frames=True)
    lat = batch["latents"].to(device)  # (B, T, N_b, D_b)
    actions = None if batch["actions"] is None else batch["actions"].to(device)  # (B, T, A)
    true = batch["frames"].to(device).float() / 255  # (B, T, H, W, 3)
    ctx = pack(lat[:, :Tc])  # (B, T_c, N_z, C_z)
    out = {}

    def score(name, x):  # x: (B, H, H_px, W_px, 3) frames for the H generated steps
        out[f"psnr_{name}_per_horizon"] = psnr_of_mean_mse(x, true[:, Tc:]).tolist()  # (H,)
        out[f"psnr_{name}"] = float(np.mean(out[f"psnr_{name}_per_horizon"]))
        out[f"psnr_{name}_frame_mean"] = float(psnr(x, true[:, Tc:]).mean())

    def decode(z_gen):  # the tokenizer decoder is causal: decode context + rollout in one pass
        with common.autocast(device):
            return tok.decode(torch.cat([lat[:, :Tc], unpack(z_gen.to(lat.dtype))], 1)).float()[:, Tc:].clamp(0, 1)

    def run(k, acts):
        gen = torch.Generator(device).manual_seed(a.seed)  # the same noise for every K and action set
        with common.autocast(device):
            z = rollout(model, ctx, acts, H, k, a.ctx_tau, gen).float()  # (B, H, N_z, C_z)
        out[f"latent_mse_k{k}" + ("" if acts is actions else "_shuffled")] = float((z - pack(lat[:, Tc:])).pow(2).mean())
        return decode(z)  # (B, H, H_px, W_px, 3)

    pix = {k: run(k, actions) for k in sorted({a.sample_k, a.k_max})}
    for k, x in pix.items():
        score(f"k{k}", x)
    # Latent-space errors do not depend on the decoder's quality.
    out["latent_mse_repeat_last"] = float((ctx[:, -1:] - pack(lat[:, Tc:])).pow(2).mean())
    score("repeat_last", true[:, Tc - 1:Tc].expand_as(true[:, Tc:]))
    # The same baseline through the decoder: repeat the last context latent (same decoder error as a rollout).
    score("repeat_last_decoded", decode(ctx[:, -1:].expand(-1, H, -1, -1)))
    with common.autocast(device):
        recon = tok.decode(lat).float().clamp(0, 1)  # (B, T, H, W, 3) the tokenizer's reconstruction
    score("tokenizer_ceiling", recon[:, Tc:])
    if actions is not None and actions.shape[0] > 1:
        shuffled = actions.clone()  # from the action that leads into the first generated frame on
        shuffled[:, Tc - 1:] = actions[torch.roll(torch.arange(actions.shape[0]), 1), Tc - 1:]
        score("shuffled", run(a.sample_k, shuffled))
        # What a perfect world model would score: the environment itself, replayed to the last context
        # frame and stepped with the true or the shuffled actions, with fresh draws for what nobody
        # controls (one sample, like a rollout). Built-in datasets only (data.simulate_future).
        sim = [data.simulate_future(held.data_root, i, s + Tc - 1, [p[Tc - 1:Tc - 1 + H].cpu().numpy() for p in plans],
                                    rng_seed=(a.seed, j), meta=held.meta)  # [true, shuffled] per window, or None
               for j, (i, s, *plans) in enumerate(zip(batch["episode_ids"], batch["episode_starts"], actions, shuffled))]
        if all(x is not None for x in sim):
            for n, name in enumerate(("simulator", "simulator_shuffled")):
                score(name, torch.from_numpy(np.stack([x[n] for x in sim])).to(device).float() / 255)  # (B, H, H_px, W_px, 3)
            out["action_shuffle_gap_simulator_db"] = out["psnr_simulator"] - out["psnr_simulator_shuffled"]
        out["action_shuffle_gap_db"] = out[f"psnr_k{a.sample_k}"] - out["psnr_shuffled"]
    out["_pictures"] = (true, torch.cat([recon[:, :Tc], pix[a.sample_k]], 1))  # for the figures only
    return out


@torch.no_grad()
def action_probe(model: DynamicsModel, held: LatentCache, a: Args, device, T: int = 8) -> dict:
    """Action use without sampling noise (PITFALLS.md 8; not in paper): T − 1 held-out history frames at
    τ_ctx, the last from pure noise in one pass (τ = 0, d = d_min: the regression mean). Latent MSE with
    the true vs a shuffled last action where they differ, beside copying the last history frame."""
    held.rng = np.random.default_rng([a.seed, 997])
    n = 8 * a.eval_seqs  # 256 windows at the cpu preset
    batch = held.sample(n, T)
    if batch["actions"] is None:
        return {}
    clean, acts = pack(batch["latents"].to(device)), batch["actions"].to(device)  # (B, T, N_z, C_z), (B, T, A)
    shuffled = acts.clone()
    shuffled[:, T - 2] = acts[torch.roll(torch.arange(n), 1), T - 2]  # a_{T−2} leads into the last frame
    differs = (shuffled[:, T - 2] != acts[:, T - 2]).any(-1)  # (B,)
    if not differs.any():  # (tiny held-out splits)
        return {}
    tau = torch.full((n, T), context_signal_level(a.ctx_tau, a.k_max), device=device)  # history at τ_ctx ...
    tau[:, -1] = 0.0  # ... and the frame to predict from pure noise
    d = torch.full((n, T), 1.0 / a.k_max, device=device)
    noise = torch.randn(clean.shape, generator=torch.Generator(device).manual_seed(a.seed + 997), device=device)
    z_tilde = corrupt(noise, clean, tau)  # Eq 6, τ = 1 clean
    out = {}
    for name, ac in (("true", acts), ("shuffled", shuffled)):
        with common.autocast(device):
            z1_hat = model(z_tilde, tau, d, *shift_actions(ac)).float()[:, -1]  # (B, N_z, C_z)
        out[f"probe_mse_{name}"] = float((z1_hat - clean[:, -1]).pow(2).mean((-2, -1))[differs].mean())
    out["probe_mse_copy"] = float((clean[:, -2] - clean[:, -1]).pow(2).mean((-2, -1))[differs].mean())
    out["probe_action_cost"] = out["probe_mse_shuffled"] / out["probe_mse_true"] - 1  # 0 = actions ignored
    return out


@torch.no_grad()
def loss_by_tau_d(model: DynamicsModel, held: LatentCache, a: Args, device, repeats: int = 4) -> dict:
    """Unweighted Eq 7 per-frame loss on held-out data, grouped by d and by τ (8 bins), drawn as in training
    (Eq 4 with the run's --flow-frac and --k-min)."""
    held.rng = np.random.default_rng([a.seed, 998])
    gen = torch.Generator(device).manual_seed(a.seed + 998)
    taus, ds, losses = [], [], []
    for _ in range(repeats):
        batch = held.sample(max(2, a.eval_seqs // 2), a.seq_len)
        acts = None if batch["actions"] is None else batch["actions"].to(device)
        fb = forcing_batch(batch["latents"].to(device), acts, a.k_max, 0.0, gen, a.k_min, a.flow_frac)
        f = lambda z, tau, d, rows=None: model(z, tau, d, *row_select(fb, rows)).float()  # noqa: E731
        with common.autocast(device):
            terms = shortcut_forcing_loss(f, fb["clean"], fb["noise"], fb["tau"], fb["d"], a.k_max, a.boot_clip)
        taus.append(fb["tau"].flatten()), ds.append(fb["d"].flatten()), losses.append(terms["per_frame"].flatten())
    tau, d, loss = torch.cat(taus).cpu(), torch.cat(ds).cpu(), torch.cat(losses).float().cpu()
    by_d = {f"1/{round(1 / float(v))}": float(loss[d == v].mean()) for v in sorted(d.unique().tolist(), reverse=True)}
    bins = (tau * 8).floor().clamp(max=7)
    by_tau = {"flow": [], "boot": []}
    for name, sel in (("flow", d == 1.0 / a.k_max), ("boot", d > 1.0 / a.k_max)):
        for b in range(8):
            m = sel & (bins == b)
            by_tau[name].append(float(loss[m].mean()) if m.any() else None)
    return {"loss_by_d": by_d, "loss_by_tau_bin": by_tau}


def save_pictures(ev: dict, probe: dict | None, n_ctx: int, out: str, a: Args) -> None:
    """rollout.png (rows: true | generated | |error|×4; context framed green, generated red), rollout.gif,
    rollout_psnr.png (PSNR per horizon against the baselines), loss_tau_d.png (loss per τ and per d)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    true, gen = (x[:4].cpu().numpy() for x in ev["_pictures"])  # (S, T, H, W, 3) each
    S, T, Hp, Wp, _ = true.shape  # gen[:, :n_ctx] is the tokenizer's reconstruction of the context
    p = 2  # border width
    green, red, grey = np.array([0.1, 0.8, 0.1]), np.array([0.9, 0.1, 0.1]), np.array([0.5, 0.5, 0.5])

    def tile(img, color):
        framed = np.ones((Hp + 2 * p, Wp + 2 * p, 3)) * color
        framed[p:-p, p:-p] = img
        return framed

    rows = []
    for s in range(S):
        err = np.abs(gen[s] - true[s]).mean(-1, keepdims=True).repeat(3, -1) * 4
        rows.append(np.concatenate([tile(true[s, t], green if t < n_ctx else grey) for t in range(T)], 1))
        rows.append(np.concatenate([tile(gen[s, t], green if t < n_ctx else red) for t in range(T)], 1))
        rows.append(np.concatenate([tile(np.clip(err[t], 0, 1), grey) for t in range(T)], 1))
    canvas = np.concatenate(rows, 0)  # (3·S·(H+2p), T·(W+2p), 3)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * T), max(3, 1.8 * S)))
    ax.imshow(canvas, interpolation="nearest")
    h = Hp + 2 * p
    ax.set_yticks([h * (i + 0.5) for i in range(3 * S)], ["true", f"decoded, K={a.sample_k}", "|err|×4"] * S,
                  fontsize=7)
    ax.set_xticks([(Wp + 2 * p) * (t + 0.5) for t in range(T)], [str(t - n_ctx + 1) for t in range(T)], fontsize=6)
    ax.set_title(f"held-out open-loop rollouts, true actions: {n_ctx} context frames (green; second row: "
                 f"tokenizer reconstruction), generated (red)", fontsize=9)
    fig.tight_layout(), fig.savefig(os.path.join(out, "rollout.png"), dpi=100), plt.close(fig)

    scale = max(1, 128 // Hp)  # GIF: true | generated side by side per sequence, one GIF frame per time step
    gif = []
    for t in range(T):
        row = np.concatenate([np.concatenate([tile(true[s, t], green if t < n_ctx else grey),
                                              tile(gen[s, t], green if t < n_ctx else red)], 1) for s in range(S)], 1)
        img = Image.fromarray((np.clip(row, 0, 1) * 255).astype(np.uint8))
        gif.append(img.resize((img.width * scale, img.height * scale), Image.NEAREST))
    gif[0].save(os.path.join(out, "rollout.gif"), save_all=True, append_images=gif[1:], duration=200, loop=0)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    hz = np.arange(1, len(ev["psnr_repeat_last_per_horizon"]) + 1)
    for key, label in ((f"psnr_k{a.sample_k}_per_horizon", f"K = {a.sample_k}"),
                       (f"psnr_k{a.k_max}_per_horizon", f"K = {a.k_max}"),
                       ("psnr_shuffled_per_horizon", f"K = {a.sample_k}, shuffled actions"),
                       ("psnr_repeat_last_per_horizon", "repeat last context frame"),
                       ("psnr_repeat_last_decoded_per_horizon", "repeat last context latent, decoded")):
        if key in ev:
            ax.plot(hz, ev[key], "o-", ms=3, label=label)
    ax.axhline(ev["psnr_tokenizer_ceiling"], color="k", ls=":", label="tokenizer reconstruction")
    ax.set_xlabel("frames after the context"), ax.set_ylabel("PSNR of the mean squared error (dB)"), ax.legend(fontsize=7)
    fig.tight_layout(), fig.savefig(os.path.join(out, "rollout_psnr.png"), dpi=100), plt.close(fig)

    if probe is not None:
        fig, (l, r) = plt.subplots(1, 2, figsize=(9, 3.2))
        centres = (np.arange(8) + 0.5) / 8
        for name, vals in probe["loss_by_tau_bin"].items():
            l.plot(centres, [np.nan if v is None else v for v in vals], "o-", label=f"{name} frames")
        l.set_yscale("log"), l.set_xlabel("signal level τ (0 = noise, 1 = clean)"), l.set_ylabel("Eq 7 loss")
        l.legend(fontsize=7)
        r.bar(list(probe["loss_by_d"]), list(probe["loss_by_d"].values()))
        r.set_yscale("log"), r.set_xlabel("step size d"), r.set_title("unweighted loss per d", fontsize=9)
        fig.tight_layout(), fig.savefig(os.path.join(out, "loss_tau_d.png"), dpi=100), plt.close(fig)


# ==============================================================================================
# Training
# ==============================================================================================


def batch_shape(step: int, a: Args) -> tuple[int, int]:
    """§3.4 alternating batch lengths: short T₁ ≤ C, every `long_every`-th step long T₂ > C, and long
    batches only for the final `long_only_frac` of training. Returns (batch size, sequence length)."""
    long_only = step >= int(a.steps * (1 - a.long_only_frac))
    return (a.batch_long, a.seq_len_long) if long_only or (step + 1) % a.long_every == 0 else (a.batch, a.seq_len)


def build_model(a: dict, latent_tokens: int, latent_dim: int, action_classes: list[int]) -> DynamicsModel:
    """Rebuild the model from a plain args dict (as stored in the checkpoint)."""
    return DynamicsModel(latent_tokens, latent_dim, action_classes, a["dim"], a["depth"], a["heads"], a["kv_heads"],
                         a["registers"], a["context"], a["mlp_ratio"], a["soft_cap"], a["k_max"],
                         a.get("time_every", 4), a.get("time_layer", -1))


def load_dynamics(path: str = "runs/dynamics/ckpt.pt", device="cpu"):
    """The trained dynamics model for later stages (its EMA weights when the run kept them).
    Returns (model, checkpoint dict)."""
    ckpt = common.load_checkpoint(path, "dynamics", "python dynamics.py")
    model = build_model(ckpt["args"], *ckpt["shapes"]["latent"], ckpt["shapes"]["action_classes"])
    model.load_state_dict(ckpt.get("ema") or ckpt["model"])
    return model.to(device), ckpt


def ema_update(ema: nn.Module, model: nn.Module, step: int, decay: float) -> None:
    """θ_ema ← β·θ_ema + (1 − β)·θ after optimiser step `step` (1, 2, …), β = min(decay, (1 + step)/(10 + step)).

    The warm-up of β keeps a short run's average from being dominated by the random initialisation.
    Not in the paper (PAPER.md §12 lists the weight EMA as unspecified); usual for diffusion models,
    whose samples are sensitive to the last steps' gradient noise.
    """
    beta = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), model.parameters()):
            pe.lerp_(p, 1 - beta)


# What --eval-only takes from the command line (--out always, the others when typed); the rest comes from the
# checkpoint's args, so a moved run folder is evaluated and written where it is now.
EVAL_FIELDS = ("out", "sample_k", "ctx_tau", "eval_seqs", "eval_context", "eval_horizon", "fps_frames", "seed",
               "device")


def train(a: Args) -> dict:
    ckpt_path, ckpt = os.path.join(a.out, "ckpt.pt"), None
    if a.eval_only:  # rebuild the trained run's model and data from its checkpoint, keep the evaluation flags
        ckpt = common.load_checkpoint(ckpt_path, "dynamics", f"python dynamics.py --out {a.out}")
        a = Args(**{**{k: v for k, v in ckpt["args"].items() if k in Args.__dataclass_fields__},
                    **{k: getattr(a, k) for k in EVAL_FIELDS if k == "out" or k in getattr(a, "_given", EVAL_FIELDS)},
                    "eval_only": True, "resume": True})
    common.seed_everything(a.seed)
    device = common.pick_device(a.device)
    os.makedirs(a.out, exist_ok=True)
    assert a.seq_len <= a.context < a.seq_len_long, \
        f"§3.4 needs T₁ ≤ C < T₂, got T₁ = {a.seq_len}, C = {a.context}, T₂ = {a.seq_len_long}"

    # Parent: the frozen tokenizer and its latent cache (DESIGN.md §2).
    tok, tok_ckpt = load_tokenizer(a.tokenizer, device)
    tok_dir = os.path.dirname(os.path.abspath(a.tokenizer))
    train_data = LatentCache(tok_dir, "train", seed=a.seed)
    held = LatentCache(tok_dir, "heldout", seed=a.seed + 1)
    action_classes = [int(n) for _, n in train_data.meta.get("action_components", [])]
    if train_data.actions is None:
        print("note: the dataset has no actions: training an unconditional video model (base action embedding only)")
    shapes = {"latent": [tok.n_latents // 2, 2 * tok.latent_dim], "action_classes": action_classes}

    model = build_model(asdict(a), *shapes["latent"], action_classes).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"dynamics: {n_params / 1e6:.2f}M parameters; per frame 1 action + 1 (τ, d) + {shapes['latent'][0]} latent "
          f"(×{shapes['latent'][1]} ch) + {a.registers} register tokens; C = {a.context}, T₁ = {a.seq_len}, "
          f"T₂ = {a.seq_len_long}")
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay, betas=(0.9, 0.95))
    ema = copy.deepcopy(model).requires_grad_(False) if a.ema > 0 else None  # the weights that sample
    norm = common.RunningRMS()
    step = 0
    if a.resume:  # (--eval-only has read the checkpoint already)
        ckpt = ckpt or common.load_checkpoint(ckpt_path, "dynamics", f"python dynamics.py --out {a.out}")
        model.load_state_dict(ckpt["model"])
        if ema is not None:
            ema.load_state_dict(ckpt.get("ema") or ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        norm.load_state_dict(ckpt["normalizers"]["loss"])
        step = ckpt["step"]
        print(f"resumed from {ckpt_path} at step {step}")
    if not a.eval_only:
        common.write_json(os.path.join(a.out, "args.json"), asdict(a))
    print("args:", json.dumps(asdict(a)))
    fwd = torch.compile(model) if a.compile else model
    log = None if a.eval_only else common.MetricsLog(a.out, a.steps, resume=a.resume)

    def save(step):
        common.save_checkpoint(ckpt_path, {
            "format_version": FORMAT_VERSION, "stage": "dynamics", "step": step, "model": model.state_dict(),
            "ema": None if ema is None else ema.state_dict(), "optimizer": opt.state_dict(), "normalizers": {"loss": norm.state_dict()}, "args": asdict(a),
            "shapes": shapes, "parent": {"stage": "tokenizer", "path": os.path.abspath(a.tokenizer),
                                         "step": tok_ckpt["step"]}})

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    gen = torch.Generator(device)
    t_start, steps_run, frames_run, frames_log, steps_log = time.time(), 0, 0, 0, 0
    while step < a.steps and not a.eval_only:
        # Per-step streams seeded from (seed, step): the data and the noise do not depend on model
        # initialisation, and --resume sees exactly the batches an uninterrupted run sees.
        train_data.rng = np.random.default_rng([a.seed, step])
        gen.manual_seed(a.seed * 1_000_003 + step)
        B, T = batch_shape(step, a)
        batch = train_data.sample(B, T)
        acts = None if batch["actions"] is None else batch["actions"].to(device)
        fb = forcing_batch(batch["latents"].to(device), acts, a.k_max, a.start_frac, gen, a.k_min, a.flow_frac,
                           a.ctx_frac, a.ctx_tau)

        def f(z, tau, d, rows=None):  # ẑ₁ = f_θ(z̃, τ, d, a) with this batch's actions and start-frame rows
            return fwd(z, tau, d, *row_select(fb, rows)).float()

        for g in opt.param_groups:
            g["lr"] = common.lr_at(step, a.lr, a.warmup, a.steps)
        with common.autocast(device):
            terms = shortcut_forcing_loss(f, fb["clean"], fb["noise"], fb["tau"], fb["d"], a.k_max, a.boot_clip,
                                          a.ramp)
        common.check_finite(step, loss=terms["loss"])
        loss = norm(terms["loss"])  # ÷ running RMS (§3 intro)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
        opt.step()
        step, steps_run = step + 1, steps_run + 1
        if ema is not None:
            ema_update(ema, model, step, a.ema)
        frames_run, frames_log, steps_log = frames_run + B * T, frames_log + B * T, steps_log + 1
        if step % a.log_every == 0 or step == a.steps:
            log.log(step, {"loss": terms["loss"].detach(), "flow": terms["flow"], "boot": terms["boot"], "grad_norm": gnorm,
                           "lr": common.lr_at(step - 1, a.lr, a.warmup, a.steps)}, frames_per_step=frames_log // steps_log)
            frames_log, steps_log = 0, 0
        if steps_run == 5 and device.type == "cpu" and a.preset == "default":
            eta = (time.time() - t_start) / 5 * (a.steps - step) / 60
            print(f"!! the default preset is sized for a GPU: on this CPU it would take about {eta:.0f} min. "
                  f"Try --preset cpu (≤ 15 min on 2 cores).")
        if step % a.ckpt_every == 0 or step == a.steps or step == a.stop_at:
            save(step)
        if a.stop_at and step >= a.stop_at:
            print(f"stopping at step {step} (--stop-at); continue with --resume")
            return {}
    wall = time.time() - t_start

    # Final evaluation, pictures, summary.json (DESIGN.md §7). --eval-only keeps the training figures.
    summary_path = os.path.join(a.out, "summary.json")
    if a.eval_only:
        summary = {"stage": "dynamics", "steps": step}
        if os.path.exists(summary_path):
            with open(summary_path) as fh:
                summary = json.load(fh)
        summary.update({"eval_only": True, "sample_k": a.sample_k, "ctx_tau_used": context_signal_level(a.ctx_tau, a.k_max),
                        "eval_context": a.eval_context, "eval_horizon": a.eval_horizon, "eval_seqs": a.eval_seqs})
    else:
        summary = {
            "stage": "dynamics", "preset": a.preset, "device": str(device),
            "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "steps": step, "steps_this_run": steps_run, "wall_s": wall, "steps_per_s": steps_run / max(wall, 1e-9),
            "frames_per_s": frames_run / max(wall, 1e-9), "peak_mem_gb": common.peak_memory_gb(device),
            "params_m": n_params / 1e6, "sample_k": a.sample_k, "k_max": a.k_max,
            "ctx_tau_used": context_signal_level(a.ctx_tau, a.k_max), "eval_context": a.eval_context,
            "eval_horizon": a.eval_horizon, "eval_seqs": a.eval_seqs,
        }
    model = ema if ema is not None else model  # evaluate (and sample with) the EMA weights
    model.eval()
    if a.eval_seqs > 0:
        t0 = time.time()
        ev = evaluate_rollouts(model, tok, held, a, device)
        probe = loss_by_tau_d(model, held, a, device)
        act_probe = action_probe(model, held, a, device)
        save_pictures(ev, probe, a.eval_context, a.out, a)
        n_act = 0 if train_data.actions is None else len(action_classes)
        summary.update({k: v for k, v in ev.items() if not k.startswith("_")}, **probe,
                       **act_probe, **generation_speed(model, device, a.sample_k, a.ctx_tau, a.fps_frames, n_act))
        summary["eval_s"] = time.time() - t0
        print(f"eval: rollout PSNR K={a.sample_k} {summary[f'psnr_k{a.sample_k}']:.2f} dB | K={a.k_max} "
              f"{summary[f'psnr_k{a.k_max}']:.2f} dB | repeat-last {summary['psnr_repeat_last']:.2f} dB "
              f"(decoded {summary['psnr_repeat_last_decoded']:.2f}, tokenizer ceiling "
              f"{summary['psnr_tokenizer_ceiling']:.2f}) | "
              f"shuffle gap {summary.get('action_shuffle_gap_db', float('nan')):.2f} dB | one-step probe "
              f"{summary.get('probe_mse_true', float('nan')):.4f} vs shuffled {summary.get('probe_mse_shuffled', float('nan')):.4f} "
              f"(copy {summary.get('probe_mse_copy', float('nan')):.4f}) | the environment itself "
              f"{summary.get('psnr_simulator', float('nan')):.2f} dB, shuffle gap "
              f"{summary.get('action_shuffle_gap_simulator_db', float('nan')):.2f} dB | latent MSE K={a.sample_k} "
              f"{summary[f'latent_mse_k{a.sample_k}']:.4f} vs repeat-last {summary['latent_mse_repeat_last']:.4f} | "
              f"{summary['gen_fps']:.0f} frames/s (batch 1, K={a.sample_k}, cache) | "
              f"cache speed-up ×{summary['cache_speedup_ctx32']:.1f} at 32 context frames")
    common.write_json(summary_path, summary)
    print("summary:", json.dumps(summary))
    return summary


def main():
    train(common.parse_args(Args, PRESETS))


if __name__ == "__main__":
    main()
