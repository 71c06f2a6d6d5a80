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

Plumbing (not in paper): arguments, the device and the compute dtype (a start-up matmul probe
picks bf16 autocast where it is measurably faster), FLOPs and MFU, seeding, checkpoints, logs.

Deviations from the paper and choices it leaves open: docs/deviations.md (section `common.py`).

Shape legend (used in every file):
  B batch, T time (frames), N tokens per frame, D model width, H/W pixels, C channels,
  P patch size, K sampling steps, L MTP length, A action components,
  Hq query heads, Hk key/value heads, Dh head width.
"""

from __future__ import annotations

import argparse
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


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           soft_cap: float) -> torch.Tensor:
    """softmax(cap·tanh(q·kᵀ/(√Dh·cap)) + mask) v   — attention with the §3.4 logit soft cap.

    q: (B, Hq, S, Dh); k, v: (B, Hk, S', Dh) with Hq a multiple of Hk (GQA: query head h reads
    key/value head h // (Hq/Hk)); mask: bool, True = may attend, broadcastable to (B, Hq, S, S').
    The cap needs the raw logits, which F.scaled_dot_product_attention never exposes: with a cap
    the attention is explicit; soft_cap = 0 uses the fused kernel (tested to agree).
    """
    B, Hq, S, Dh = q.shape
    Hk = k.shape[1]
    assert Hq % Hk == 0, f"GQA needs n_heads ({Hq}) to be a multiple of n_kv_heads ({Hk})"
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
                past_kv: tuple[torch.Tensor, torch.Tensor] | None = None):
        """x: (B, S, D) → (B, S, D), plus this call's (k, v) so a cache can keep them.

        past_kv: keys/values of earlier positions (already rotated), prepended before attending.
        angles: (S, Dh/2) RoPE angles of the S new positions (keys are rotated before caching, so
        cached keys never need re-rotating — the relative-position property does the rest).
        """
        B, S, D = x.shape
        q = self.wq(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)  # (B, Hq, S, Dh)
        kv = self.wkv(x).view(B, S, 2, self.n_kv_heads, self.head_dim)  # (B, S, 2, Hk, Dh)
        k, v = kv.permute(2, 0, 3, 1, 4)  # 2 × (B, Hk, S, Dh)
        q, k = self.q_norm(q), self.k_norm(k)
        if angles is not None:
            q, k = apply_rope(q, angles), apply_rope(k, angles)
        new_kv = (k, v)
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=2)  # (B, Hk, S_past + S, Dh)
            v = torch.cat([past_kv[1], v], dim=2)  # (B, Hk, S_past + S, Dh)
        out = attend(q, k, v, mask, self.soft_cap)  # (B, Hq, S, Dh)
        out = out.transpose(1, 2).reshape(B, S, D)  # (B, S, D)
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

    def forward(self, x, angles, mask, past_kv=None):
        h, new_kv = self.attn(self.norm1(x), angles, mask, past_kv)
        x = x + h
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
    with 1-D RoPE over absolute frame positions (which tokens take part: not in paper).
    """

    def __init__(self, dim: int, depth: int, n_heads: int, n_kv_heads: int | None = None,
                 time_every: int = 4, window: int = 32, mlp_ratio: float = 4.0,
                 soft_cap: float = 50.0, rope_base: float = 10000.0,
                 space_rope_base: float | None = None, time_layer: int = -1):
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
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
                cache: KVCache | None = None, commit: bool = False) -> torch.Tensor:
        """x: (B, T, N, D) → (B, T, N, D), final RMSNorm applied.

        space_pos: (N, 2) integer (row, col) per token for 2-D RoPE, or None for no spatial RoPE.
        independent: (B,) bool, sequences whose frames must not see each other (start frames).
        cache: time-layer KV cache; the T new frames get positions cache.pos … cache.pos + T − 1
        and attend to the cached frames. commit=True appends their keys/values to the cache (call
        with commit=False to run a denoising step without changing the context).
        """
        B, T, N, D = x.shape
        t0 = cache.pos if cache is not None else 0
        space_angles = None if space_pos is None else rope_angles_2d(
            space_pos[:, 0], space_pos[:, 1], self.head_dim, self.space_rope_base)  # (N, Dh/2)
        time_angles = rope_angles(torch.arange(t0, t0 + T, device=x.device), self.head_dim,
                                  self.rope_base)  # (T, Dh/2)
        # Every time layer sees the same number of cached frames, so one mask serves them all.
        T_past = next(iter(cache.kv.values()))[0].shape[2] if cache is not None and cache.kv else 0
        ind = None if independent is None else independent.repeat_interleave(N)  # (B·N,)
        t_mask = time_mask(T, T_past + T, self.window, ind, x.device)  # (T, T_k) | (B·N, 1, T, T_k)
        for i, blk in enumerate(self.blocks):
            if blk.is_time:
                xt = x.permute(0, 2, 1, 3).reshape(B * N, T, D)  # (B·N, T, D)
                past = cache.kv.get(i) if cache is not None else None
                xt, new_kv = blk(xt, time_angles, t_mask, past)
                if cache is not None and commit:
                    k, v = new_kv if past is None else (torch.cat([past[0], new_kv[0]], 2),
                                                        torch.cat([past[1], new_kv[1]], 2))
                    keep = self.window - 1  # a later frame sees itself + C − 1 earlier frames
                    start = max(k.shape[2] - keep, 0)
                    cache.kv[i] = (k[:, :, start:], v[:, :, start:])  # (B·N, Hk, ≤ C − 1, Dh)
                x = xt.view(B, N, T, D).permute(0, 2, 1, 3)  # (B, T, N, D)
            else:
                xs = x.reshape(B * T, N, D)  # (B·T, N, D)
                xs, _ = blk(xs, space_angles, space_mask)
                x = xs.view(B, T, N, D)  # (B, T, N, D)
        if cache is not None and commit:
            cache.pos += T
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
        value = float(loss.detach())
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
    **dict.fromkeys(("lr", "value_lr", "grad_clip", "mlp_ratio", "space_rope_base"), POSITIVE),
    **dict.fromkeys(("weight_decay", "lpips_weight", "boot_clip", "beta", "soft_cap", "warmup",
                     "seed", "stop_at", "resize"), NON_NEGATIVE),
    **dict.fromkeys(("mae_max", "flow_frac", "start_frac", "relevant_frac", "long_only_frac",
                     "lam", "alpha"), FRACTION),
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


