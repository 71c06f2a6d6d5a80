"""Stage 1b — interactive dynamics with shortcut forcing (Dreamer 4 §3.2, Eqs 1–4, 6–8; §3.4).

The dynamics model predicts the next frame's latents from the past frames and the actions: a
diffusion-forcing transformer over the frozen tokenizer's latents, where every frame has its own
signal level τ_t (τ = 0 noise, τ = 1 clean, as in the paper) and step size d_t. It predicts the
clean latents ẑ₁ (x-prediction), and shortcut forcing makes K = 4 sampling steps per frame enough
(Fig 8). Token layout, action indexing and packing: docs/conventions.md.

Reads:  runs/tokenizer/ckpt.pt and its latent cache runs/tokenizer/latents/ (`python tokenizer.py`).
Writes: runs/dynamics/  ckpt.pt, args.json, metrics.jsonl, summary.json, and the pictures of
        dynamics_eval.py: rollout.png, rollout.gif, rollout_psnr.png, loss_tau_d.png.

Run:
    python dynamics.py                   # default preset: 64×64, one GPU
    python dynamics.py --preset cpu      # 32×32, ≈ 14 min on 2 CPU cores (after tokenizer.py
                                         # --preset cpu); its laptop-sized choices:
                                         # docs/deviations.md#the-cpu-preset
    python dynamics.py --preset smoke    # seconds; used by the tests
    python dynamics_eval.py runs/cpu/dynamics --eval-seqs 128   # re-evaluate a finished run

Equation map:
    Eq 4   d ~ 1/U{1, 2, 4, …, K_max},  τ ~ U{0, d, …, 1 − d}     -> sample_tau_d
    Eq 1,6 z̃ = (1 − τ)·z₀ + τ·z₁,  ẑ₁ = f_θ(z̃, τ, d, a)          -> corrupt, DynamicsModel
    Eq 7   footnote: v̂ = (ẑ₁ − z̃)/(1 − τ)                        -> x_to_velocity
    Eq 3,7 shortcut forcing: flow term at d = d_min, bootstrap
           term (1 − τ)²·‖v̂ − sg(b′ + b″)/2‖² above it             -> shortcut_forcing_loss
    Eq 8   w(τ) = 0.9τ + 0.1                                      -> ramp_weight, tau_weight
    Eq 2   Euler in x-form: z ← z + (ẑ₁ − z)·d/(1 − τ)             -> sample_frame, rollout
    §3.4   start frames, two batch lengths, KV cache              -> forcing_batch, batch_shape

Deviations from the paper and choices it leaves open: docs/deviations.md (section `dynamics.py`).
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
from tokenizer import (LatentCache, latent_grid, load_tokenizer, pack, psnr, psnr_of_mean_mse,
                       unpack)


@dataclass
class Args:
    preset: str = "default"  # smoke | cpu | default (one GPU, 64×64)
    tokenizer: str = "runs/tokenizer/ckpt.pt"  # parent checkpoint, written by `python tokenizer.py`
    out: str = "runs/dynamics"  # run folder: checkpoint, metrics, summary, pictures
    dim: int = 384  # model width D (not in paper)
    depth: int = 8  # transformer layers (not in paper)
    time_every: int = 4  # every n-th layer attends over time (§3.4: 4)
    time_layer: int = 0  # which layer of a group attends over time: 0 first, -1 last (not in paper)
    space_rope_base: float = 0.0  # 2-D RoPE over the latent lattice in space layers; 0 = off
    heads: int = 8  # query heads (not in paper)
    kv_heads: int = 2  # key/value heads: GQA in every attention layer (§3.4; ratio not in paper)
    registers: int = 4  # S_r register tokens per frame (§3.4; count not in paper)
    context: int = 32  # C: time attention sees the last C frames (§3.4; 192 for Minecraft)
    mlp_ratio: float = 4.0  # SwiGLU hidden width / D (not in paper)
    soft_cap: float = 50.0  # attention-logit soft cap (§3.4; value from Gemma 2, not in paper)
    k_max: int = 64  # K_max: finest step d_min = 1/K_max (Eq 4; value not stated in the paper)
    k_min: int = 1  # coarsest step trained, d ≤ 1/k_min (Eq 4: 1; 4 trains only what K = 4 uses)
    flow_frac: float = 0.75  # share of rows with every d = d_min; 0 = literal Eq 4 (not in paper)
    ctx_stream: bool = False  # every frame also trained after a history at τ_ctx (not in paper)
    boot_clip: float = 1.0  # clamp bootstrap x-predictions to ±this; 0 = off (not in paper)
    tau_weight: str = "ramp"  # loss weight per τ: ramp (Eq 8) | inverse: 1 − 0.9τ (not in paper)
    start_frac: float = 0.3  # share of sequences trained as independent images (§3.4: 30 %)
    event_frac: float = 0.0  # milestone rows added per uniform row (not in paper)
    inventory_frac: float = 0.0  # rows ending at an inventory change per uniform row (not in paper)
    event_weight: float = 0.0  # an extra row's last-frame weight; 0 = row length T (not in paper)
    batch: int = 32  # sequences per short batch (not in paper)
    seq_len: int = 16  # T₁ ≤ C, length of short batches (§3.4; Minecraft 64 with C = 192)
    batch_long: int = 8  # sequences per long batch: the same frames per step (not in paper)
    seq_len_long: int = 64  # T₂ > C, length of long batches (§3.4: "must exceed the context")
    long_every: int = 8  # every n-th step is a long batch (ratio not in paper)
    long_only_frac: float = 0.1  # final share of steps with long batches only (§3.4; share: ours)
    steps: int = 10000  # optimiser steps (not in paper)
    lr: float = 3e-4  # AdamW peak learning rate (not in paper)
    warmup: int = 500  # linear warm-up steps, then cosine decay to 10 % (not in paper)
    weight_decay: float = 0.01  # AdamW weight decay (not in paper)
    grad_clip: float = 1.0  # gradient-norm clipping (not in paper)
    ema: float = 0.999  # weight EMA for sampling, evaluation, later stages; 0 = off (not in paper)
    sample_k: int = 4  # K sampling steps per generated frame (§3.2: K = 4)
    ctx_tau: float = 0.9  # context signal level at inference (τ_ctx, §3.2; ≤ 1 − 1/K_max)
    log_every: int = 100  # steps between log lines
    ckpt_every: int = 1000  # steps between checkpoints
    eval_seqs: int = 64  # held-out sequences for rollout evaluation; 0 skips evaluation
    eval_seqs_kmax: int = 0  # the first n of them for the slow K = k_max rollout; 0 = all
    eval_context: int = 8  # context frames of the held-out rollouts (not in paper)
    eval_horizon: int = 16  # generated frames of the held-out rollouts (not in paper)
    fps_frames: int = 64  # frames generated at batch 1 to time generation (not in paper)
    stop_at: int = 0  # stop after this step as if interrupted (to test --resume); 0 = never
    resume: bool = False  # continue the run in --out from its ckpt.pt
    seed: int = 0  # seed for model init; data and noise streams are derived from (seed, step)
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "auto"  # auto | fp32 | bf16: compute dtype; auto = start-up probe (not in paper)
    compile: bool = False  # torch.compile the training forward (off by default)


PRESETS = {
    "smoke": dict(
        tokenizer="runs/smoke/tokenizer/ckpt.pt", out="runs/smoke/dynamics",
        dim=32, depth=4, heads=2, kv_heads=1, registers=2, context=4,
        batch=4, seq_len=4, batch_long=2, seq_len_long=6, long_every=2,
        steps=6, warmup=2, log_every=2, ckpt_every=3,
        eval_seqs=2, eval_context=2, eval_horizon=3, fps_frames=4, dtype="fp32",
    ),
    "cpu": dict(
        tokenizer="runs/cpu/tokenizer/ckpt.pt", out="runs/cpu/dynamics",
        dim=128, depth=4, heads=4, kv_heads=2, registers=4, context=16,
        batch=8, seq_len=8, batch_long=3, seq_len_long=24, long_every=8,
        steps=5500, warmup=200, ckpt_every=1000,  # ≈ 14 min with evaluation, 2 cores
        lr=3e-3,  # 5,500 steps need a higher peak than 1e-3 (agent.py's phase 2: 5e-3)
        # the laptop budget's departures (docs/deviations.md#the-cpu-preset): a history stream,
        # only the step sizes K = 4 uses, 10 % start frames, 2-D RoPE in the space layers, the
        # noisy frames weighing most (the inverse of Eq 8's ramp), a quarter as many rows again
        # that end at a milestone (where the dataset has reward labels), and a quarter more that
        # end where the inventory changes (on the built-in world), their last frame weighing 4
        ctx_stream=True, k_min=4, start_frac=0.1, space_rope_base=10.0, tau_weight="inverse",
        event_frac=0.25, inventory_frac=0.25, event_weight=4.0,
        eval_seqs=128, eval_seqs_kmax=32, fps_frames=64,
    ),
}

FORMAT_VERSION = 1


# ---- The signal-level / step-size grid and the small identities (Eqs 2, 4, 6, 7, 8) --------------


def sample_tau_d(shape, k_max: int, gen: torch.Generator | None = None, device=None,
                 k_min: int = 1, flow_frac: float = 0.0):
    """Eq 4: d ~ 1/U{1, 2, 4, …, K_max}, then τ ~ U{0, d, 2d, …, 1 − d}; one pair per frame.

    k_min > 1 leaves out the largest steps: d ~ 1/U{k_min, 2·k_min, …, K_max}. flow_frac > 0
    (not in paper, `--flow-frac`): each row (the last dim of `shape` is time) is a flow row with
    probability flow_frac, every frame at d = d_min = 1/K_max. The other rows are bootstrap
    rows: frames before a split point s ~ U{0, …, T − 1} are flow frames too, frames from s on
    draw d per frame from {1/k_min, …, 2/K_max}; only these rows need Eq 7's half steps. Frame s
    sees a history tagged d_min and has d > d_min: the configuration of every generated frame
    (history at τ_ctx and d_min, the new frame at d = 1/K), trained with gradients.
    flow_frac = 0 is the literal Eq 4 (whose printed τ grid, in steps of 1/d, is a typo for
    steps of d). τ ≤ 1 − d always, so Eq 7's divisions by (1 − τ) are safe.
    Returns τ, d: float tensors of `shape`.
    """
    e_lo = int(round(math.log2(k_min)))  # d = 2^−e ∈ {1/k_min, …, 1/K_max}
    e_hi = int(round(math.log2(k_max)))
    if flow_frac > 0 and e_hi > e_lo:
        # bootstrap frames: d ∈ {1/k_min, …, 2/K_max}; flow frames: d = d_min (not in paper)
        e = torch.randint(e_lo, e_hi, shape, generator=gen, device=device)  # (…, T)
        T = shape[-1]
        flow = torch.rand(shape[:-1], generator=gen, device=device) < flow_frac  # (…,) flow rows
        split = torch.randint(0, T, shape[:-1], generator=gen, device=device)  # (…,) first boot
        t = torch.arange(T, device=device)  # (T,)
        flow_frame = flow[..., None] | (t < split[..., None])  # (…, T)
        e = torch.where(flow_frame, torch.full_like(e, e_hi), e)  # (…, T)
    else:
        e = torch.randint(e_lo, e_hi + 1, shape, generator=gen, device=device)  # e uniform
    d = 2.0 ** (-e.float())
    j = (torch.rand(shape, generator=gen, device=device) * 2.0 ** e).floor()  # j ~ U{0, …, 1/d − 1}
    return j * d, d  # τ = j·d (τ = 0 is noise), d


def corrupt(noise: torch.Tensor, clean: torch.Tensor, tau) -> torch.Tensor:
    """Eq 6: z̃ = (1 − τ)·noise + τ·clean   (τ = 1 clean data, τ = 0 pure noise — paper convention).
    noise, clean: (B, T, N, C); tau: (B, T) per-frame signal level, or a float."""
    if torch.is_tensor(tau) and tau.dim() == 2:
        tau = tau[..., None, None]  # (B, T, 1, 1)
    return (1 - tau) * noise + tau * clean


def x_to_velocity(x_hat: torch.Tensor, z: torch.Tensor, tau) -> torch.Tensor:
    """Eq 7 footnote: v̂ = (x̂₁ − z_τ)/(1 − τ), the velocity from z_τ towards the prediction x̂₁
    (for x̂₁ = clean it is clean − noise). tau: (B, T) or a float; needs τ < 1."""
    if torch.is_tensor(tau) and tau.dim() == 2:
        tau = tau[..., None, None]  # (B, T, 1, 1)
    return (x_hat - z) / (1 - tau)


def ramp_weight(tau: torch.Tensor) -> torch.Tensor:
    """Eq 8: w(τ) = 0.9τ + 0.1 — 0.1 at pure noise (τ = 0), 1.0 at clean data (τ = 1)."""
    return 0.9 * tau + 0.1


TAU_WEIGHTS = ("ramp", "inverse")


def tau_weight(tau: torch.Tensor, kind: str = "ramp") -> torch.Tensor:
    """The loss weight of a frame at signal level τ. "ramp" is Eq 8. "inverse" (not in paper,
    `--tau-weight inverse`, docs/deviations.md) mirrors it, w(τ) = 1 − 0.9τ: the frames the
    sampler starts from, where the next frame is decided, weigh most."""
    if kind == "ramp":
        return ramp_weight(tau)
    if kind == "inverse":
        return 1.0 - 0.9 * tau
    raise ValueError(f"unknown --tau-weight {kind!r}: use one of {', '.join(TAU_WEIGHTS)}")


def context_signal_level(ctx_tau: float, k_max: int) -> float:
    """τ_ctx snapped to the nearest point of the d_min = 1/K_max grid: 0.9 → 58/64 ≈ 0.906.
    A signal level: 0.9 means 10 % noise (our reading of the paper's "τ_ctx = 0.1").
    Eq 4 never draws τ = 1 (τ ≤ 1 − d), so the τ-embedding of clean frames is never trained:
    `--ctx-tau 1` gives the cleanest trained level, 1 − 1/K_max (63/64: 1.6 % noise)."""
    return min(round(ctx_tau * k_max), k_max - 1) / k_max


def shift_actions(actions: torch.Tensor):
    """actions[t] is taken AT frame t (it leads to t+1; docs/conventions.md), so the action token
    of step t carries a_{t−1}. Returns prev (B, T, A) and valid (B, T) bool; step 0 has no
    previous action."""
    prev = torch.cat([torch.zeros_like(actions[:, :1]), actions[:, :-1]], dim=1)  # (B, T, A)
    valid = torch.ones(actions.shape[:2], dtype=torch.bool, device=actions.device)  # (B, T)
    valid[:, 0] = False
    return prev, valid


# ---- Model (§3.2 inputs, §3.4 transformer) -------------------------------------------------------


def token_positions(latent_tokens: int, registers: int) -> torch.Tensor:
    """(N, 2) lattice position (row, col) of each token of a frame, for 2-D RoPE (not in paper).

    The tokenizer spreads its N_b = 2·N_z latents over an r × c lattice in row-major order
    (tokenizer.latent_grid) and pack joins neighbours two by two, so a packed latent token sits
    between its two latents. The action, (τ, d) and register tokens have no place in the image:
    they sit at the lattice centre, at the same distance from every corner.
    """
    n = 2 * latent_tokens
    c = n // max(k for k in range(1, int(n ** 0.5) + 1) if n % k == 0)  # columns, r·c = N_b
    lattice = latent_grid(n, c)  # (N_b, 2) in units of one column, rows spread as on the image
    latents = lattice.view(latent_tokens, 2, 2).mean(1)  # (N_z, 2) between the packed pair
    centre = lattice.mean(0)  # (2,)
    return torch.cat([centre.expand(2, 2), latents, centre.expand(registers, 2)])  # (N, 2)


class DynamicsModel(nn.Module):
    """ẑ₁ = f_θ(z̃, τ, d, a) (Eq 6): x-prediction of the clean packed latents of every frame.

    Tokens per frame: [action | (τ, d) | N_z latents | S_r registers], N = 2 + N_z + S_r.
    action_classes: classes per action component (0 = continuous, embedded by a linear map).
    """

    def __init__(self, latent_tokens: int, latent_dim: int, action_classes: list[int], dim: int,
                 depth: int, heads: int, kv_heads: int, registers: int, context: int,
                 mlp_ratio: float = 4.0, soft_cap: float = 50.0, k_max: int = 64,
                 time_every: int = 4, time_layer: int = 0, space_rope_base: float = 0.0):
        super().__init__()
        self.latent_tokens, self.latent_dim = latent_tokens, latent_dim
        self.k_max, self.window = k_max, context
        self.action_classes = list(action_classes)
        # §3.2 actions: each component separately (lookup if categorical/binary, linear if
        # continuous), summed with a learned base embedding; the base alone means "no action".
        self.action_base = nn.Parameter(torch.randn(dim) * 0.02)
        self.action_embed = nn.ModuleList(nn.Embedding(n, dim) if n > 0 else nn.Linear(1, dim)
                                          for n in action_classes)
        # §3.2 one (τ, d) token: two discrete embeddings concatenated along channels.
        self.tau_embed = nn.Embedding(k_max + 1, dim // 2)  # τ ∈ {0, 1/K_max, …, 1}
        n_steps = int(round(math.log2(k_max))) + 1
        self.d_embed = nn.Embedding(n_steps, dim - dim // 2)  # d ∈ {1, ½, …, 1/K_max}
        self.latent_in = nn.Linear(latent_dim, dim)  # §3.2: linear projection to the model width
        # not in paper: the packed latents have no pixel grid, so each slot gets a learned embedding
        self.latent_slot = nn.Parameter(torch.randn(latent_tokens, dim) * 0.02)
        self.register_tokens = nn.Parameter(torch.randn(registers, dim) * 0.02)  # S_r (§3.4)
        self.transformer = common.SpaceTimeTransformer(
            dim, depth, heads, kv_heads, time_every=time_every, time_layer=time_layer,
            window=context, mlp_ratio=mlp_ratio, soft_cap=soft_cap,
            space_rope_base=space_rope_base or None)
        # not in paper: with space_rope_base > 0 the space layers rotate by the latent lattice
        # position of each token (`--space-rope-base`, docs/deviations.md)
        pos = token_positions(latent_tokens, registers) if space_rope_base > 0 else None
        self.register_buffer("space_pos", pos, persistent=False)  # (N, 2) or None
        self.latent_out = nn.Linear(dim, latent_dim)  # x-prediction head
        self.spatial = slice(2, 2 + latent_tokens)  # where the latent tokens sit in a frame
        self.n_tokens = 2 + latent_tokens + registers  # per frame: action, (τ, d), latents, regs

    def embed_actions(self, prev_actions, valid, B: int, T: int) -> torch.Tensor:
        """One action token per frame (S_a = 1, not in paper): base + Σ_components embed(a_{t−1});
        the base alone where not valid."""
        tok = self.action_base.expand(B, T, -1)  # (B, T, D)
        if prev_actions is None or not self.action_classes:
            return tok
        parts = [emb(prev_actions[..., c].clamp_min(0).long()) if n > 0  # categorical: lookup
                 else emb(prev_actions[..., c:c + 1].float())  # continuous: linear map
                 for c, (n, emb) in enumerate(zip(self.action_classes, self.action_embed))]
        return tok + torch.stack(parts).sum(0) * valid[..., None]  # (A, B, T, D) → (B, T, D)

    def tokens(self, z_tilde, tau, d, prev_actions=None, act_valid=None) -> torch.Tensor:
        """The per-frame tokens. z_tilde (B, T, N_z, C_z); tau, d (B, T) on the Eq 4 grid."""
        B, T, N, C = z_tilde.shape
        assert (N, C) == (self.latent_tokens, self.latent_dim), (
            f"expected packed latents (B, T, {self.latent_tokens}, {self.latent_dim}), "
            f"got {tuple(z_tilde.shape)}")
        a = self.embed_actions(prev_actions, act_valid, B, T)  # (B, T, D)
        tau_i = torch.round(tau * self.k_max).long()  # τ = i / K_max
        d_i = torch.round(-torch.log2(d)).long()  # d = 2^−i
        td = torch.cat([self.tau_embed(tau_i), self.d_embed(d_i)], dim=-1)  # (B, T, D)
        z = self.latent_in(z_tilde) + self.latent_slot  # (B, T, N_z, D)
        reg = self.register_tokens.expand(B, T, -1, -1)  # (B, T, S_r, D)
        return torch.cat([a[:, :, None], td[:, :, None], z, reg], dim=2)  # (B, T, N, D)

    def forward(self, z_tilde, tau, d, prev_actions=None, act_valid=None, independent=None,
                cache: common.KVCache | None = None, commit: bool = False,
                time_layout=None, keep_last: int | None = None) -> torch.Tensor:
        """Eq 6: (B, T, N_z, C_z) corrupted latents → ẑ₁ (B, T, N_z, C_z) predicted clean latents.

        prev_actions (B, T, A): a_{t−1} per frame (see shift_actions); act_valid (B, T) bool.
        independent (B,) bool: start-frame sequences (§3.4). cache/commit: see common.KVCache.
        time_layout: see two_stream_layout (training with --ctx-stream). keep_last: predict only
        the last keep_last frames, (B, keep_last, N_z, C_z); the others are history
        (common.SpaceTimeTransformer).
        """
        x = self.tokens(z_tilde, tau, d, prev_actions, act_valid)  # (B, T, N, D)
        h = self.transformer(x, self.space_pos, independent=independent, cache=cache,
                             commit=commit, time_layout=time_layout,
                             keep_last=keep_last)  # (B, T or keep_last, N, D)
        return self.latent_out(h[:, :, self.spatial])  # (B, T, N_z, C_z)


# ---- Objective: shortcut forcing (Eq 7) with diffusion forcing and the ramp weight (Eq 8) --------


def shortcut_forcing_loss(f, clean: torch.Tensor, noise: torch.Tensor, tau: torch.Tensor,
                          d: torch.Tensor, k_max: int, x_clip: float = 0.0,
                          weight: str = "ramp", frame_weight: torch.Tensor | None = None) -> dict:
    """Eq 7, per frame, weighted by Eq 8 and averaged over all frames.

    f(z̃, τ, d, rows=None) → ẑ₁: the network (actions, start flags closed over); `rows` (batch
    rows, None = all) says which rows z̃, τ, d hold: the half-step passes run only on rows with
    a bootstrap frame. clean z₁, noise z₀: (B, T, N, C); tau, d: (B, T) from sample_tau_d.
        flow frames (d = d_min):   L = ‖ẑ₁ − z₁‖²
        bootstrap (d > d_min):     b′ = (f(z̃, τ, d/2) − z̃)/(1 − τ),   z′ = z̃ + b′·d/2
                                   b″ = (f(z′, τ + d/2, d/2) − z′)/(1 − (τ + d/2))
                                   L = (1 − τ)²·‖(ẑ₁ − z̃)/(1 − τ) − sg(b′ + b″)/2‖²
    x_clip > 0 clamps the half-step x-predictions to ±x_clip (`--boot-clip`, not in paper);
    weight: "ramp" (Eq 8) or "inverse" (`--tau-weight`, not in paper; see tau_weight).
    frame_weight (B, T), optional: a further weight per frame (the milestone rows; forcing_batch).
    Returns loss = mean w(τ)·frame_weight·L, its flow and boot parts (loss = flow + boot), L (B, T).
    """

    def clip(x):  # not in paper: the bootstrap x-predictions stay in the latent range
        return x.clamp(-x_clip, x_clip) if x_clip > 0 else x

    d_min = 1.0 / k_max
    z_tilde = corrupt(noise, clean, tau)  # Eq 6: (B, T, N, C), τ = 0 noise … τ = 1 clean
    z1_hat = f(z_tilde, tau, d)  # ẑ₁ with the full step d: (B, T, N, C)
    is_flow = d <= d_min  # (B, T)
    v_target = torch.zeros_like(z_tilde)  # sg(b′ + b″)/2, filled on the rows with bootstrap frames
    # not in paper: the half steps run on bootstrap rows only (a speed-up; docs/deviations.md)
    rows = (~is_flow).any(dim=1).nonzero()[:, 0]  # (R,) rows with at least one bootstrap frame
    if len(rows):
        zt, tr = z_tilde[rows], tau[rows]  # (R, T, N, C), (R, T)
        dr, fl = d[rows], is_flow[rows]  # (R, T), (R, T)
        with torch.no_grad():  # both half-step passes are targets: sg(·), online weights (no EMA)
            # flow frames stay put as context (d_min/2 is off the grid; docs/deviations.md)
            half = torch.where(fl, torch.zeros_like(dr), dr / 2)  # (R, T) how far each frame moves
            d_half = torch.where(fl, dr, dr / 2)  # (R, T) step the half passes are conditioned on
            b1 = x_to_velocity(clip(f(zt, tr, d_half, rows=rows)), zt, tr)  # b′ at (z̃, τ, d/2)
            z_prime = zt + b1 * half[..., None, None]  # z′ = z̃ + b′·d/2: (R, T, N, C)
            tau_prime = tr + half  # τ + d/2 ≤ 1 − d/2 < 1 on the Eq 4 grid
            x2 = clip(f(z_prime, tau_prime, d_half, rows=rows))  # x̂₁ at (z′, τ + d/2, d/2)
            b2 = x_to_velocity(x2, z_prime, tau_prime)  # b″
            v_target[rows] = ((b1 + b2) / 2).to(v_target.dtype)  # sg(b′ + b″)/2
    flow = (z1_hat - clean).pow(2).mean(dim=(-2, -1))  # ‖ẑ₁ − z₁‖²: (B, T)
    v_hat = x_to_velocity(z1_hat, z_tilde, tau)  # (ẑ₁ − z̃)/(1 − τ): (B, T, N, C)
    boot = (1 - tau) ** 2 * (v_hat - v_target.detach()).pow(2).mean(dim=(-2, -1))  # (B, T)
    per_frame = torch.where(is_flow, flow, boot)  # each frame gets exactly one of the two terms
    w = tau_weight(tau, weight)  # Eq 8 (or --tau-weight) on both terms: the paper does not say
    if frame_weight is not None:  # milestone rows: the row's event frame weighs more (T or W)
        w = w * frame_weight
    n = per_frame.numel()
    return {"loss": (w * per_frame).mean(),
            "flow": (w * per_frame * is_flow).sum().detach() / n,
            "boot": (w * per_frame * ~is_flow).sum().detach() / n,
            "per_frame": per_frame.detach()}


def forcing_batch(latents: torch.Tensor, actions, k_max: int, start_frac: float,
                  gen: torch.Generator, k_min: int = 1, flow_frac: float = 0.0,
                  history_tau: float | None = None, event_rows: int = 0,
                  event_weight: float = 0.0) -> dict:
    """Diffusion-forcing inputs of one batch: latents (B, T, N_b, D_b) → clean (B, T, N_z, 2·D_b)
    packed (App A); per-frame (τ, d) (Eq 4); noise z₀; start-frame rows (§3.4: `start_frac` of the
    sequences are independent images, with no action); a_{t−1} (None for unlabelled clips).
    history_tau (`--ctx-stream`, not in paper): also the history stream, every frame at τ_ctx.
    event_rows (`--event-frac`, `--inventory-frac`; not in paper): the last rows end at an event
    (sample_windows); frame_weight (B, T) weighs each such row's last frame T (the weight of a
    whole row; event_weight > 0 instead: that weight, `--event-weight`), every other frame 1, and
    the start rows are drawn among the other rows."""
    clean = pack(latents)  # (B, T, N_z, C_z)
    B, T = clean.shape[:2]
    dev = clean.device
    tau, d = sample_tau_d((B, T), k_max, gen, dev, k_min, flow_frac)  # (B, T) each
    noise = torch.randn(clean.shape, generator=gen, device=dev)  # z₀ ~ N(0, I)
    independent = torch.zeros(B, dtype=torch.bool, device=dev)  # (B,)
    starts = torch.randperm(B - event_rows, generator=gen, device=dev)[:round(start_frac * B)]
    independent[starts] = True
    frame_weight = torch.ones(B, T, device=dev)  # (B, T)
    # an event row's event frame weighs a whole row (T), or --event-weight (docs/deviations.md)
    frame_weight[B - event_rows:, -1] = event_weight if event_weight > 0 else float(T)
    if actions is None:
        prev, valid = None, torch.zeros(B, T, dtype=torch.bool, device=dev)
    else:
        prev, valid = shift_actions(actions)  # (B, T, A), (B, T)
        valid = valid & ~independent[:, None]  # an independent image is a frame 0: no action
    fb = {"clean": clean, "noise": noise, "tau": tau, "d": d, "independent": independent,
          "prev_actions": prev, "act_valid": valid, "frame_weight": frame_weight}
    if history_tau is not None:  # the history stream of --ctx-stream: Eq 6 at τ_ctx
        history_noise = torch.randn(clean.shape, generator=gen, device=dev)  # (B, T, N_z, C_z)
        fb["history"] = corrupt(history_noise, clean, history_tau)  # (B, T, N_z, C_z)
    return fb


def two_stream_layout(T: int, window: int, independent, n_tokens: int, device) -> tuple:
    """Time layout of `--ctx-stream` training (not in paper; docs/deviations.md): 2T frames, the
    T frames of a sequence as history at τ_ctx, then the same T frames noised for the loss.

    History frame i sees history frames j ≤ i, as the KV cache holds them when sampling; loss
    frame t sees history frames j < t and itself: what a generated frame sees. So every frame is
    trained in the sampling configuration, not only after a history that Eq 4 happened to draw
    clean. Both copies of frame t sit at RoPE position t; the window C applies as in time_mask.
    independent (B,) bool: start-frame rows, whose frames see only themselves; n_tokens: tokens
    per frame. Returns positions (2T,) and the mask (2T, 2T), or (B·N, 1, 2T, 2T) with rows.
    """
    t = torch.arange(T, device=device)
    near = t[None, :] > t[:, None] - window  # (T, T) key j within the window of query i
    history = (t[None, :] <= t[:, None]) & near  # history i → history j ≤ i
    cross = (t[None, :] < t[:, None]) & near  # loss frame t → history j < t
    eye = torch.eye(T, dtype=torch.bool, device=device)  # loss frame t → itself
    mask = torch.cat([torch.cat([history, torch.zeros_like(eye)], 1),
                      torch.cat([cross, eye], 1)], 0)  # (2T, 2T)
    positions = torch.cat([t, t])  # (2T,)
    if independent is None:
        return positions, mask
    alone = torch.eye(2 * T, dtype=torch.bool, device=device)  # (2T, 2T) each frame only itself
    rows = independent.repeat_interleave(n_tokens).view(-1, 1, 1, 1)  # (B·N, 1, 1, 1)
    return positions, torch.where(rows, alone, mask)  # (B·N, 1, 2T, 2T)


def history_stream(z, tau, d, history, prev, valid, independent, tau_ctx: float, k_max: int,
                   window: int, n_tokens: int) -> tuple:
    """The inputs of one `--ctx-stream` pass (not in paper; docs/deviations.md): the history
    stream (B, T, N_z, C_z) at τ_ctx tagged d_min, then the T loss frames z at their (τ, d).
    prev (B, T, A) or None, valid (B, T), independent (B,): as in forcing_batch. Returns
    (x, τ, d, a_{t−1}, valid) over 2T frames and the time layout (two_stream_layout); the loss
    frames are the last T of the network's output."""
    T = z.shape[1]
    x = torch.cat([history, z], 1)  # (B, 2T, N_z, C_z): history, then the loss frames
    taus = torch.cat([torch.full_like(tau, tau_ctx), tau], 1)  # (B, 2T)
    ds = torch.cat([torch.full_like(d, 1.0 / k_max), d], 1)  # (B, 2T)
    prev2 = None if prev is None else torch.cat([prev, prev], 1)  # (B, 2T, A)
    valid2 = torch.cat([valid, valid], 1)  # (B, 2T)
    layout = two_stream_layout(T, window, independent, n_tokens, z.device)
    return x, taus, ds, prev2, valid2, layout


