"""Shared primitives of minidreamer4: the efficient transformer of Dreamer 4 §3.4, and plumbing.

Everything in this file is used by more than one stage. Objectives, samplers and training loops
live in their stage files (tokenizer.py, dynamics.py, agent.py, imagine.py), never here.

Paper coverage (§3.4 "Efficient transformer", §3 intro):
  - pre-layer RMSNorm, RoPE, SwiGLU MLP                    -> RMSNorm, rope_angles, SwiGLU
  - QKNorm and attention-logit soft capping                -> Attention, attend
  - separate space-only and time-only attention, time
    attention only every 4th layer, causal in time         -> SpaceTimeTransformer, time_mask
  - GQA (several query heads share one KV head)            -> Attention(n_kv_heads=...)
  - a KV cache over the time axis for fast generation      -> KVCache
  - "all loss terms are divided by running estimates of their RMS" -> RunningRMS

Plumbing (not in paper): arguments, data parallelism under torchrun, the device and the compute
dtype (a start-up matmul probe picks bf16 autocast where it is measurably faster), FLOPs and MFU,
seeding, checkpoints, logs.

Deviations from the paper and choices it leaves open: docs/deviations.md (section `common.py`).

Shape legend (used in every file):
  B batch, T time (frames), N tokens per frame, D model width, H/W pixels, C channels,
  P patch size, K sampling steps, L MTP length, A action components,
  Hq query heads, Hk key/value heads, Dh head width.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import inspect
import json
import math
import os
import random
import re
import shlex
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


# ------------------------------------------------------------------------------- Model primitives
class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · g   (pre-layer norm of §3.4; also QKNorm's norm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Compute the statistic in fp32: under bf16 autocast the mean of squares loses precision.
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


class SwiGLU(nn.Module):
    """MLP(x) = W₂ (silu(W₁x) ⊙ W₃x)   (§3.4: "SwiGLU MLP")."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # value
        self.w2 = nn.Linear(hidden, dim, bias=False)  # out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def rope_angles(positions: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """RoPE angles θ_{p,i} = p · base^(−2i/dim) over `dim` channels: (..., S) → (..., S, dim/2)."""
    i2 = torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device)  # (dim/2,) = 2i
    freqs = base ** (-i2 / dim)  # (dim/2,)
    return positions.float().unsqueeze(-1) * freqs  # (..., S, dim/2)