def pick_device(name: str = "auto", dtype: str = "auto") -> torch.device:
    """--device auto picks cuda, then mps, then cpu, and says which; then the compute dtype
    (--dtype auto|fp32|bf16) is decided for this process by a matmul probe (set_compute_dtype)."""
    if name == "auto":
        mps = getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
        name = "cuda" if torch.cuda.is_available() else ("mps" if mps else "cpu")
    print(f"device: {name}")
    device = torch.device(name)
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
                x @ w  # warm-up: kernel choice and weight packing are not throughput
                for _ in range(reps):  # the best single matmul: a time slice lost to another
                    sync_device(device)      # process spoils one sample, not the whole figure
                    t0 = time.perf_counter()
                    x @ w
                    sync_device(device)
                    rate = 2 * m * k * n / max(time.perf_counter() - t0, 1e-9)
                    peaks[name] = max(peaks[name], rate)
    return peaks


def choose_dtype(want: str, device_type: str, peaks: dict[str, float], cuda_bf16: bool = True,
                 min_gain: float = 1.3) -> str:
    """The compute dtype: `want` unless "auto"; auto is bf16 on a CUDA GPU that supports it, and
    on a CPU whose measured bf16 matmul is at least `min_gain` × its fp32 one (a smaller gain
    does not pay for the casts around every matmul); fp32 elsewhere (mps: fp32, untested)."""
    assert want in ("auto", "fp32", "bf16"), f"--dtype must be auto, fp32 or bf16, got {want}"
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
    dtype = choose_dtype(want, device.type, peaks, cuda_bf16)
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
    """Peak GPU memory allocated by torch on CUDA; peak resident memory of the process elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux reports KiB


def save_checkpoint(path: str, payload: dict) -> None:
    """Save to a temp file, then os.replace it over `path`: a crash keeps the old checkpoint."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _same_path(x: str, y: str) -> bool:
    return os.path.abspath(x) == os.path.abspath(y)


def command_for(script: str, cls, presets: dict, run_dir: str, recorded: dict | None = None) -> str:
    """The command that (re)writes the run folder `run_dir` of `script` (e.g. "tokenizer.py"),
    with the run's own flags: its preset and the values that differ from that preset, read from
    `recorded` or run_dir/args.json; without either, the preset whose run folder run_dir is. --out
    unless it is the preset's own run folder. Error messages suggest it: it must work as written."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    recorded = recorded or {}
    if not recorded and os.path.exists(os.path.join(run_dir, "args.json")):
        with open(os.path.join(run_dir, "args.json")) as f:
            recorded = json.load(f)
    preset = recorded.get("preset") or next(
        (n for n, p in presets.items() if _same_path(p.get("out", ""), run_dir)), "default")
    values = {**defaults, **presets.get(preset, {})}
    flags = [] if preset == "default" else ["--preset", preset]
    for name, value in recorded.items():
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