def row_select(fb: dict, rows=None) -> tuple:
    """(prev_actions, act_valid, independent) of a forcing batch, for the given rows (None: all)."""
    keys = ("prev_actions", "act_valid", "independent")
    return tuple(fb[k] if rows is None or fb[k] is None else fb[k][rows] for k in keys)


# ---- Sampling (Eq 2 in x-prediction form), autoregressive rollouts with the KV cache -------------


def sample_frame(f, noise: torch.Tensor, k: int) -> torch.Tensor:
    """Denoise one frame with K shortcut steps of d = 1/K, from τ = 0 (pure noise) to τ = 1.
    f(z, τ, d) → ẑ₁ with τ, d python floats. Eq 2 with the velocity from x-prediction:
    z ← z + (ẑ₁ − z)·d/(1 − τ). At the last step τ = 1 − d, so z becomes ẑ₁ exactly.
    """
    d = 1.0 / k
    z = noise
    for i in range(k):
        tau = i * d  # signal level of z before this step
        z1_hat = f(z, tau, d)
        z = z + x_to_velocity(z1_hat, z, tau) * d  # z_{τ+d} = z_τ + v̂·d
    return z


@torch.no_grad()
def rollout(model: DynamicsModel, context: torch.Tensor, actions, horizon: int, k: int,
            ctx_tau: float, gen: torch.Generator, use_cache: bool = True) -> torch.Tensor:
    """Open-loop generation of `horizon` frames after `context`, frame by frame.

    context: (B, T_c, N_z, C_z) clean packed latents; actions: (B, T_c + horizon, A) (a_t taken
    at frame t) or None. K = k steps per frame (a power of two ≤ K_max). Context and generated
    frames enter the history at signal level τ_ctx. use_cache=False recomputes the whole history
    at every step (the reference the cache must equal). Returns (B, horizon, N_z, C_z) latents.
    """
    assert k & (k - 1) == 0 and 1 <= k <= model.k_max, \
        f"K must be a power of two ≤ {model.k_max}, got {k}"
    B, Tc, N, C = context.shape
    T, dev = Tc + horizon, context.device
    if actions is None:
        prev, valid = None, torch.zeros(B, T, dtype=torch.bool, device=dev)
    else:
        prev, valid = shift_actions(actions[:, :T])  # (B, T, A), (B, T)
    tau_c, d_c = context_signal_level(ctx_tau, model.k_max), 1.0 / model.k_max
    # All noise drawn up front, so the cached and uncached paths consume the same numbers.
    ctx_noise = torch.randn(B, T, N, C, generator=gen, device=dev)  # corruption of the history
    init_noise = torch.randn(B, horizon, N, C, generator=gen, device=dev)  # z at τ = 0 per frame

    def full(t, v):  # (B, t) constant τ or d
        return torch.full((B, t), float(v), device=dev)

    def acts(s, e):  # (B, e − s, A) previous actions of frames s … e − 1
        return None if prev is None else prev[:, s:e]

    history = corrupt(ctx_noise[:, :Tc], context, tau_c)  # (B, T_c, N, C) what the model sees
    cache = common.KVCache(model.window) if use_cache else None
    if use_cache and Tc > 0:
        model(history, full(Tc, tau_c), full(Tc, d_c), acts(0, Tc), valid[:, :Tc],
              cache=cache, commit=True, keep_last=0)  # only the cache is written
    frames = []
    for t in range(Tc, T):
        if use_cache:  # only the new frame's tokens; it attends to the cached history
            def f(z, tau, d):
                return model(z, full(1, tau), full(1, d), acts(t, t + 1), valid[:, t:t + 1],
                             cache=cache)
        else:  # recompute everything: history at τ_ctx, then the frame being denoised
            def f(z, tau, d):
                x = torch.cat([history, z], dim=1)  # (B, t + 1, N, C)
                taus = torch.cat([full(t, tau_c), full(1, tau)], 1)  # (B, t + 1)
                ds = torch.cat([full(t, d_c), full(1, d)], 1)  # (B, t + 1)
                return model(x, taus, ds, acts(0, t + 1), valid[:, :t + 1])[:, -1:]
        z1 = sample_frame(f, init_noise[:, t - Tc:t - Tc + 1], k)  # (B, 1, N, C)
        frames.append(z1)
        if t < T - 1:  # write the new frame into the history at τ_ctx (not in paper: +1 pass)
            h_t = corrupt(ctx_noise[:, t:t + 1], z1, tau_c)  # (B, 1, N, C)
            if use_cache:
                model(h_t, full(1, tau_c), full(1, d_c), acts(t, t + 1), valid[:, t:t + 1],
                      cache=cache, commit=True, keep_last=0)
            else:
                history = torch.cat([history, h_t], dim=1)  # (B, t + 1, N, C)
    return torch.cat(frames, dim=1)  # (B, horizon, N, C)