def rope_angles_2d(rows: torch.Tensor, cols: torch.Tensor, dim: int,
                   base: float = 10000.0) -> torch.Tensor:
    """Axial 2-D RoPE angles: half of the channel pairs rotate with the row, half with the column.

    rows, cols: (S,) integer grid coordinates.  Returns (S, dim/2) angles. Not in paper: the
    paper does not say how space positions are encoded (docs/deviations.md).
    """
    assert dim % 4 == 0, f"2-D RoPE needs head width divisible by 4, got {dim}"
    row_angles = rope_angles(rows, dim // 2, base)  # (S, dim/4)
    col_angles = rope_angles(cols, dim // 2, base)  # (S, dim/4)
    return torch.cat([row_angles, col_angles], dim=-1)  # (S, dim/2)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (x_{2i}, x_{2i+1}) by θ_i: the RoPE of Su et al., used in §3.4.

    x: (..., S, Dh);  angles: (S, Dh/2) broadcast over the leading dims.
    Property (tested): ⟨rope(q, p), rope(k, p′)⟩ depends only on p − p′.
    """
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)  # (S, Dh/2)
    x1, x2 = x[..., 0::2], x[..., 1::2]  # (..., S, Dh/2) each
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (..., S, Dh/2, 2)
    return out.flatten(-2)  # (..., S, Dh)


# Fused soft-capped attention: FlexAttention applies the cap as a score modifier inside one
# compiled kernel, so the (B, Hq, S, S') logits never go to memory. On by default on CUDA only:
# on a CPU, uncompiled FlexAttention materialises the logits like the explicit form (no gain).
# "on": None = automatic (on for the device types in "auto_on"; if the kernel cannot run there,
# e.g. torch < 2.5 or no Triton, it says so once and the explicit form takes over), True/False =
# forced (tests, gpu_check.py: a failure then raises); "compiled": the kernel, compiled once.
FUSED_ATTENTION = {"on": None, "auto_on": ("cuda",), "compiled": None}


def flex_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                soft_cap: float) -> torch.Tensor:
    """attend()'s soft-capped attention through torch's FlexAttention (same shapes, same math):
    score_mod turns each scaled logit s into cap·tanh(s/cap), or −inf where the mask forbids."""
    from torch.nn.attention.flex_attention import flex_attention

    def score_mod(score, b, h, q_idx, kv_idx):
        capped = soft_cap * torch.tanh(score / soft_cap)
        if mask is None:
            return capped
        allowed = mask[q_idx, kv_idx] if mask.dim() == 2 else mask[b, 0, q_idx, kv_idx]
        return torch.where(allowed, capped, -float("inf"))

    fn = flex_attention
    if q.device.type == "cuda":  # compiled once per process: this is what fuses the kernel
        if FUSED_ATTENTION["compiled"] is None:
            FUSED_ATTENTION["compiled"] = torch.compile(flex_attention)
        fn = FUSED_ATTENTION["compiled"]
    dt = v.dtype  # under autocast the QKNormed q, k are fp32 and v bf16; the kernel wants one
    return fn(q.to(dt), k.to(dt), v, score_mod=score_mod, enable_gqa=q.shape[1] != k.shape[1])


def fused_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                 soft_cap: float) -> torch.Tensor | None:
    """flex_attend where FUSED_ATTENTION says so; None = use the explicit form."""
    on = FUSED_ATTENTION["on"]
    if on is False or (on is None and q.device.type not in FUSED_ATTENTION["auto_on"]):
        return None
    if FlopMeter._open is not None:  # torch's FLOP counter cannot trace FlexAttention: the
        return None                  # counted step runs the explicit form (the same matmuls)
    try:
        return flex_attend(q, k, v, mask, soft_cap)  # (B, Hq, S, Dh)
    except Exception as e:  # ImportError (torch < 2.5), a compiler without Triton, ...
        if on:
            raise
        FUSED_ATTENTION["on"] = False  # once: the rest of the run uses the explicit form
        print(f"!! fused attention is not available here ({type(e).__name__}: "
              f"{str(e).splitlines()[0][:200] if str(e) else ''}); using the explicit form")
        return None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           soft_cap: float) -> torch.Tensor:
    """softmax(cap·tanh(q·kᵀ/(√Dh·cap)) + mask) v   — attention with the §3.4 logit soft cap.

    q: (B, Hq, S, Dh); k, v: (B, Hk, S', Dh) with Hq a multiple of Hk (GQA: query head h reads
    key/value head h // (Hq/Hk)); mask: bool, True = may attend, broadcastable to (B, Hq, S, S').
    The cap needs the raw logits, which F.scaled_dot_product_attention never exposes: with a cap
    the attention is explicit, or FlexAttention on CUDA (FUSED_ATTENTION); soft_cap = 0 uses
    the fused SDPA kernel (both tested to agree with the explicit form).
    """
    B, Hq, S, Dh = q.shape
    Hk = k.shape[1]
    assert Hq % Hk == 0, f"GQA needs n_heads ({Hq}) to be a multiple of n_kv_heads ({Hk})"
    fused = fused_attend(q, k, v, mask, soft_cap) if soft_cap else None
    if fused is not None:
        return fused  # (B, Hq, S, Dh)
    if Hk != Hq:  # GQA: share each KV head among Hq/Hk query heads
        k = k.repeat_interleave(Hq // Hk, dim=1)  # (B, Hq, S', Dh)
        v = v.repeat_interleave(Hq // Hk, dim=1)  # (B, Hq, S', Dh)
    if not soft_cap:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, Hq, S, Dh)
    logits = (q @ k.transpose(-1, -2)).float() / math.sqrt(Dh)  # (B, Hq, S, S')
    # Soft cap (Gemma 2 form): logits stay in (−cap, cap); gradients stay finite.
    logits = soft_cap * torch.tanh(logits / soft_cap)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return (logits.softmax(-1).to(v.dtype)) @ v  # (B, Hq, S, Dh)


class Attention(nn.Module):
    """Multi-head attention with QKNorm, soft cap, GQA and RoPE (§3.4).

    Used both over the tokens of one frame ("space") and over the frames of one token slot
    ("time"). The caller supplies the RoPE angles and the boolean mask.
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, soft_cap: float = 50.0):
        super().__init__()
        assert dim % n_heads == 0, f"width {dim} not divisible by {n_heads} heads"
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.soft_cap = soft_cap  # 50 by default, Gemma 2's value (not in paper)
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wkv = nn.Linear(dim, 2 * n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        # QKNorm: RMS-normalise queries and keys per head before the dot product (§3.4).
        self.q_norm, self.k_norm = RMSNorm(self.head_dim), RMSNorm(self.head_dim)

    def forward(self, x: torch.Tensor, angles: torch.Tensor | None, mask: torch.Tensor | None,
                past_kv: tuple[torch.Tensor, torch.Tensor] | None = None, q_from: int = 0):
        """x: (B, S, D) → (B, S − q_from, D), plus this call's (k, v) so a cache can keep them.

        past_kv: keys/values of earlier positions (already rotated), prepended before attending.
        angles: (S, Dh/2) RoPE angles of the S new positions (keys are rotated before caching, so
        cached keys never need re-rotating — the relative-position property does the rest).
        q_from: only positions q_from … S − 1 ask (queries); all S give keys and values (the
        others are history whose outputs nobody reads; SpaceTimeTransformer's keep_last).
        """
        B, S, D = x.shape
        Sq = S - q_from  # positions that ask
        q = self.wq(x[:, q_from:]).view(B, Sq, self.n_heads, self.head_dim)  # (B, Sq, Hq, Dh)
        q = q.transpose(1, 2)  # (B, Hq, Sq, Dh)
        kv = self.wkv(x).view(B, S, 2, self.n_kv_heads, self.head_dim)  # (B, S, 2, Hk, Dh)
        k, v = kv.permute(2, 0, 3, 1, 4)  # 2 × (B, Hk, S, Dh)
        q, k = self.q_norm(q), self.k_norm(k)
        if angles is not None:
            q, k = apply_rope(q, angles[q_from:]), apply_rope(k, angles)
        if mask is not None and q_from:
            mask = mask[..., q_from:, :]  # (…, Sq, S_k): the rows of the asking positions
        new_kv = (k, v)
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=2)  # (B, Hk, S_past + S, Dh)
            v = torch.cat([past_kv[1], v], dim=2)  # (B, Hk, S_past + S, Dh)
        out = attend(q, k, v, mask, self.soft_cap)  # (B, Hq, Sq, Dh)
        out = out.transpose(1, 2).reshape(B, Sq, D)  # (B, Sq, D)
        return self.wo(out), new_kv


def time_mask(T_q: int, T_k: int, window: int, independent: torch.Tensor | None = None,
              device=None) -> torch.Tensor:
    """Boolean time-attention mask (True = may attend), causal and windowed to C = `window` frames.

    Queries are the last T_q of T_k frames (T_k − T_q frames come from a KV cache). Query frame i
    (absolute index T_k − T_q + i) sees key frame j iff  i_abs − C < j ≤ i_abs.
    independent: (B,) bool — sequences treated as separate images (§3.4 "start frames"): their
    frames see only themselves. Returns (T_q, T_k), or (B, 1, T_q, T_k) when `independent` is given.
    """
    q_abs = torch.arange(T_k - T_q, T_k, device=device)[:, None]  # (T_q, 1)
    k_abs = torch.arange(T_k, device=device)[None, :]  # (1, T_k)
    mask = (k_abs <= q_abs) & (k_abs > q_abs - window)  # (T_q, T_k)
    if independent is None:
        return mask
    diag = k_abs == q_abs  # (T_q, T_k)
    return torch.where(independent.view(-1, 1, 1, 1), diag, mask)  # (B, 1, T_q, T_k)


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)) (§3.4)."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, mlp_ratio: float, soft_cap: float,
                 is_time: bool):
        super().__init__()
        self.is_time = is_time  # time layers attend over frames, space layers within a frame
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.attn = Attention(dim, n_heads, n_kv_heads, soft_cap)
        self.mlp = SwiGLU(dim, int(dim * mlp_ratio))

    def forward(self, x, angles, mask, past_kv=None, q_from: int = 0):
        """x (B, S, D) → (B, S − q_from, D): positions before q_from only give keys and values."""
        h, new_kv = self.attn(self.norm1(x), angles, mask, past_kv, q_from)
        x = x[:, q_from:] + h
        return x + self.mlp(self.norm2(x)), new_kv