# ---- Training ------------------------------------------------------------------------------------


def sample_windows(cache: LatentCache, B: int, T: int, event_frac: float,
                   inventory_frac: float = 0.0) -> dict:
    """Training windows of T frames: B uniformly, then round(event_frac·B) more among the windows
    whose last frame holds a milestone (a reward event; `--event-frac`, not in paper,
    docs/deviations.md): a history, then the event. The events that the agent stages need are
    rare (a few per 256 frames); in these rows the event frame weighs more (a whole row, T, or
    `--event-weight`: forcing_batch), and the history before it (the presses that did not yet
    fell the tree) is trained as usual: the counter-examples. The milestone rows come on top of
    the B uniform ones: taken from them, they cost the moves, learned from the uniform windows.
    Then round(inventory_frac·B) rows ending where the inventory shown changes (`--inventory-frac`,
    not in paper; the built-in world, read off its frames): neither the second wood a table
    costs nor a wood the creature steals pays a reward, and both are as rare."""
    uniform = cache.sample(B, T)
    extra = milestone_windows(cache, round(event_frac * B), round(inventory_frac * B), T)
    if extra is None:
        return uniform
    return {k: None if uniform[k] is None else torch.cat([uniform[k], extra[k]])
            for k in ("latents", "actions", "rewards")}  # (B + n_event + n_inventory, T, …) each


def milestone_windows(cache: LatentCache, n_event: int, n_inventory: int, T: int) -> dict | None:
    """sample_windows' extra rows alone: n_event windows ending at a milestone, then n_inventory
    ending where the inventory changes (latents, actions, rewards; (n_event + n_inventory, T, …)
    each). None when both counts are 0. agent.py --event-rows adds them to phase 2's video loss."""
    if n_event and cache.rewards is None:  # train() asks milestone_share first
        raise ValueError("milestone rows need reward labels, and this cache has none")
    parts = []
    if n_event:
        parts.append(cache.sample(n_event, T, relevant=True))
    if n_inventory:
        parts.append(cache.sample(n_inventory, T, inventory=True))
    if not parts:
        return None
    return {k: None if parts[0][k] is None else torch.cat([p[k] for p in parts])
            for k in ("latents", "actions", "rewards")}


def usable_share(a: Args, flag: str, available: bool, stop: str, note: str) -> float:
    """The share of extra rows (`flag`: "event_frac" or "inventory_frac") a run can use when the
    rows need something the dataset may lack. Without it the rows are dropped with `note` when the
    share came from the preset, and the run stops with `stop` (what to do) when it was asked for
    on the command line."""
    share = getattr(a, flag)
    if share == 0 or available:
        return share
    if flag in getattr(a, "_given", ()):
        raise SystemExit(stop)
    print(note)
    return 0.0