class KVCache:
    """Keys/values of the time-attention layers for frames already processed (§3.4 inference).

    One (k, v) pair per time layer, each (B·N, Hk, T_cached, Dh), trimmed to the last C − 1
    frames (the window: a new frame sees itself plus C − 1 cached frames). `pos` is the absolute
    time index of the next frame, so RoPE keeps advancing by exactly one per committed frame.
    """

    def __init__(self, window: int):
        self.window, self.pos, self.kv = window, 0, {}


class SpaceTimeTransformer(nn.Module):
    """The §3.4 transformer on x: (B, T, N, D).

    Layer i attends over time iff i % time_every equals time_layer % time_every (time_layer = −1:
    the last layer of every group of time_every, 0: the first).
    Space layers: the N tokens of one frame attend to each other under `space_mask` (N, N) bool
    (True = may attend): this is how the tokenizer and the dynamics say which token groups see
    which (encoder/decoder masks, one-way agent tokens). Space RoPE is given per token
    (`space_pos`); tokens without a grid position sit at (0, 0) (not in paper).
    Time layers: each token slot n attends to slot n of earlier frames, causally, windowed to C,
    with 1-D RoPE over absolute frame positions (which tokens take part: not in paper). Slots
    before `time_from` skip the time layers (the tokenizer's patch and read-out tokens: only its
    latents carry a frame's past; docs/deviations.md).
    """

    def __init__(self, dim: int, depth: int, n_heads: int, n_kv_heads: int | None = None,
                 time_every: int = 4, window: int = 32, mlp_ratio: float = 4.0,
                 soft_cap: float = 50.0, rope_base: float = 10000.0,
                 space_rope_base: float | None = None, time_layer: int = -1,
                 time_from: int = 0):
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        self.time_from = time_from  # the first token slot that takes part in time attention
        self.window, self.head_dim, self.rope_base = window, dim // n_heads, rope_base
        # A small grid (e.g. 4×4 patches) needs faster-rotating spatial frequencies than base
        # 10⁴ gives, or neighbouring patches look alike (tokenizer.py uses 10; not in paper).
        self.space_rope_base = space_rope_base or rope_base
        self.blocks = nn.ModuleList(
            Block(dim, n_heads, n_kv_heads, mlp_ratio, soft_cap,
                  is_time=i % time_every == time_layer % time_every)
            for i in range(depth))
        self.norm = RMSNorm(dim)

    def forward(self, x: torch.Tensor, space_pos: torch.Tensor | None = None,
                space_mask: torch.Tensor | None = None, independent: torch.Tensor | None = None,
                cache: KVCache | None = None, commit: bool = False,
                time_layout: tuple[torch.Tensor, torch.Tensor] | None = None,
                keep_last: int | None = None) -> torch.Tensor:
        """x: (B, T, N, D) → (B, T, N, D), final RMSNorm applied.

        space_pos: (N, 2) integer (row, col) per token for 2-D RoPE, or None for no spatial RoPE.
        independent: (B,) bool, sequences whose frames must not see each other (start frames).
        cache: time-layer KV cache; the T new frames get positions cache.pos … cache.pos + T − 1
        and attend to the cached frames. commit=True appends their keys/values to the cache (call
        with commit=False to run a denoising step without changing the context).
        time_layout: (positions (T,), mask (T, T) or (B·N, 1, T, T)) replaces the causal layout of
        the time layers, for frames that are not one plain sequence (dynamics.two_stream_layout).
        keep_last: only the last keep_last frames are returned, (B, keep_last, N, D); the others
        serve only as history (a training history stream, a context committed to the cache).
        Their part ends in the last time layer, as keys and values: after it frames no longer see
        each other. The kept frames' outputs are exactly those of the full pass, for less compute
        (not in paper).
        """
        B, T, N, D = x.shape
        f = self.time_from
        N_t = N - f  # token slots that attend over time
        assert time_layout is None or f == 0, "time_layout needs every slot in time attention"
        t0 = cache.pos if cache is not None else 0
        space_angles = None if space_pos is None else rope_angles_2d(
            space_pos[:, 0], space_pos[:, 1], self.head_dim, self.space_rope_base)  # (N, Dh/2)
        time_angles = rope_angles(torch.arange(t0, t0 + T, device=x.device), self.head_dim,
                                  self.rope_base)  # (T, Dh/2)
        # Every time layer sees the same number of cached frames, so one mask serves them all.
        T_past = next(iter(cache.kv.values()))[0].shape[2] if cache is not None and cache.kv else 0
        ind = None if independent is None else independent.repeat_interleave(N_t)  # (B·N_t,)
        t_mask = time_mask(T, T_past + T, self.window, ind, x.device)  # (T, T_k) or per slot
        if time_layout is not None:  # frames in another arrangement: their positions and mask
            time_angles = rope_angles(time_layout[0], self.head_dim, self.rope_base)  # (T, Dh/2)
            t_mask = time_layout[1]
        # the last layer where frames meet: there the frames that are not kept give keys and
        # values only, and after it they are gone (without time layers, they go at once)
        last_time = max((i for i, blk in enumerate(self.blocks) if blk.is_time), default=-1)
        T_in = T  # frames that enter; T becomes keep_last in the last time layer
        if keep_last is not None and last_time < 0:
            x, T = x[:, T - keep_last:], keep_last  # (B, keep_last, N, D)
        for i, blk in enumerate(self.blocks):
            if T == 0:  # nothing is read (a cache commit): the cache is already written
                break
            if blk.is_time:
                xt = x[:, :, f:].permute(0, 2, 1, 3).reshape(B * N_t, T, D)  # (B·N_t, T, D)
                past = cache.kv.get(i) if cache is not None else None
                q_from = T - keep_last if keep_last is not None and i == last_time else 0
                xt, new_kv = blk(xt, time_angles, t_mask, past, q_from)  # (B·N_t, T − q_from, D)
                if cache is not None and commit:
                    k, v = new_kv if past is None else (torch.cat([past[0], new_kv[0]], 2),
                                                        torch.cat([past[1], new_kv[1]], 2))
                    keep = self.window - 1  # a later frame sees itself + C − 1 earlier frames
                    start = max(k.shape[2] - keep, 0)
                    cache.kv[i] = (k[:, :, start:], v[:, :, start:])  # (B·N_t, Hk, ≤ C−1, Dh)
                T = T - q_from  # the frames that go on
                xt = xt.view(B, N_t, T, D).permute(0, 2, 1, 3)  # (B, T, N_t, D)
                x = torch.cat([x[:, x.shape[1] - T:, :f], xt], 2) if f else xt  # (B, T, N, D)
            else:
                xs = x.reshape(B * T, N, D)  # (B·T, N, D)
                xs, _ = blk(xs, space_angles, space_mask)
                x = xs.view(B, T, N, D)  # (B, T, N, D)
        if cache is not None and commit:
            cache.pos += T_in
        return self.norm(x)