def milestone_share(a: Args, has_rewards: bool) -> float:
    """The --event-frac a run can use: milestone rows need reward labels to find the events (the
    MiniGrid example has none)."""
    return usable_share(
        a, "event_frac", has_rewards,
        stop="--event-frac needs reward labels, and this dataset has none: train with "
             f"--event-frac 0, e.g. python dynamics.py --preset {a.preset} "
             f"--tokenizer {a.tokenizer} --event-frac 0",
        note=f"note: this dataset has no reward labels, so no milestone rows (--event-frac 0; "
             f"--preset {a.preset} would add {a.event_frac} per uniform row)")


def inventory_share(a: Args, shows_inventory: bool) -> float:
    """The --inventory-frac a run can use: the inventory is read off the frames of the built-in
    world only."""
    return usable_share(
        a, "inventory_frac", shows_inventory,
        stop="--inventory-frac reads the inventory off the frames of the built-in world (python "
             "data.py), and this dataset is another: train with --inventory-frac 0, e.g. "
             f"python dynamics.py --preset {a.preset} --tokenizer {a.tokenizer} "
             "--inventory-frac 0",
        note="note: the inventory of this dataset cannot be read off its frames, so no rows end "
             f"at its changes (--inventory-frac 0; --preset {a.preset} would add "
             f"{a.inventory_frac})")


def batch_shape(step: int, a: Args) -> tuple[int, int]:
    """§3.4 alternating batch lengths: short T₁ ≤ C, every `long_every`-th step long T₂ > C, and
    long batches only for the final `long_only_frac` of training. Returns (batch size, length)."""
    long_only = step >= int(a.steps * (1 - a.long_only_frac))
    if long_only or (step + 1) % a.long_every == 0:
        return a.batch_long, a.seq_len_long
    return a.batch, a.seq_len


def build_model(a: dict, latent_tokens: int, latent_dim: int,
                action_classes: list[int]) -> DynamicsModel:
    """Rebuild the model from a plain args dict (as stored in the checkpoint)."""
    return DynamicsModel(
        latent_tokens, latent_dim, action_classes, a["dim"], a["depth"], a["heads"],
        a["kv_heads"], a["registers"], a["context"], a["mlp_ratio"], a["soft_cap"], a["k_max"],
        a.get("time_every", 4), a.get("time_layer", -1), a.get("space_rope_base", 0.0))


def load_dynamics(path: str = "runs/dynamics/ckpt.pt", device="cpu"):
    """The trained dynamics model for later stages (its EMA weights when the run kept them).
    Returns (model, checkpoint dict)."""
    how = common.command_for("dynamics.py", Args, PRESETS, os.path.dirname(path))  # writes it
    ckpt = common.load_checkpoint(path, "dynamics", how)
    model = build_model(ckpt["args"], *ckpt["shapes"]["latent"], ckpt["shapes"]["action_classes"])
    model.load_state_dict(ckpt.get("ema") or ckpt["model"])
    return model.to(device), ckpt


def ema_update(ema: nn.Module, model: nn.Module, step: int, decay: float) -> None:
    """θ_ema ← β·θ_ema + (1 − β)·θ after optimiser step `step` (1, 2, …), with the warm-up
    β = min(decay, (1 + step)/(10 + step)) so that a short run does not keep its random init.
    Not in the paper (its weight EMA is unspecified); usual for diffusion models."""
    beta = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), model.parameters()):
            pe.lerp_(p, 1 - beta)