# --- Loss normalisation (§3 intro): "all loss terms are divided by running estimates of their RMS"
class RunningRMS:
    """Divide a loss term by a running estimate of its root-mean-square.

    ms ← decay·ms + (1 − decay)·loss²  (EMA of the squared loss; the first update sets ms = loss²)
    normalised = loss / max(√ms, floor)
    The paper gives neither the update rule nor the decay; decay 0.99 and floor 1e-3 are ours.
    Non-finite losses do not update the estimate (one bad batch must not poison it).
    The estimate is part of the checkpoint (`state_dict`), so `--resume` continues exactly.
    """

    def __init__(self, decay: float = 0.99, floor: float = 1e-3):
        self.decay, self.floor, self.ms, self.count = decay, floor, 0.0, 0

    def update(self, loss: torch.Tensor) -> None:
        # Under torchrun each rank sees the mean loss of its rows: their mean over the ranks is
        # the global batch's, so every rank keeps the estimate a single process would.
        value = all_mean(float(loss.detach()))
        if not math.isfinite(value):
            return
        sq = value ** 2
        self.ms = sq if self.count == 0 else self.decay * self.ms + (1 - self.decay) * sq
        self.count += 1

    def __call__(self, loss: torch.Tensor) -> torch.Tensor:
        """Update with this loss, then return loss / RMS (the RMS is a constant: no gradient)."""
        self.update(loss)
        return loss / max(math.sqrt(self.ms), self.floor)

    def state_dict(self) -> dict:
        return {"ms": self.ms, "count": self.count, "decay": self.decay, "floor": self.floor}

    def load_state_dict(self, state: dict) -> None:
        self.ms, self.count = float(state["ms"]), int(state["count"])
        self.decay, self.floor = float(state["decay"]), float(state["floor"])


# ------------------------------------- Plumbing: arguments, device, seeding, checkpoints, metrics
def _field_help(cls) -> dict[str, str]:
    """The trailing `# help` comment of every `name: type = default  # help` line of a dataclass."""
    helps = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+)\s*:[^=]+=.*?#\s*(.*)$", line)
        if m:
            helps[m.group(1)] = m.group(2).strip()
    return helps


# The valid range of the numeric flags, by field name: a name means the same kind of number in
# every stage. parse_args checks every resolved value (default, preset, flag) against it, so a
# bad number stops the run at once and names its range, instead of a numpy error minutes later or
# a run that trains nothing and exits 0. An integer field not listed here is a count, size or
# interval and must be ≥ 1, or ≥ 0 when its help says what 0 means ("0 = off", "0 skips …").
POSITIVE, NON_NEGATIVE = (lambda v: v > 0, "> 0"), (lambda v: v >= 0, "≥ 0")
AT_LEAST_ONE = (lambda v: v >= 1, "≥ 1")
FRACTION, SIGNAL = (lambda v: 0 <= v <= 1, "in [0, 1]"), (lambda v: 0 < v <= 1, "in (0, 1]")
FLAG_RANGES = {
    **dict.fromkeys(("lr", "value_lr", "grad_clip", "mlp_ratio"), POSITIVE),
    # space_rope_base: 0 = no space RoPE in dynamics.py (the tokenizer's default is 10)
    **dict.fromkeys(("weight_decay", "lpips_weight", "boot_clip", "beta", "soft_cap", "warmup",
                     "seed", "stop_at", "resize", "space_rope_base", "event_weight"), NON_NEGATIVE),
    **dict.fromkeys(("mae_max", "flow_frac", "start_frac", "event_frac", "inventory_frac",
                     "relevant_frac", "long_only_frac", "lam", "alpha"), FRACTION),
    **dict.fromkeys(("ctx_tau", "gamma"), SIGNAL),
    "ema": (lambda v: 0 <= v < 1, "in [0, 1)"),  # 1 would never move the EMA weights
    "heldout": (lambda v: 0 < v < 1, "in (0, 1)"),  # both splits must hold an episode
    "time_layer": (lambda v: True, "any layer index (−1 = the last)"),
}


def flag_range(name: str, kind: type, help_text: str):
    """(check, description) of the values field `name` accepts, or None when any value goes."""
    if name in FLAG_RANGES:
        return FLAG_RANGES[name]
    if kind is int:
        return NON_NEGATIVE if re.search(r"\b0 (=|skips)", help_text) else AT_LEAST_ONE
    return None


def parse_args(cls, presets: dict[str, dict] | None = None, argv: list[str] | None = None):
    """Turn an `Args` dataclass into a command line (stdlib argparse only).

    Field `foo_bar` becomes `--foo-bar`; bools become `--flag/--no-flag`; each field's trailing
    comment is its help. `--preset NAME` applies `presets[NAME]`; flags given explicitly win.
    Precedence: dataclass default < preset < explicit flag. `--preset NAME --help` shows NAME's
    values. Numbers outside their range (FLAG_RANGES) are rejected with the range.
    """
    presets = presets or {}
    helps = _field_help(cls)
    # The preset is read first, so that `--preset smoke --help` shows the smoke values.
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--preset")
    asked = early.parse_known_args(argv)[0].preset
    shown = presets.get(asked, {})
    description = (inspect.getmodule(cls).__doc__ or "").split("\n")[0]
    parser = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS)
    kinds = {}  # field -> int, float or str
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f"(default: {f.default})"
        if f.name in shown and shown[f.name] != f.default:
            default = f"(default: {shown[f.name]} with --preset {asked}; {f.default} without)"
        help_text = f"{helps.get(f.name, '')} {default}".replace("%", "%%")  # argparse %-formats
        if f.name == "preset":
            parser.add_argument(flag, choices=["default", *presets], help=help_text)
        elif f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            type_name = f.type if isinstance(f.type, str) else f.type.__name__
            kinds[f.name] = {"int": int, "float": float, "str": str}.get(type_name, str)
            parser.add_argument(flag, type=kinds[f.name], help=help_text)
    given = vars(parser.parse_args(argv))
    values = {f.name: f.default for f in dataclasses.fields(cls)}
    preset = given.get("preset", values.get("preset", "default"))
    if preset != "default":
        values.update(presets[preset])
    values.update(given)
    for name, kind in kinds.items():
        valid = flag_range(name, kind, helps.get(name, ""))
        if kind in (int, float) and valid and not valid[0](values[name]):
            where = "" if name in given else f" (from --preset {preset})"
            parser.error(f"argument --{name.replace('_', '-')}: {values[name]}{where} is out of "
                         f"range; it must be {valid[1]}")
    args = cls(**values)
    args._given = set(given)  # the flags typed on the command line
    return args