def train(a: Args) -> dict:
    common.init_distributed(a.device)  # under torchrun: one of several data-parallel ranks
    common.check_batch("--batch", a.batch)  # global batches, split over the ranks
    common.check_batch("--batch-long", a.batch_long)
    common.seed_everything(a.seed)
    device = common.pick_device_for_run(a)  # records the compute dtype in a.dtype
    os.makedirs(a.out, exist_ok=True)
    if a.tau_weight not in TAU_WEIGHTS:
        raise SystemExit(f"--tau-weight {a.tau_weight!r} is not one of {', '.join(TAU_WEIGHTS)}: "
                         f"e.g. python dynamics.py --preset {a.preset} --tau-weight inverse")
    assert a.seq_len <= a.context < a.seq_len_long, (
        f"§3.4 needs T₁ ≤ C < T₂, got T₁ = {a.seq_len}, C = {a.context}, T₂ = {a.seq_len_long}")

    # Parent: the frozen tokenizer and its latent cache.
    tok, tok_ckpt = load_tokenizer(a.tokenizer, device)
    tok_dir = os.path.dirname(os.path.abspath(a.tokenizer))
    train_data = LatentCache(tok_dir, "train", seed=a.seed)
    held = LatentCache(tok_dir, "heldout", seed=a.seed + 1)
    a.event_frac = milestone_share(a, train_data.rewards is not None)  # recorded as it ran
    a.inventory_frac = inventory_share(a, train_data.shows_inventory)  # so is this
    action_classes = [int(n) for _, n in train_data.meta.get("action_components", [])]
    if train_data.actions is None:
        print("note: the dataset has no actions: an unconditional video model (base embedding)")
    shapes = {"latent": [tok.n_latents // 2, 2 * tok.latent_dim], "action_classes": action_classes}

    model = build_model(asdict(a), *shapes["latent"], action_classes).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"dynamics: {n_params / 1e6:.2f}M parameters; per frame 1 action + 1 (τ, d) + "
          f"{shapes['latent'][0]} latent (×{shapes['latent'][1]} ch) + {a.registers} register "
          f"tokens; C = {a.context}, T₁ = {a.seq_len}, T₂ = {a.seq_len_long}")
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay,
                            betas=(0.9, 0.95))
    ema = copy.deepcopy(model).requires_grad_(False) if a.ema > 0 else None  # they sample
    norm = common.RunningRMS()
    step = 0
    ckpt_path = os.path.join(a.out, "ckpt.pt")
    if a.resume:
        how = f"python dynamics.py --preset {a.preset} --out {a.out}"
        ckpt = common.load_checkpoint(ckpt_path, "dynamics", how)
        model.load_state_dict(ckpt["model"])
        if ema is not None:
            ema.load_state_dict(ckpt.get("ema") or ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        norm.load_state_dict(ckpt["normalizers"]["loss"])
        step = ckpt["step"]
        print(f"resumed from {ckpt_path} at step {step}")
    common.write_json(os.path.join(a.out, "args.json"), asdict(a))
    print("args:", json.dumps(asdict(a)))
    fwd = torch.compile(model) if a.compile else model
    log = common.MetricsLog(a.out, a.steps, resume=a.resume, start_step=step)

    def save(step):
        common.save_checkpoint(ckpt_path, {
            "format_version": FORMAT_VERSION, "stage": "dynamics", "step": step,
            "model": model.state_dict(), "ema": None if ema is None else ema.state_dict(),
            "optimizer": opt.state_dict(), "normalizers": {"loss": norm.state_dict()},
            "args": asdict(a), "shapes": shapes,
            "parent": {"stage": "tokenizer", "path": os.path.abspath(a.tokenizer),
                       "step": tok_ckpt["step"]}})

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    gen = torch.Generator(device)
    tau_ctx = context_signal_level(a.ctx_tau, a.k_max)  # the history level of --ctx-stream
    flops = common.FlopMeter(opt)  # counts the first step's FLOPs (MFU in summary.json)
    t_start, steps_run, frames_run, frames_log, steps_log = time.time(), 0, 0, 0, 0
    while step < a.steps:
        # Per-step streams seeded from (seed, step): the data and the noise do not depend on model
        # initialisation, and --resume sees exactly the batches an uninterrupted run sees.
        train_data.rng = np.random.default_rng([a.seed, step])
        gen.manual_seed(a.seed * 1_000_003 + step)
        B, T = batch_shape(step, a)
        batch = sample_windows(train_data, B, T, a.event_frac, a.inventory_frac)  # B + E rows
        acts = None if batch["actions"] is None else batch["actions"].to(device)
        n_events = batch["latents"].shape[0] - B  # E: the milestone and inventory rows
        fb = forcing_batch(batch["latents"].to(device), acts, a.k_max, a.start_frac, gen,
                           a.k_min, a.flow_frac, tau_ctx if a.ctx_stream else None,
                           event_rows=n_events, event_weight=a.event_weight)
        rows = fb["clean"].shape[0]  # B and the milestone rows
        fb = common.shard(fb, "--batch (with the milestone rows)")  # this rank's rows

        def f(z, tau, d, rows=None):  # ẑ₁ = f_θ(z̃, τ, d, a) with this batch's actions and starts
            prev, valid, ind = row_select(fb, rows)
            if not a.ctx_stream:
                return fwd(z, tau, d, prev, valid, ind).float()
            hist = fb["history"] if rows is None else fb["history"][rows]  # (R, T, N_z, C_z)
            *inputs, layout = history_stream(z, tau, d, hist, prev, valid, ind, tau_ctx,
                                             a.k_max, a.context, model.n_tokens)
            # the history frames serve only as keys and values: the loss frames are read
            out = fwd(*inputs, ind, time_layout=layout, keep_last=z.shape[1])  # (R, T, N_z, C_z)
            return out.float()

        for g in opt.param_groups:
            g["lr"] = common.lr_at(step, a.lr, a.warmup, a.steps)
        with common.autocast(device):
            terms = shortcut_forcing_loss(f, fb["clean"], fb["noise"], fb["tau"], fb["d"],
                                          a.k_max, a.boot_clip, a.tau_weight,
                                          fb["frame_weight"])
        common.check_finite(step, loss=terms["loss"])
        loss = norm(terms["loss"])  # ÷ running RMS (§3 intro)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        common.sync_gradients(model)  # the mean gradient over the ranks (no-op alone)
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
        opt.step()
        step, steps_run = step + 1, steps_run + 1
        if ema is not None:
            ema_update(ema, model, step, a.ema)
        frames_run, frames_log = frames_run + rows * T, frames_log + rows * T
        steps_log += 1
        if common.is_main() and (step % a.log_every == 0 or step == a.steps):
            log.log(step, {"loss": terms["loss"].detach(), "flow": terms["flow"],
                           "boot": terms["boot"], "grad_norm": gnorm,
                           "lr": common.lr_at(step - 1, a.lr, a.warmup, a.steps)},
                    frames_per_step=frames_log // steps_log)
            frames_log, steps_log = 0, 0
        if steps_run == 5 and device.type == "cpu" and a.preset == "default":
            eta = (time.time() - t_start) / 5 * (a.steps - step) / 60
            print(f"!! the default preset is sized for a GPU: on this CPU it would take about "
                  f"{eta:.0f} min. Try --preset cpu (≤ 15 min on 2 cores).")
        if common.is_main() and (step % a.ckpt_every == 0 or step in (a.steps, a.stop_at)):
            save(step)
        if a.stop_at and step >= a.stop_at:
            print(f"stopping at step {step} (--stop-at); continue with --resume")
            return {}
    wall = time.time() - t_start
    if not common.is_main():  # evaluation and summary: rank 0's
        return {}

    # Final evaluation, pictures, summary.json.
    summary = {
        "stage": "dynamics", "preset": a.preset, "device": str(device),
        "steps": step, "steps_this_run": steps_run, "params_m": n_params / 1e6,
        **flops.speed(device, wall, steps_run, frames_run),
        "sample_k": a.sample_k, "k_max": a.k_max,
        "ctx_tau_used": context_signal_level(a.ctx_tau, a.k_max),
        "eval_context": a.eval_context, "eval_horizon": a.eval_horizon, "eval_seqs": a.eval_seqs,
    }
    model = ema if ema is not None else model  # evaluate (and sample with) the EMA weights
    model.eval()
    if a.eval_seqs > 0:
        t0 = time.time()
        figures, rollouts = evaluate(model, tok, held, a, device)
        summary.update(figures)
        gap = (f"{figures['action_shuffle_gap_db']:.2f} dB" if "action_shuffle_gap_db" in figures
               else "does not apply (no actions)")  # never "nan" for a figure that cannot exist
        kmax = ""  # K_max and K = sample_k on the same (first eval_seqs_kmax) windows
        if f"psnr_k{a.sample_k}_kmax_windows" in figures:
            kmax = (f"K={a.k_max} {figures[f'psnr_k{a.k_max}']:.2f} dB vs K={a.sample_k} "
                    f"{figures[f'psnr_k{a.sample_k}_kmax_windows']:.2f} dB on the first "
                    f"{figures['eval_seqs_kmax']} windows | ")
        print(f"eval: rollout PSNR K={a.sample_k} {figures[f'psnr_k{a.sample_k}']:.2f} dB | "
              f"{kmax}repeat-last {figures['psnr_repeat_last']:.2f} dB | action-shuffle gap {gap}")
        # measuring instruments live in dynamics_eval.py; imported here so the method file never
        # depends on them at import time
        import dynamics_eval
        summary.update(dynamics_eval.report(model, tok, held, a, device, figures, rollouts))
        summary["eval_s"] = time.time() - t0
    common.write_json(os.path.join(a.out, "summary.json"), summary)
    print("summary:", json.dumps(summary))
    return summary


# ---- Headline evaluation: held-out open-loop rollouts --------------------------------------------


def psnr_scores(name: str, x: torch.Tensor, true: torch.Tensor) -> dict:
    """Rollout PSNR of frames x against true, both (B, H, H_px, W_px, 3) (not in paper):
    `psnr_<name>_per_horizon[h]` = 10·log10(1 / MSE_h), MSE_h the squared pixel error over all
    held-out windows at horizon h; `psnr_<name>` averages those dB over the horizons. The mean of
    per-frame PSNRs (`…_frame_mean`, kept beside it) flatters copies of unchanged frames (100 dB).
    """
    per_horizon = psnr_of_mean_mse(x, true).tolist()  # (H,)
    return {f"psnr_{name}_per_horizon": per_horizon,
            f"psnr_{name}": float(np.mean(per_horizon)),
            f"psnr_{name}_frame_mean": float(psnr(x, true).mean())}


def decode_after(tok, context: torch.Tensor, z_gen: torch.Tensor, device) -> torch.Tensor:
    """Pixels of generated packed latents z_gen (B, H, N_z, C_z) that follow the unpacked context
    latents (B, T_c, N_b, D_b): the tokenizer decoder is causal, so both go in one pass."""
    Tc = context.shape[1]
    z = torch.cat([context, unpack(z_gen.to(context.dtype))], 1)  # (B, T_c + H, N_b, D_b)
    with common.autocast(device):
        return tok.decode(z).float()[:, Tc:].clamp(0, 1)  # (B, H, H_px, W_px, 3)


@torch.no_grad()
def evaluate(model: DynamicsModel, tok, held: LatentCache, a: Args, device):
    """Headline figures: held-out open-loop rollouts with the true actions for K = sample_k and
    K_max, the repeat-last-frame baseline, and the action-shuffle gap (the same rollout with another
    window's actions). Returns (figures, rollouts): summary keys, what dynamics_eval reuses."""
    Tc, H = a.eval_context, a.eval_horizon
    held.rng = np.random.default_rng([a.seed, 999])  # the same held-out windows every evaluation
    batch = held.sample(a.eval_seqs, Tc + H, with_frames=True)
    lat = batch["latents"].to(device)  # (B, T, N_b, D_b)
    actions = None if batch["actions"] is None else batch["actions"].to(device)  # (B, T, A)
    true = batch["frames"].to(device).float() / 255  # (B, T, H_px, W_px, 3)
    ctx = pack(lat[:, :Tc])  # (B, T_c, N_z, C_z)
    ro = {"batch": batch, "latents": lat, "actions": actions, "true": true, "z": {}, "pixels": {}}

    def generate(name, k, acts, n=len(lat)):  # K = k steps per frame on the first n windows,
        gen = torch.Generator(device).manual_seed(a.seed)  # the same noise for every K and acts
        acts = None if acts is None else acts[:n]  # (n, T, A)
        with common.autocast(device):
            z = rollout(model, ctx[:n], acts, H, k, a.ctx_tau, gen).float()  # (n, H, N_z, C_z)
        ro["z"][name] = z
        ro["pixels"][name] = decode_after(tok, lat[:n, :Tc], z, device)  # (n, H, H_px, W_px, 3)
        return psnr_scores(name, ro["pixels"][name], true[:n, Tc:])

    figures = generate(f"k{a.sample_k}", a.sample_k, actions)
    if a.k_max != a.sample_k:
        # K_max runs k_max / sample_k times the network passes: on a subset of the windows, with
        # K = sample_k scored on the same subset beside it (the figure that compares the two)
        n = a.eval_seqs_kmax if 0 < a.eval_seqs_kmax < len(lat) else len(lat)
        figures.update(generate(f"k{a.k_max}", a.k_max, actions, n))
        px = ro["pixels"][f"k{a.sample_k}"][:n]  # (n, H, H_px, W_px, 3)
        same = psnr_scores(f"k{a.sample_k}_kmax_windows", px, true[:n, Tc:])
        figures.update(same)
        figures["eval_seqs_kmax"] = n
    repeat_last = true[:, Tc - 1:Tc].expand_as(true[:, Tc:])  # (B, H, H_px, W_px, 3)
    figures.update(psnr_scores("repeat_last", repeat_last, true[:, Tc:]))
    ro["shuffled"] = None
    if actions is not None and actions.shape[0] > 1:
        # another window's actions, from the one that leads into the first generated frame on
        ro["shuffled"] = actions.clone()
        ro["shuffled"][:, Tc - 1:] = actions[torch.roll(torch.arange(len(actions)), 1), Tc - 1:]
        figures.update(generate("shuffled", a.sample_k, ro["shuffled"]))
        figures["action_shuffle_gap_db"] = figures[f"psnr_k{a.sample_k}"] - figures["psnr_shuffled"]
    return figures, ro


def main():
    train(common.parse_args(Args, PRESETS))


if __name__ == "__main__":
    common.run_main(main, Args, PRESETS)  # Ctrl-C: a short message with the --resume command