def lr_at(step: int, lr: float, warmup: int, steps: int) -> float:
    """Linear warm-up to lr, then cosine decay to 10 % of it (not in paper: no optimiser given)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def device_name(name: str, cuda_ok: bool, mps_ok: bool) -> str:
    """--device → the device to use: auto is cuda, then mps (Apple GPUs), then cpu; a device
    asked for but not present falls back to cpu with a message rather than a torch traceback."""
    if name == "auto":
        return "cuda" if cuda_ok else ("mps" if mps_ok else "cpu")
    kind = name.split(":")[0]
    if (kind == "cuda" and not cuda_ok) or (kind == "mps" and not mps_ok):
        why = ("this torch has no working mps backend (Apple GPUs need macOS 12.3+ and an arm64 "
               "build)" if kind == "mps" else "torch sees no CUDA GPU")
        print(f"!! --device {name} is not available: {why}; falling back to cpu")
        return "cpu"
    return name


def pick_device(name: str = "auto", dtype: str = "auto") -> torch.device:
    """--device auto picks cuda, then mps, then cpu, and says which; then the compute dtype
    (--dtype auto|fp32|bf16) is decided for this process by a matmul probe (set_compute_dtype)."""
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    device = torch.device(device_name(name, torch.cuda.is_available(), mps))
    if device.type == "mps" and os.environ.get("PYTORCH_ENABLE_MPS_FALLBACK") != "1":
        # torch reads this variable at import, so it cannot be switched on from here
        print("note: on mps, an operation Apple's backend lacks stops the run with "
              "NotImplementedError; start with PYTORCH_ENABLE_MPS_FALLBACK=1 to run it on the CPU")
    if device.type == "mps" and world_size() > 1:  # gloo cannot reduce mps tensors
        raise SystemExit("torchrun on mps: a Mac has one GPU, start the stage with python "
                         "(or pass --device cpu to run the ranks on the CPU)")
    if device.type == "cuda" and device.index is None and world_size() > 1:
        device = torch.device("cuda", torch.cuda.current_device())  # this rank's GPU
    print(f"device: {device}")
    set_compute_dtype(device, dtype)
    return device


def pick_device_for_run(a) -> torch.device:
    """pick_device for a stage's training run `a` (its Args). The concrete compute dtype goes back
    into a.dtype, so args.json and the checkpoint record it; with --resume and --dtype auto the
    run's recorded dtype is reused (a second probe on a busy machine could choose the other one,
    and a resumed run must equal an uninterrupted one)."""
    dtype = a.dtype
    recorded = os.path.join(a.out, "args.json")
    if a.resume and dtype == "auto" and os.path.exists(recorded):
        with open(recorded) as f:
            dtype = json.load(f).get("dtype", "auto")  # auto: a run from before the probe
    device = pick_device(a.device, dtype)
    a.dtype = compute_dtype(device)
    return device


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch. Data and noise samplers get their own generators besides."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------- Data parallelism under torchrun (not in paper; the nanoGPT way)
# `torchrun --nproc_per_node=G tokenizer.py ...` starts G copies of a stage, each with RANK,
# LOCAL_RANK and WORLD_SIZE in its environment. Every piece of the mechanism is here; a stage's
# train() adds a few lines: init_distributed(), shard() its batch, sync_gradients() after
# backward, and rank-0 guards on logs, checkpoints and evaluation.
#
# How a step is split (a choice, so that G ranks × B/G rows equal 1 rank × B rows): every rank
# draws the whole global batch's random choices from the same (seed, step) streams as a single
# process, then keeps every G-th row (shard). So each rank's data stream is a fixed slice of
# the single-process stream: the N-rank run follows the 1-rank run step for step (up to the
# order of float sums), --resume needs nothing new (even with another number of ranks), and the
# price is that every rank gathers the global batch's rows (cheap next to the model at these
# sizes). Gradients: each rank backpropagates the mean loss of its rows, and sync_gradients
# averages the gradients, i.e. the gradient of the mean over all B rows (masked means need one
# more step: rank_weight). We do not wrap the model in DistributedDataParallel: the dynamics
# loss calls the model several times per step (the half-step passes of Eq 7, under no_grad),
# and one explicit all-reduce after backward is simpler to see correct than DDP's hooks (it
# gives up DDP's overlap of communication with the backward pass: fine at this scale).
# Logged training figures are rank 0's rows; the loss normalisers see the global mean.

def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0 (or the only process): the one that logs, checkpoints and evaluates."""
    return rank() == 0


def init_distributed(device: str = "auto") -> int:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); returns the world size.

    Backend: nccl between CUDA GPUs, gloo otherwise (CPU; also the tests). Ranks other than 0
    print nothing, so the log reads as a single process's (print(..., force=True) still does).
    The group is left at exit (atexit), so no stage needs a teardown call on each of its returns.
    """
    if world_size() > 1 or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return world_size()
    cuda = device.split(":")[0] in ("auto", "cuda") and torch.cuda.is_available()
    if cuda:  # before any CUDA work: this process's GPU is its LOCAL_RANK
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    atexit.register(dist.destroy_process_group)
    if not is_main():
        import builtins
        plain_print = builtins.print

        def print_on_rank0_only(*args, force: bool = False, **kwargs):
            if force:
                plain_print(*args, **kwargs)
        builtins.print = print_on_rank0_only
    print(f"data parallel: {world_size()} ranks ({dist.get_backend()} backend)")
    return world_size()


@contextlib.contextmanager
def rank0_first():
    """Rank 0 runs the block first, the other ranks after it has finished: for a step that
    writes files the ranks then read (generating a missing dataset), which G ranks at once would
    write over one another. A plain block in a single process."""
    if not is_main():
        dist.barrier()  # wait for rank 0's pass through the block
    yield
    if is_main() and world_size() > 1:
        dist.barrier()  # rank 0 is done: release the others


def single_process_only(stage: str) -> None:
    """A stage that is not data-parallel refuses torchrun, rather than train G copies that
    overwrite one another's run folder. (imagine.py: each step's cost is generating rollouts,
    which sharding a global batch's draws would repeat on every rank.)"""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit(f"{stage} runs in one process: start it with python, not torchrun "
                         f"(data parallelism covers tokenizer.py, dynamics.py and agent.py)")


def check_batch(flag: str, batch: int) -> int:
    """Rows per rank for a global batch of `batch` rows; a clear error if the ranks cannot split
    it evenly (uneven shards would weight the ranks' rows unequally in the averaged gradient).
    flag: how the user sets that number (the message names it)."""
    n = world_size()
    if batch % n:
        raise ValueError(f"{flag} = {batch} rows of the global batch must be divisible by the "
                         f"{n} ranks of this torchrun (each rank takes 1/{n} of them): change "
                         f"the batch or the number of processes (--nproc_per_node)")
    return batch // n


def shard(x, flag: str = "--batch"):
    """This rank's rows of a global batch: tensor (B, ...) → (B/G, ...); dicts and None too.

    Strided (rank r keeps rows r, r + G, r + 2G, …), so a batch made of parts, like agent.py's
    uniform rows followed by its task-relevant rows, gives every rank its share of each part,
    in the same order (the first rows of a shard are then its uniform ones)."""
    if isinstance(x, dict):
        return {k: shard(v, flag) for k, v in x.items()}
    if x is None or world_size() == 1:
        return x
    check_batch(flag, x.shape[0])
    return x[rank()::world_size()]


def rank_weight(count: torch.Tensor) -> torch.Tensor | float:
    """The factor that turns a rank's masked mean into its share of the global masked mean.

    A masked mean sum_r / count_r per rank, averaged over G ranks, is not Σ sum_r / Σ count_r
    when the ranks' counts differ. Multiplied by count_r · G / Σ count_r it becomes
    G · sum_r / Σ count_r, whose average over the ranks (sync_gradients) is the global mean.
    1.0 in a single process. A collective: call it on every rank, in training only."""
    if world_size() == 1:
        return 1.0
    total = count.detach().float().clone()
    dist.all_reduce(total)
    return count.detach().float() * world_size() / total.clamp_min(1)


def sync_gradients(model: nn.Module) -> None:
    """Average the gradients over the ranks (call after backward, before clipping): every rank
    then holds the gradient of the global batch's mean loss and takes the same optimiser step.

    One all-reduce of all gradients flattened into one buffer. A parameter without a gradient
    on some rank (a path its rows did not use) counts as zero there; one without a gradient on
    every rank keeps grad None, as in a single process (AdamW then skips it)."""
    n = world_size()
    if n == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    dev = params[0].device
    used = torch.tensor([float(p.grad is not None) for p in params], device=dev)
    dist.all_reduce(used, op=dist.ReduceOp.MAX)
    live = [p for p, u in zip(params, used.tolist()) if u]
    if not live:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in live])
    dist.all_reduce(flat)
    flat /= n
    offset = 0
    for p in live:  # views into the one buffer: no second copy of the gradients
        p.grad = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()


def all_mean(value: float) -> float:
    """The mean of a number over the ranks (the number itself in a single process)."""
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":  # nccl moves GPU tensors only
        t = t.cuda()
    dist.all_reduce(t)
    return float(t) / world_size()


# ------------------------------------------------ Compute dtype (a measured probe) and MFU
# Rows × D_in → D_out of the cpu preset's matmuls: the tokenizer's 64 → 256 and the dynamics'
# 128 → 512 SwiGLU maps over a batch of tokens. The bf16 gain depends on the shape and the chip
# (bf16 matrix units or not), so it is measured where the stages run, not assumed.
PROBE_SHAPES = ((2304, 64, 256), (1408, 128, 512))
# The one process-wide decision, like torch's own thread count: set by pick_device at start-up,
# read by autocast() at every call site. Before any decision: bf16 on CUDA only.
_COMPUTE = {"dtype": None, "peaks": {}}


def sync_device(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def matmul_peaks(device: torch.device, shapes=PROBE_SHAPES, rounds: int = 3,
                 reps: int = 8) -> dict[str, float]:
    """Measured FLOP/s (2·m·k·n per matmul) of fp32 and bf16 matmuls at `shapes`, with all the
    threads of the process: the best of rounds × reps single matmuls, the two dtypes interleaved
    so that a neighbour's load on shared cores hits both alike."""
    peaks = {"fp32": 0.0, "bf16": 0.0}
    gen = torch.Generator(device).manual_seed(0)  # its own: the stage's seeded streams stay put
    for _ in range(rounds):
        for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            for m, k, n in shapes:
                x = torch.randn(m, k, device=device, generator=gen).to(dt)
                w = torch.randn(k, n, device=device, generator=gen).to(dt)
                try:
                    x @ w  # warm-up: kernel choice and weight packing are not throughput
                except (RuntimeError, TypeError):  # e.g. mps before macOS 14: no bf16 matmul
                    break  # peak 0 = unsupported (choose_dtype then keeps fp32)
                for _ in range(reps):  # the best single matmul: a time slice lost to another
                    sync_device(device)      # process spoils one sample, not the whole figure
                    t0 = time.perf_counter()
                    x @ w
                    sync_device(device)
                    rate = 2 * m * k * n / max(time.perf_counter() - t0, 1e-9)
                    peaks[name] = max(peaks[name], rate)
    return peaks


def autocast_available(device_type: str) -> bool:
    """Whether this torch has autocast for the device type (mps: torch 2.5 or newer)."""
    check = getattr(torch.amp, "is_autocast_available", None)  # torch 2.4 and newer
    return check(device_type) if check else device_type in ("cuda", "cpu")


def choose_dtype(want: str, device_type: str, peaks: dict[str, float], cuda_bf16: bool = True,
                 min_gain: float = 1.3, autocast_ok: bool = True) -> str:
    """The compute dtype: `want` unless "auto"; auto is bf16 on a CUDA GPU that supports it, and
    on a CPU whose measured bf16 matmul is at least `min_gain` × its fp32 one (a smaller gain
    does not pay for the casts around every matmul); fp32 elsewhere (mps: fp32, untested
    on hardware; bf16 when asked for, autocast exists and the probe's bf16 matmul ran)."""
    assert want in ("auto", "fp32", "bf16"), f"--dtype must be auto, fp32 or bf16, got {want}"
    if want == "bf16" and not autocast_ok:  # torch.autocast would warn and compute in fp32
        print(f"!! --dtype bf16: this torch has no autocast on {device_type} (mps: torch 2.5 "
              f"or newer); computing in fp32")
        return "fp32"
    if want == "bf16" and not peaks.get("bf16", 1.0):  # the probe's bf16 matmul failed
        print(f"!! --dtype bf16: this {device_type} device cannot multiply bf16 matrices "
              f"(on mps: macOS 14 or newer); computing in fp32")
        return "fp32"
    if want != "auto":
        return want
    if device_type == "cuda":
        return "bf16" if cuda_bf16 else "fp32"
    if device_type == "cpu" and peaks.get("bf16", 0.0) >= min_gain * peaks.get("fp32", 0.0):
        return "bf16"
    return "fp32"


def set_compute_dtype(device: torch.device, want: str = "auto") -> str:
    """Probe the matmul peaks, choose the dtype for this process, print both; returns it."""
    peaks = matmul_peaks(device)
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    dtype = choose_dtype(want, device.type, peaks, cuda_bf16,
                         autocast_ok=autocast_available(device.type))
    if world_size() > 1:  # the ranks must compute alike: rank 0's probe decides for all
        dtype = "bf16" if all_mean(float(is_main() and dtype == "bf16")) > 0 else "fp32"
    _COMPUTE.update(dtype=dtype, peaks=peaks)
    how = "chosen by the probe" if want == "auto" else "--dtype"
    print(f"compute dtype: {dtype} ({how}; measured matmul peaks, torch threads "
          f"{torch.get_num_threads()}: fp32 {peaks['fp32'] / 1e9:,.0f} GFLOP/s, "
          f"bf16 {peaks['bf16'] / 1e9:,.0f} GFLOP/s)")
    return dtype


def compute_dtype(device: torch.device | str | None = None) -> str:
    """The dtype pick_device chose; before any choice, bf16 on CUDA and fp32 elsewhere."""
    if _COMPUTE["dtype"] is not None:
        return _COMPUTE["dtype"]
    return "bf16" if device is not None and torch.device(device).type == "cuda" else "fp32"


def autocast(device: torch.device | str):
    """bf16 autocast when the compute dtype is bf16, plain fp32 otherwise. What must stay fp32
    does so explicitly: RMSNorm's statistic, attention logits and softmax, the losses."""
    device = torch.device(device)
    bf16 = compute_dtype(device) == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


class FlopMeter:
    """FLOPs of one training step, counted by torch.utils.flop_counter on the run's first step.

    Made just before the training loop: counting starts at once and stops at the first
    opt.step() (forward, backward and optimiser of one real batch; slow, so never every step).
    Then speed() gives summary.json's speed keys, the MFU among them.
    """

    _open = None  # a meter still counting: a run that failed in its first step leaves one

    def __init__(self, opt: torch.optim.Optimizer):
        from torch.utils.flop_counter import FlopCounterMode
        if FlopMeter._open is not None:
            FlopMeter._open.stop()
        self.flops, self.mode = None, FlopCounterMode(display=False)
        self.mode.__enter__()
        FlopMeter._open = self
        self.hook = opt.register_step_post_hook(self._after_step)

    def _after_step(self, *_) -> None:
        self.stop()

    def stop(self) -> None:
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.flops, self.mode = self.mode.get_total_flops(), None
            self.hook.remove()
            FlopMeter._open = None

    def speed(self, device: torch.device, wall: float, steps: int, frames: int) -> dict:
        """The speed keys of summary.json for `steps` training steps of `frames` frames in all,
        taking `wall` seconds; prints the MFU."""
        self.stop()
        steps_per_s = steps / max(wall, 1e-9)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        return {"device_name": name, "wall_s": wall, "steps_per_s": steps_per_s,
                "frames_per_s": frames / max(wall, 1e-9), "peak_mem_gb": peak_memory_gb(device),
                **mfu_figures(self.flops or 0, steps_per_s)}


def mfu_figures(flops_per_step: float, steps_per_s: float, peak: float | None = None,
                dtype: str | None = None) -> dict:
    """MFU = flops_per_step · steps_per_s / peak, against the probe's measured matmul peak of the
    compute dtype (not a datasheet figure: what this process's threads reach). Printed too."""
    dtype = dtype or compute_dtype()
    peak = peak or _COMPUTE["peaks"].get(dtype) or float("nan")
    achieved = flops_per_step * steps_per_s
    mfu = achieved / peak
    print(f"speed: {flops_per_step / 1e9:.3g} GFLOP/step × {steps_per_s:.3g} steps/s = "
          f"{achieved / 1e9:.3g} GFLOP/s | MFU {100 * mfu:.1f} % of the measured {dtype} peak "
          f"({peak / 1e9:,.0f} GFLOP/s)")
    return {"compute_dtype": dtype, "peak_flops": peak, "flops_per_step": flops_per_step,
            "mfu": mfu}


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch on CUDA; on mps the memory Metal holds for torch (its
    caching allocator keeps what it took, so about the peak); peak resident memory elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 30
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2 ** 30
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2 ** 30 if sys.platform == "darwin" else 2 ** 20)  # macOS: bytes; Linux: KiB


def save_checkpoint(path: str, payload: dict) -> None:
    """Save to a temp file, then os.replace it over `path`: a crash keeps the old checkpoint."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _same_path(x: str, y: str) -> bool:
    return os.path.abspath(x) == os.path.abspath(y)


def bootstrap_ci(groups: list, n_boot: int = 4000, level: float = 0.95, seed: int = 0,
                 paired: list | None = None) -> dict:
    """A two-level bootstrap interval of a mean over seeds of means over worlds (not in paper).

    groups: one array per training seed of per-world outcomes (e.g. success 0/1). Each
    bootstrap draw resamples the seeds with replacement, then the worlds within each drawn seed,
    so the interval carries both the seed-to-seed and the world-to-world spread. paired: the
    same shape as groups, another policy's outcomes on the same worlds; then the statistic is the
    mean of groups − paired, resampled world by world together. Returns {"mean", "lo", "hi"}.
    """
    rng = np.random.default_rng(seed)
    x = [np.asarray(g, float) - (0 if paired is None else np.asarray(p, float))
         for g, p in zip(groups, paired or [None] * len(groups))]  # per seed: (worlds,)
    stats = np.empty(n_boot)
    for b in range(n_boot):
        seeds = rng.integers(len(x), size=len(x))
        stats[b] = np.mean([x[s][rng.integers(len(x[s]), size=len(x[s]))].mean() for s in seeds])
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(stats, [tail, 100 - tail])
    return {"mean": float(np.mean([v.mean() for v in x])), "lo": float(lo), "hi": float(hi)}


def parent_path(child: str, stored: str) -> str:
    """The path of a parent checkpoint as a child checkpoint `child` stores it: absolute in a run
    folder, relative to the child's own folder in the shipped models (models.py)."""
    return stored if os.path.isabs(stored) else os.path.join(os.path.dirname(child), stored)


def command_for(script: str, cls, presets: dict, run_dir: str, recorded: dict | None = None) -> str:
    """The command that (re)writes the run folder `run_dir` of `script` (e.g. "tokenizer.py"),
    with the run's own flags: its preset and the values that differ from that preset, read from
    `recorded` or run_dir/args.json (a flag the record lacks: its default); without either, the
    preset whose run folder run_dir is. --out unless it is the preset's own run folder. Error
    messages suggest it: it must work as written."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    recorded = recorded or {}
    if not recorded and os.path.exists(os.path.join(run_dir, "args.json")):
        with open(os.path.join(run_dir, "args.json")) as f:
            recorded = json.load(f)
    preset = recorded.get("preset") or next(
        (n for n, p in presets.items() if _same_path(p.get("out", ""), run_dir)), "default")
    values = {**defaults, **presets.get(preset, {})}
    # A flag newer than the run is missing from its record: the run ran with the flag's default
    # (a new flag defaults to the behaviour before it), which the preset may since have changed.
    ran = {}
    if recorded:
        ran = {n: v for n, v in defaults.items() if n not in recorded} | recorded
    flags = [] if preset == "default" else ["--preset", preset]
    for name, value in ran.items():
        # Not the run's identity: where it ran, how it was interrupted, its resolved dtype.
        if name in ("preset", "out", "resume", "stop_at", "device", "dtype", "compile"):
            continue
        if name not in values or value == values[name]:
            continue
        flag = name.replace("_", "-")
        if isinstance(value, bool):
            flags += ["--" + ("" if value else "no-") + flag]
        else:
            flags += ["--" + flag, str(value)]
    if not _same_path(values["out"], run_dir):
        flags += ["--out", run_dir]
    return shlex.join(["python", script, *flags])


def load_checkpoint(path: str, stage: str, how_to_make: str) -> dict:
    """Load a checkpoint with weights_only=True and say clearly what is wrong if it is not usable.

    stage: the stage that must have written it; how_to_make: the command that writes it.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {stage} checkpoint at {path}: run `{how_to_make}` first "
                                f"(or point the flag at an existing checkpoint)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, pickled objects, ...
        raise RuntimeError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e}). "
                           f"Delete it and run `{how_to_make}` again.") from e
    if not isinstance(ckpt, dict) or ckpt.get("stage") != stage:
        found = ckpt.get("stage") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is a '{found}' checkpoint, expected a '{stage}' checkpoint "
                         f"(written by `{how_to_make}`)")
    return ckpt


def _logged_step(line: str) -> float:
    """The step of one metrics.jsonl line; inf for a line cut off by a crash (dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class MetricsLog:
    """One grep-able line per log step on stdout, and the same numbers in metrics.jsonl."""

    def __init__(self, out_dir: str, total_steps: int, resume: bool = False, start_step: int = 0):
        os.makedirs(out_dir, exist_ok=True)
        self.path, self.total = os.path.join(out_dir, "metrics.jsonl"), total_steps
        if not resume and os.path.exists(self.path):
            os.remove(self.path)  # a fresh run starts a fresh log
        elif os.path.exists(self.path):
            # The interrupted run may have logged steps after its last checkpoint; the resumed run
            # logs them again, so they are dropped here (a step appears once in the log).
            with open(self.path) as f:
                kept = [line for line in f if _logged_step(line) <= start_step]
            with open(self.path, "w") as f:
                f.writelines(kept)
        self.t_last, self.step_last = time.time(), start_step  # speed is measured from here

    def log(self, step: int, metrics: dict, frames_per_step: int = 0) -> dict:
        now = time.time()
        dt = (now - self.t_last) / max(step - self.step_last, 1)
        self.t_last, self.step_last = now, step
        metrics = {k: float(v.detach()) if torch.is_tensor(v) else float(v)
                   for k, v in metrics.items()}
        record = {"step": step, **metrics, "ms_per_step": 1000 * dt}
        parts = [f"step {step}/{self.total}"] + [f"{k} {v:.4g}" for k, v in metrics.items()]
        parts += [f"{1000 * dt:.0f} ms/step"]
        if frames_per_step:
            record["frames_per_s"] = frames_per_step / max(dt, 1e-9)
            parts += [f"{record['frames_per_s']:,.0f} frames/s"]
        eta_min = dt * (self.total - step) / 60
        print(" | ".join(parts + [f"eta {eta_min:.1f}m"]), flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        return record


def run_main(main, cls, presets: dict) -> None:
    """Run a stage's main() from the command line. Ctrl-C ends it with one short message and the
    exact command that continues the run (the same flags plus --resume), not a traceback."""
    started = time.time()
    try:
        main()
    except KeyboardInterrupt:
        argv = sys.argv[1:]
        a = parse_args(cls, presets, argv)  # the same flags: where the run folder is
        ckpt = os.path.join(a.out, "ckpt.pt")
        script = ["python", os.path.basename(sys.argv[0])]
        if os.path.exists(ckpt) and (a.resume or os.path.getmtime(ckpt) >= started):
            step = torch.load(ckpt, map_location="cpu", weights_only=True).get("step")
            resume = [] if a.resume else ["--resume"]
            print(f"\ninterrupted. The last checkpoint, {ckpt} (step {step}), is kept; continue "
                  f"the run with:\n  {shlex.join(script + argv + resume)}", flush=True)
        else:
            fresh = [x for x in argv if x != "--resume"]
            print(f"\ninterrupted before this run wrote its first checkpoint: nothing to resume. "
                  f"Start it again with:\n  {shlex.join(script + fresh)}", flush=True)
        sys.exit(130)  # the shell's status for "ended by Ctrl-C"


def check_finite(step: int, **terms: torch.Tensor) -> None:
    """Stop training with a clear message when a loss term becomes NaN or inf."""
    bad = {k: float(v) for k, v in terms.items() if not torch.isfinite(torch.as_tensor(v)).all()}
    if bad:
        raise FloatingPointError(
            f"non-finite loss at step {step}: {bad}. Lower --lr, check the data, or --resume from "
            f"the last checkpoint (it was written before this step).")


def write_json(path: str, obj: dict) -> None:
    """Write a JSON file atomically (summary.json, args.json)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)
