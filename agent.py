"""Stage 2 — agent finetuning: behaviour cloning and a reward model with multi-token prediction
(Dreamer 4 §3.3, Eq 9). The world model of dynamics.py gets one agent token per frame; heads on
its output h_t predict a_t … a_{t+L−1} and r_t … r_{t+L−1} (indexing: docs/conventions.md).

Reads:  runs/dynamics/ckpt.pt (`python dynamics.py`), its tokenizer and that tokenizer's latents.
Writes: runs/agent/  ckpt.pt, args.json, metrics.jsonl, summary.json, success.png, reward_trace.png.

Run:
    python agent.py                       # default preset: one GPU, after dynamics.py
    python agent.py --preset cpu --from-scratch --out runs/cpu/agent_scratch   # BC baseline
    python agent.py --preset cpu          # WM+BC; its success.png shows both
    python agent.py --preset smoke        # seconds; used by the tests
    python agent_eval.py runs/cpu/agent   # re-evaluate a finished run (summary.json, pictures)

Equation map:
    Eq 9   −Σ_n ln p(a_{t+n} | h_t) − Σ_n ln p(r_{t+n} | h_t)  -> agent_loss, mtp_targets
    §3.3   agent tokens: task embedding, one-way attention     -> AgentModel, agent_space_mask
    §3.3   policy head: categorical and Bernoulli components   -> action_log_prob, sample_action
    §3.3   reward head: symexp twohot (DreamerV3), 255 bins    -> symlog, symexp, twohot, twohot_nll
    §3.3   50 % uniform / 50 % task-relevant sequences         -> MixtureSampler
    Eq 7   video-prediction loss continues on the uniform half -> dynamics.shortcut_forcing_loss
    §4.1   success rate per task in the real environment       -> AgentPolicy, evaluate

Deviations from the paper and choices it leaves open: docs/deviations.md (section `agent.py`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import environment
from dynamics import (DynamicsModel, build_model, context_signal_level, corrupt, forcing_batch,
                      history_stream, load_dynamics, milestone_windows, row_select, sample_frame,
                      shift_actions, shortcut_forcing_loss)
from tokenizer import LatentCache, load_tokenizer, pack


@dataclass
class Args:
    preset: str = "default"  # smoke | cpu | default (one GPU, 64×64)
    dynamics: str = "runs/dynamics/ckpt.pt"  # parent checkpoint, written by `python dynamics.py`
    tokenizer: str = ""  # tokenizer checkpoint; empty = the dynamics checkpoint's parent
    out: str = "runs/agent"  # run folder: checkpoint, metrics, summary, pictures
    from_scratch: bool = False  # the "BC" baseline (Table 7): random init, no video loss
    video_loss: bool = True  # keep the Eq 7 video loss on the uniform half (§3.3)
    event_rows: bool = False  # and stage 1b's milestone and inventory rows in it (not in paper)
    mtp: int = 8  # L: MTP offsets n = 0…L−1 (Eq 9: L = 8, the sum to L read as 8 terms)
    head_hidden: int = 256  # width of the policy / reward MLP heads (not in paper)
    bins: int = 255  # twohot bins at symexp(linspace(−20, 20)) (DreamerV3; not in paper)
    batch: int = 32  # sequences per batch, uniform + relevant (not in paper)
    relevant_frac: float = 0.5  # share of task-relevant sequences per batch (§3.3: 50 %)
    seq_len: int = 32  # T ≤ C frames per sequence (not in paper)
    start_frac: float = 0.3  # start-frame share of the video-loss rows (§3.4, as in stage 1b)
    steps: int = 5000  # optimiser steps (not in paper)
    lr: float = 3e-4  # AdamW peak learning rate (not in paper)
    warmup: int = 200  # linear warm-up steps, then cosine decay to 10 % (not in paper)
    weight_decay: float = 0.01  # AdamW weight decay (not in paper)
    grad_clip: float = 1.0  # gradient-norm clipping (not in paper)
    ctx_tau: float = 0.9  # τ_ctx of context frames and of the frames the heads read (10 % noise)
    log_every: int = 100  # steps between log lines
    ckpt_every: int = 1000  # steps between checkpoints
    eval_episodes: int = 200  # real-environment episodes per policy (§4.1); 0 skips evaluation
    eval_batches: int = 8  # held-out batches for the BC metrics (not in paper)
    baselines: bool = True  # also evaluate the random and contractor policies on the same worlds
    reprompt: bool = True  # on a prompt switch, re-read the cached context (not in paper)
    compare: str = ""  # summary.json of another agent run (e.g. --from-scratch) drawn beside this
    stop_at: int = 0  # stop after this step as if interrupted (to test --resume); 0 = never
    resume: bool = False  # continue the run in --out from its ckpt.pt
    seed: int = 0  # seed for init, data, noise, evaluation worlds and action sampling
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "auto"  # auto | fp32 | bf16: compute dtype; auto = start-up probe (not in paper)
    compile: bool = False  # torch.compile the training forward (off by default)


PRESETS = {
    "smoke": dict(dynamics="runs/smoke/dynamics/ckpt.pt", out="runs/smoke/agent", head_hidden=16,
                  batch=4, seq_len=4, steps=6, warmup=2, log_every=2, ckpt_every=3, dtype="fp32",
                  eval_episodes=2, eval_batches=1, compare="runs/smoke/agent_scratch/summary.json"),
    # steps: at 700 the reward head had not yet found the events (recall 0 at r̂ > 0.5); at 2,100
    # it finds 91 % of them (docs/log.md, "The reward head needed more steps")
    "cpu": dict(dynamics="runs/cpu/dynamics/ckpt.pt", out="runs/cpu/agent", head_hidden=128,
                batch=16, seq_len=16, steps=2100, warmup=100, ckpt_every=100,
                # above the world model's own peak rate (3e-3): a lower one barely moves the
                # larger weights a 3e-3 world model ends with, and its policy is worse
                # (docs/deviations.md#agentpy). The BC column (--from-scratch) runs with
                # --lr 1e-3: from random weights a higher rate is worse
                lr=5e-3,
                eval_episodes=100, compare="runs/cpu/agent_scratch/summary.json"),
}

FORMAT_VERSION = 1
POLICY = {True: "BC (scratch)", False: "WM+BC"}  # the run's column in Table 7 (by --from-scratch)


# ---- The heads' distributions: symexp twohot (reward; value in imagine.py), factorised policy ---


def symlog(x: torch.Tensor) -> torch.Tensor:
    """symlog(x) = sign(x)·ln(1 + |x|)   (DreamerV3: compresses large magnitudes, ≈ x near 0)."""
    return torch.sign(x) * torch.log1p(x.abs())


def symexp(x: torch.Tensor) -> torch.Tensor:
    """symexp(x) = sign(x)·(e^|x| − 1), the inverse of symlog."""
    return torch.sign(x) * torch.expm1(x.abs())


def twohot_bins(n: int = 255, limit: float = 20.0) -> torch.Tensor:
    """(n,) bin centres in symlog space, linspace(−limit, limit, n) (DreamerV3), built exactly
    symmetric (b_i = −b_{n−1−i}); in reward space the bins sit at symexp(linspace(−20, 20))."""
    assert n % 2 == 1, f"an odd bin count keeps a bin at exactly 0, got {n}"
    half = torch.linspace(0.0, limit, (n + 1) // 2)  # (n/2 + 1,) from 0 to the limit
    return torch.cat([-half.flip(0)[:-1], half])  # (n,)


def twohot(x: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """x (...) → (..., n) weights: symlog(x) split between its two neighbouring bins, so that
    Σ_i w_i = 1 and Σ_i w_i·b_i = symlog(x); values beyond ±symexp(limit) go to the outer bin."""
    n = bins.shape[0]
    y = symlog(x.float()).clamp(float(bins[0]), float(bins[-1]))  # (...)
    k = torch.searchsorted(bins, y.contiguous(), right=True).clamp(1, n - 1)  # b[k−1] ≤ y < b[k]
    lo, hi = bins[k - 1], bins[k]  # (...) each
    w_hi = (y - lo) / (hi - lo)  # (...) share of the upper neighbour
    out = torch.zeros(*y.shape, n, device=y.device)  # (..., n)
    out.scatter_(-1, (k - 1)[..., None], (1 - w_hi)[..., None])
    return out.scatter_add_(-1, k[..., None], w_hi[..., None])  # (..., n)


def twohot_nll(logits: torch.Tensor, x: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """−ln p(x) = −Σ_i twohot(x)_i · log_softmax(logits)_i.  logits (..., n), x (...) → (...)."""
    return -(twohot(x, bins) * F.log_softmax(logits.float(), -1)).sum(-1)


def twohot_mean(logits: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """The prediction symexp(Σ_i softmax(logits)_i·b_i), (..., n) → (...). Bin i is paired with
    its mirror bin before the sum (as DreamerV3 does): a zero output layer gives exactly 0."""
    m = bins.shape[0] // 2  # index of the centre bin (b_m = 0)
    pb = F.softmax(logits.float(), -1) * bins  # (..., n)
    return symexp(pb[..., m] + (pb[..., :m].flip(-1) + pb[..., m + 1:]).sum(-1))  # (...)


def split_policy_logits(raw: torch.Tensor, action_classes: list[int]) -> list[torch.Tensor]:
    """Head output (..., Σ_c width_c) → logits (..., n_c) per component: categorical, or for 2
    classes (a button) a Bernoulli with one logit l, as the categorical (0, l): p(1) = σ(l)."""
    out, i = [], 0
    for n in action_classes:
        width = 1 if n == 2 else n
        lg = raw[..., i:i + width]  # (..., width)
        out.append(torch.cat([torch.zeros_like(lg), lg], -1) if n == 2 else lg)  # (..., n)
        i += width
    return out


def action_log_prob(logits: list[torch.Tensor], actions: torch.Tensor) -> torch.Tensor:
    """ln π(a) = Σ_c ln p_c(a_c).  logits A × (..., n_c), actions (..., A) → (...)."""
    return sum(F.log_softmax(lg.float(), -1).gather(-1, actions[..., c:c + 1].long())[..., 0]
               for c, lg in enumerate(logits))


def sample_action(logits: list[torch.Tensor], gen: torch.Generator | None = None) -> torch.Tensor:
    """One sample per component by the Gumbel-max trick.  A × (..., n_c) → (..., A) int64."""
    out = []
    for lg in logits:
        u = torch.rand(lg.shape, generator=gen, device=lg.device).clamp(1e-9, 1 - 1e-9)
        out.append((lg.float() - torch.log(-torch.log(u))).argmax(-1))  # argmax(logits + Gumbel)
    return torch.stack(out, -1)  # (..., A)


def action_kl(p: list[torch.Tensor], q: list[torch.Tensor]) -> torch.Tensor:
    """KL[p ‖ q] = Σ_c Σ_k p_c(k)·(ln p_c(k) − ln q_c(k)) of two factorised policies → (...)."""
    total = 0
    for lp, lq in zip(p, q):
        lp, lq = F.log_softmax(lp.float(), -1), F.log_softmax(lq.float(), -1)
        total = total + (lp.exp() * (lp - lq)).sum(-1)
    return total


# ---- Model: agent tokens (one-way attention) and the MTP heads -----------------------------------


def agent_space_mask(n_world: int, n_agent: int) -> torch.Tensor:
    """§3.3: agent tokens attend to every token; no other token attends to them. Tokens [world
    (action, (τ, d), latents, registers) | agent] → (N, N) bool, row = query, True = may attend."""
    N = n_world + n_agent
    mask = torch.ones(N, N, dtype=torch.bool)
    mask[:n_world, n_world:] = False  # world → agent: never
    return mask


class MTPHead(nn.Module):
    """A small MLP on h_t, then one zero-initialised output layer per MTP offset n = 0…L−1 (§3.3).
    forward(h) → (..., L, out); forward(h, offset=n) → (..., out) for one offset only."""

    def __init__(self, dim: int, hidden: int, out: int, mtp: int):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(),
                                   nn.Linear(hidden, hidden), nn.SiLU())
        self.out = nn.ModuleList(nn.Linear(hidden, out) for _ in range(mtp))
        for layer in self.out:  # DreamerV3: zero-initialised output layers (reward 0, uniform π)
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, h: torch.Tensor, offset: int | None = None) -> torch.Tensor:
        x = self.trunk(h)  # (..., hidden)
        if offset is not None:
            return self.out[offset](x)  # (..., out)
        return torch.stack([layer(x) for layer in self.out], dim=-2)  # (..., L, out)


class AgentModel(nn.Module):
    """The dynamics model of stage 1b plus one agent token per frame, a policy and a reward head.
    forward → ẑ₁ (B, T, N_z, C_z), unchanged by the agent token, and its output h_t (B, T, D)."""

    def __init__(self, dyn: DynamicsModel, n_tasks: int, head_hidden: int, mtp: int, bins: int):
        super().__init__()
        assert all(n >= 2 for n in dyn.action_classes), \
            f"the policy head needs categorical/binary actions, got classes {dyn.action_classes}"
        self.dyn, self.n_tasks, self.mtp = dyn, n_tasks, mtp
        self.action_classes, self.window, self.k_max = dyn.action_classes, dyn.window, dyn.k_max
        D = dyn.latent_in.out_features
        self.agent_base = nn.Parameter(torch.randn(D) * 0.02)  # "this is the agent token"
        self.task_embed = nn.Embedding(n_tasks, D)  # one-hot task → learned embedding (§3.3)
        n_world = dyn.n_tokens  # action, (τ, d), latents, registers
        self.register_buffer("space_mask", agent_space_mask(n_world, 1), persistent=False)
        # a world model with 2-D RoPE in its space layers keeps it; the agent token, like the
        # action and register tokens, has no place in the image and sits at the lattice centre
        pos = None if dyn.space_pos is None else torch.cat(
            [dyn.space_pos, dyn.space_pos[:1]])  # (N_world + 1, 2); token 0 (action) is central
        self.register_buffer("space_pos", pos, persistent=False)
        self.register_buffer("bins", twohot_bins(bins), persistent=False)
        n_out = sum(1 if n == 2 else n for n in self.action_classes)  # one logit per button
        self.policy_head = MTPHead(D, head_hidden, n_out, mtp)
        self.reward_head = MTPHead(D, head_hidden, bins, mtp)

    def forward(self, z_tilde, tau, d, prev_actions, act_valid, task, independent=None,
                cache: common.KVCache | None = None, commit: bool = False, time_layout=None,
                keep_last: int | None = None):
        """z_tilde (B, T, N_z, C_z); tau, d (B, T); prev_actions (B, T, A) = a_{t−1}, act_valid
        (B, T); task (B,) or (B, T) int64. independent, cache, commit, time_layout, keep_last: as
        DynamicsModel.forward."""
        B, T = tau.shape
        x = self.dyn.tokens(z_tilde, tau, d, prev_actions, act_valid)  # (B, T, N_world, D)
        task = task[:, None].expand(B, T) if task.dim() == 1 else task  # (B, T)
        g = (self.agent_base + self.task_embed(task))[:, :, None]  # (B, T, 1, D) the agent token
        x = torch.cat([x, g.to(x.dtype)], dim=2)  # (B, T, N_world + 1, D)
        h = self.dyn.transformer(x, self.space_pos, space_mask=self.space_mask,
                                 independent=independent, cache=cache, commit=commit,
                                 time_layout=time_layout,
                                 keep_last=keep_last)  # (B, T or keep_last, N_world + 1, D)
        z1 = self.dyn.latent_out(h[:, :, self.dyn.spatial])  # (B, T, N_z, C_z)
        return z1, h[:, :, -1]  # (B, T, N_z, C_z), (B, T, D)

    def policy(self, h: torch.Tensor, offset: int | None = None) -> list[torch.Tensor]:
        """h (..., D) → A × (..., L, n_c) action logits, or A × (..., n_c) for one offset."""
        return split_policy_logits(self.policy_head(h, offset).float(), self.action_classes)

    def reward_logits(self, h: torch.Tensor, offset: int | None = None) -> torch.Tensor:
        """Twohot logits (..., L, bins), or (..., bins) for one offset."""
        return self.reward_head(h, offset).float()

    def reward(self, h: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """r̂_{t+offset} of the prompted task (symexp twohot mean): (..., D) → (...)."""
        return twohot_mean(self.reward_logits(h, offset), self.bins)


# ---- Stepping with the KV cache: observe a real frame or imagine one (acting, imagine.py) --------


def step_inputs(model, prev_action, B: int, device):
    """(B, 1, A) previous actions (zeros where unknown) and (B, 1) validity for one new frame.
    model: an AgentModel or a DynamicsModel (play.py); only its action_classes are read."""
    if prev_action is None:  # frame 0 (or unknown): the "no action" embedding alone
        prev = torch.zeros(B, 1, len(model.action_classes), dtype=torch.long, device=device)
        return prev, torch.zeros(B, 1, dtype=torch.bool, device=device)
    return prev_action[:, None].long(), torch.ones(B, 1, dtype=torch.bool, device=device)


def observe(model: AgentModel, cache: common.KVCache, z: torch.Tensor, prev_action,
            task: torch.Tensor, ctx_tau: float, gen: torch.Generator | None = None,
            record: list | None = None) -> torch.Tensor:
    """Write frame t into the KV cache at τ_ctx and return the agent output h_t (B, D).
    z (B, N_z, C_z) packed clean latents; prev_action (B, A) = a_{t−1}, None at t = 0; task (B,).
    record: a list keeping the inputs (z̃, a_{t−1}, validity) of the cached frames, for reprompt."""
    B, dev = z.shape[0], z.device
    tau_c, d_min = context_signal_level(ctx_tau, model.k_max), 1.0 / model.k_max
    noise = torch.randn(z[:, None].shape, generator=gen, device=dev)  # (B, 1, N_z, C_z)
    z_ctx = corrupt(noise, z[:, None].float(), tau_c)  # Eq 6 at τ_ctx: 10 % noise
    prev, valid = step_inputs(model, prev_action, B, dev)
    tau, d = torch.full((B, 1), tau_c, device=dev), torch.full((B, 1), d_min, device=dev)
    _, h = model(z_ctx, tau, d, prev, valid, task, cache=cache, commit=True)
    if record is not None:
        record.append((z_ctx, prev, valid))
        del record[:max(0, len(record) - (model.window - 1))]  # the frames a next frame still sees
    return h[:, 0]  # (B, D)


def reprompt(model: AgentModel, cache: common.KVCache, record: list, task: torch.Tensor,
             rows: torch.Tensor, ctx_tau: float) -> None:
    """A prompt switch while acting (not in paper): re-read the cached context of `rows` (B,) bool
    under their new `task` (B,), as training windows carry one task. The recorded inputs run as
    one window in a fresh cache and `rows` take its keys/values, so the next observe equals an
    uncached pass over the last C frames under the new task. Other rows keep their cache."""
    if not record or not rows.any():
        return
    z, prev, valid = (torch.cat(x, 1) for x in zip(*record))  # (B, T_c, N_z, C_z), (B, T_c, A), ..
    B, T = valid.shape
    fresh = common.KVCache(cache.window)
    fresh.pos = cache.pos - T  # the same absolute frame positions (RoPE)
    tau = torch.full((B, T), context_signal_level(ctx_tau, model.k_max), device=z.device)
    d = torch.full((B, T), 1.0 / model.k_max, device=z.device)
    model(z, tau, d, prev, valid, task, cache=fresh, commit=True)
    # keys/values are (B·N, Hk, T_c, Dh): one row of the batch is N consecutive entries
    sel = rows.repeat_interleave(model.space_mask.shape[0])[:, None, None, None]  # (B·N, 1, 1, 1)
    for i, (k, v) in fresh.kv.items():
        cache.kv[i] = (torch.where(sel, k, cache.kv[i][0]), torch.where(sel, v, cache.kv[i][1]))


def imagine_frame(model: AgentModel, cache: common.KVCache, prev_action, task: torch.Tensor,
                  k: int = 4, gen: torch.Generator | None = None) -> torch.Tensor:
    """Frame t (B, N_z, C_z) from the cached history and a_{t−1}: K shortcut steps of d = 1/K
    (§3.2). Does not change the cache (observe commits the frame)."""
    assert cache.kv, "imagine_frame needs a context: observe at least one frame first"
    keys = next(iter(cache.kv.values()))[0]  # (B·N, Hk, T_c, Dh)
    B, dev = keys.shape[0] // model.space_mask.shape[0], model.bins.device
    prev, valid = step_inputs(model, prev_action, B, dev)
    shape = (B, 1, model.dyn.latent_tokens, model.dyn.latent_dim)
    noise = torch.randn(shape, generator=gen, device=dev)  # (B, 1, N_z, C_z)

    def f(z, tau, d):  # ẑ₁ of the new frame at signal level τ and step size d
        tau_t = torch.full((B, 1), float(tau), device=dev)
        d_t = torch.full((B, 1), float(d), device=dev)
        return model(z, tau_t, d_t, prev, valid, task, cache=cache)[0].float()

    return sample_frame(f, noise, k)[:, 0]  # (B, N_z, C_z)


def step_world_model(model: AgentModel, cache: common.KVCache, prev_action, task: torch.Tensor,
                     k: int = 4, ctx_tau: float = 0.9, gen: torch.Generator | None = None):
    """One imagined step: z_t (B, N_z, C_z) ~ world model given a_{t−1}, cached; and h_t (B, D)."""
    z = imagine_frame(model, cache, prev_action, task, k, gen)  # (B, N_z, C_z)
    return z, observe(model, cache, z, prev_action, task, ctx_tau, gen)


# ---- Objective (Eq 9): MTP targets, BC and reward NLL; the 50/50 data mixture (§3.3) -------------


def mtp_targets(actions: torch.Tensor, rewards: torch.Tensor, L: int,
                event: torch.Tensor | None = None) -> dict:
    """MTP targets of h_t for n = 0…L−1: a_{t+n} (taken at frame t+n), r_{t+n} (entering t+n).
    actions (B, T, A); rewards (B, T) of the prompted task; event (B,) window position of its
    reward (−1: none). Returns actions (B, T, L, A), rewards (B, T, L) and bool masks (B, T, L):
    `inside` (t + n < T: past the end is masked, not padded), `bc` (inside, t + n < event: the
    actions leading up to the task), `reward` (inside, but not r_0 of frame 0: h_0 never saw it)."""
    B, T, A = actions.shape
    dev = actions.device
    j = torch.arange(T, device=dev)[:, None] + torch.arange(L, device=dev)  # (T, L) index t + n
    inside = (j < T).expand(B, T, L)  # (B, T, L)
    jc = j.clamp(max=T - 1)  # in-range index for the gather; masked entries are never used
    event = torch.full((B,), -1, device=dev) if event is None else event
    # not in paper: BC targets stop at the event (docs/deviations.md)
    before = (event < 0)[:, None, None] | (j < event[:, None, None])  # (B, T, L)
    reward_mask = inside.clone()
    reward_mask[:, 0, 0] = False  # r_0 of the window: the transition into frame 0 is not in it
    return {"actions": actions[:, jc], "rewards": rewards[:, jc],  # (B, T, L, A), (B, T, L)
            "inside": inside, "bc": inside & before, "reward": reward_mask}


def agent_loss(pol_logits: list[torch.Tensor], rew_logits: torch.Tensor, actions: torch.Tensor,
               rewards: torch.Tensor, bc_mask: torch.Tensor, reward_mask: torch.Tensor,
               bins: torch.Tensor) -> dict:
    """Eq 9:  L = − Σ_n ln p(a_{t+n} | h_t) − Σ_n ln p(r_{t+n} | h_t)   (n = 0…L−1), masked means.
    pol_logits A × (B, T, L, n_c); rew_logits (B, T, L, bins); actions (B, T, L, A); rewards and
    masks (B, T, L). Returns the two terms bc and reward, and diagnostics."""
    nll_a = -action_log_prob(pol_logits, actions)  # (B, T, L) −ln π(a_{t+n} | h_t)
    nll_r = twohot_nll(rew_logits, rewards, bins)  # (B, T, L) −ln p(r_{t+n} | h_t)
    mb, mr = bc_mask.float(), reward_mask.float()
    bc = (nll_a * mb).sum() / mb.sum().clamp_min(1)
    rew = (nll_r * mr).sum() / mr.sum().clamp_min(1)
    with torch.no_grad():  # move accuracy at offset 0, for the log
        hit = (pol_logits[0][..., 0, :].argmax(-1) == actions[..., 0, 0]).float()  # (B, T)
        acc = (hit * mb[..., 0]).sum() / mb[..., 0].sum().clamp_min(1)
    return {"bc": bc, "reward": rew, "bc_move_acc": acc}


class MixtureSampler:
    """Windows of a split (latents (ΣT, N_b, D_b), actions (ΣT, A), rewards (ΣT, n_tasks)). Uniform:
    any window, a random task. Relevant: a task among those with events, one of its events, a window
    holding it at position ≥ 1 (not in paper: these details, docs/deviations.md)."""

    def __init__(self, latents, actions, rewards, episodes: list[dict], seq_len: int,
                 seed: int = 0):
        assert actions is not None and rewards is not None, "agent finetuning needs action and " \
            "reward labels (a dataset without them trains the tokenizer and dynamics only)"
        self.latents, self.actions, self.rewards, self.T = latents, actions, rewards, seq_len
        self.n_tasks = rewards.shape[1]
        self.episodes = [e for e in episodes if e["length"] >= seq_len]
        assert self.episodes, f"no episode of at least {seq_len} frames"
        self.starts = np.concatenate([e["offset"] + np.arange(e["length"] - seq_len + 1)
                                      for e in self.episodes])  # every valid window start
        self.events = {}  # task -> [(global frame of the event, lowest start, highest start)]
        for e in self.episodes:
            o, n = e["offset"], e["length"]
            r = np.asarray(rewards[o:o + n]) > 0  # (n, n_tasks)
            for t, k in zip(*np.nonzero(r)):  # windows holding the event at position ≥ 1
                lo, hi = max(o, o + t - seq_len + 1), min(o + n - seq_len, o + t - 1)
                if lo <= hi:
                    self.events.setdefault(int(k), []).append((o + int(t), lo, hi))
        self.rng = np.random.default_rng(seed)

    def sample(self, n_uniform: int, n_relevant: int) -> dict:
        """Uniform rows, then relevant ones: latents (B, T, N_b, D_b), actions (B, T, A), rewards
        (B, T, n_tasks), task, relevant, event (B,) (where the task is rewarded, or −1)."""
        if n_relevant and not self.events:
            raise ValueError("no reward events in this split: no task-relevant windows to sample")
        starts = list(self.rng.choice(self.starts, size=n_uniform))
        tasks = list(self.rng.integers(self.n_tasks, size=n_uniform))
        kinds = sorted(self.events)
        for _ in range(n_relevant):
            k = kinds[self.rng.integers(len(kinds))]
            _, lo, hi = self.events[k][self.rng.integers(len(self.events[k]))]
            starts.append(int(self.rng.integers(lo, hi + 1)))
            tasks.append(k)
        idx = np.asarray(starts)[:, None] + np.arange(self.T)  # (B, T) global frame indices
        rew = np.asarray(self.rewards[idx], dtype=np.float32)  # (B, T, n_tasks)
        task = np.asarray(tasks, dtype=np.int64)  # (B,)
        hit = rew[np.arange(len(task)), :, task] > 0  # (B, T) the prompted task's events
        return {"latents": torch.from_numpy(np.asarray(self.latents[idx], dtype=np.float32)),
                "actions": torch.from_numpy(np.asarray(self.actions[idx], dtype=np.int64)),
                "rewards": torch.from_numpy(rew), "task": torch.from_numpy(task),
                "relevant": torch.arange(len(task)) >= n_uniform,
                "event": torch.from_numpy(np.where(hit.any(1), hit.argmax(1), -1))}


def build_agent(agent_args: dict, dyn_args: dict, shapes: dict) -> AgentModel:
    """Rebuild the model from plain args dicts (as stored in the checkpoint)."""
    dyn = build_model(dyn_args, *shapes["latent"], shapes["action_classes"])
    return AgentModel(dyn, len(shapes["tasks"]), agent_args["head_hidden"], agent_args["mtp"],
                      agent_args["bins"])


def load_agent(path: str = "runs/agent/ckpt.pt", device="cpu"):
    """(model, checkpoint) of a trained agent; ckpt["tokenizer"] is its tokenizer's path."""
    how = common.command_for("agent.py", Args, PRESETS, os.path.dirname(path))  # writes it
    ckpt = common.load_checkpoint(path, "agent", how)
    model = build_agent(ckpt["args"], ckpt["dynamics_args"], ckpt["shapes"])
    model.load_state_dict(ckpt["model"])
    return model.to(device), ckpt


def train(a: Args) -> dict:
    common.init_distributed(a.device)  # under torchrun: one of several data-parallel ranks
    common.check_batch("--batch", a.batch)  # the global batch, split over the ranks
    common.seed_everything(a.seed)
    device = common.pick_device_for_run(a)  # records the compute dtype in a.dtype
    os.makedirs(a.out, exist_ok=True)
    ckpt_path = os.path.join(a.out, "ckpt.pt")

    # Parents: the dynamics model, its tokenizer and the tokenizer's latent cache.
    dyn, dyn_ckpt = load_dynamics(a.dynamics, device)
    tok_path = a.tokenizer or dyn_ckpt["parent"]["path"]
    tok, _ = load_tokenizer(tok_path, device)
    tok_dir = os.path.dirname(os.path.abspath(tok_path))
    train_cache = LatentCache(tok_dir, "train", seed=a.seed)
    held = LatentCache(tok_dir, "heldout", seed=a.seed + 1)
    meta, shapes = train_cache.meta, dict(dyn_ckpt["shapes"], tasks=list(train_cache.meta["tasks"]))
    if [int(n) for _, n in meta["action_components"]] != shapes["action_classes"] or \
            shapes["latent"] != [tok.n_latents // 2, 2 * tok.latent_dim]:
        raise ValueError(f"{a.dynamics} does not fit {tok_path} and its dataset: retrain it with "
                         f"`python dynamics.py --preset {a.preset} --tokenizer {tok_path} --out "
                         f"{os.path.dirname(a.dynamics)}`")
    assert a.seq_len <= dyn.window, f"T = {a.seq_len} must not exceed the context C = {dyn.window}"
    sampler = MixtureSampler(train_cache.latents, train_cache.actions, train_cache.rewards,
                             train_cache.episodes, a.seq_len, a.seed)
    if a.from_scratch:  # the "BC" baseline: the same architecture, randomly initialised
        dyn = build_model(dyn_ckpt["args"], *shapes["latent"], shapes["action_classes"]).to(device)
    model = AgentModel(dyn, len(shapes["tasks"]), a.head_hidden, a.mtp, a.bins).to(device)
    video_loss = a.video_loss and not a.from_scratch
    n_params = sum(p.numel() for p in model.parameters())
    init = "random init" if a.from_scratch else "from " + a.dynamics
    print(f"agent: {n_params / 1e6:.2f}M parameters ({init}), video loss {video_loss}, "
          f"{sum(map(len, sampler.events.values()))} reward events in the train split")
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay,
                            betas=(0.9, 0.95))
    norms = {k: common.RunningRMS() for k in ("video", "bc", "reward")}
    step = 0
    if a.resume:
        how = f"python agent.py --preset {a.preset} --out {a.out}"  # the run that writes it
        ckpt = common.load_checkpoint(ckpt_path, "agent", how)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        for k, v in ckpt["normalizers"].items():
            norms[k].load_state_dict(v)
        step = ckpt["step"]
        print(f"resumed from {ckpt_path} at step {step}")
    common.write_json(os.path.join(a.out, "args.json"), asdict(a))
    print("args:", json.dumps(asdict(a)))
    fwd = torch.compile(model) if a.compile else model
    log = common.MetricsLog(a.out, a.steps, resume=a.resume, start_step=step)

    def save(step):
        common.save_checkpoint(ckpt_path, {
            "format_version": FORMAT_VERSION, "stage": "agent", "step": step,
            "model": model.state_dict(), "optimizer": opt.state_dict(),
            "normalizers": {k: n.state_dict() for k, n in norms.items()},
            "args": asdict(a), "dynamics_args": dyn_ckpt["args"], "shapes": shapes,
            "tokenizer": os.path.abspath(tok_path),
            "parent": {"stage": "dynamics", "path": os.path.abspath(a.dynamics),
                       "step": dyn_ckpt["step"], "weights_used": not a.from_scratch}})

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    gen = torch.Generator(device)
    dargs = dyn_ckpt["args"]  # the world model's Eq 4 / Eq 7 settings carry over (as in stage 1b)
    tau_c, d_min = context_signal_level(a.ctx_tau, model.k_max), 1 / model.k_max
    # --ctx-stream world models keep their history stream in the video loss, at stage 1b's τ_ctx
    tau_hist = context_signal_level(dargs.get("ctx_tau", 0.9), model.k_max)
    n_uni = a.batch - int(round(a.batch * a.relevant_frac))  # uniform rows; the rest: relevant
    common.check_batch("--batch × (1 − --relevant-frac)", n_uni)  # each rank: 1/G of each half
    # --event-rows: the video loss also gets stage 1b's extra rows (the cpu preset's world model
    # has them). On the uniform windows alone phase 2 forgets much of the rare events they taught
    # (the table); with them it keeps more of those and drifts more over a rollout, so they are off
    # by default (docs/deviations.md#agentpy)
    keep = video_loss and a.event_rows
    n_event = round(dargs.get("event_frac", 0.0) * n_uni) if keep else 0
    n_inventory = round(dargs.get("inventory_frac", 0.0) * n_uni) if keep else 0
    if keep and not (n_event or n_inventory):
        print(f"note: --event-rows has nothing to keep: {a.dynamics} was trained without "
              f"milestone or inventory rows (--event-frac 0, --inventory-frac 0)")
    flops = common.FlopMeter(opt)  # counts the first step's FLOPs (MFU in summary.json)
    t_start, steps_run = time.time(), 0
    while step < a.steps:
        # Per-step streams seeded from (seed, step): --resume sees exactly the batches and noise of
        # an uninterrupted run, and the data stream does not depend on model initialisation.
        sampler.rng = np.random.default_rng([a.seed, step])
        gen.manual_seed(a.seed * 1_000_003 + step)
        b = {k: v.to(device) for k, v in sampler.sample(n_uni, a.batch - n_uni).items()}
        lat, acts, task = b["latents"], b["actions"], b["task"]  # (B, T, N_b, D_b), (B, T, A), (B,)
        B, T = acts.shape[:2]
        for g in opt.param_groups:
            g["lr"] = common.lr_at(step, a.lr, a.warmup, a.steps)
        with common.autocast(device):
            terms = {}
            if video_loss and n_uni:  # Eq 7 keeps running on the uniform half (§3.3), as in 1b
                v_lat, v_acts, v_task = lat[:n_uni], acts[:n_uni], task[:n_uni]
                if n_event or n_inventory:  # --event-rows: stage 1b's rows after the uniform
                    train_cache.rng = np.random.default_rng([a.seed, step, 1])  # as sampler.rng
                    extra = milestone_windows(train_cache, n_event, n_inventory, T)
                    v_lat = torch.cat([v_lat, extra["latents"].to(device)])  # (B_v, T, N_b, D_b)
                    v_acts = torch.cat([v_acts, extra["actions"].to(device)])  # (B_v, T, A)
                    # no head reads these rows: the frame predictions do not see the task
                    v_task = torch.cat([v_task, v_task.new_zeros(n_event + n_inventory)])
                fb = forcing_batch(v_lat, v_acts, model.k_max, a.start_frac, gen,
                                   dargs.get("k_min", 1), dargs.get("flow_frac", 0.0),
                                   tau_hist if dargs.get("ctx_stream") else None,
                                   event_rows=n_event + n_inventory,
                                   event_weight=dargs.get("event_weight", 0.0))  # as in 1b
                # this rank's uniform rows of the global draws (all of them in one process)
                fb, task_uni = common.shard(fb), common.shard(v_task)

                def f(z, tau, d, rows=None):  # ẑ₁ of the uniform half (or its `rows`: Eq 7)
                    prev, valid, indep = row_select(fb, rows)
                    tk = task_uni if rows is None else task_uni[rows]
                    if not dargs.get("ctx_stream"):
                        return fwd(z, tau, d, prev, valid, tk, indep)[0].float()
                    # as stage 1b trained it: the loss frames after a history stream at τ_ctx
                    hist = fb["history"] if rows is None else fb["history"][rows]
                    *inputs, layout = history_stream(z, tau, d, hist, prev, valid, indep,
                                                     tau_hist, model.k_max, model.dyn.window,
                                                     model.dyn.n_tokens + 1)  # + agent
                    out = fwd(*inputs, tk, indep, time_layout=layout,
                              keep_last=z.shape[1])[0]  # (R, T, N_z, C_z) the loss frames
                    return out.float()

                terms["video"] = shortcut_forcing_loss(
                    f, fb["clean"], fb["noise"], fb["tau"], fb["d"], model.k_max,
                    dargs.get("boot_clip", 0.0), dargs.get("tau_weight", "ramp"),
                    fb["frame_weight"])["loss"]
            # Agent pass: every frame at τ_ctx, as when acting (not in paper: docs/deviations.md)
            clean = pack(lat)  # (B, T, N_z, C_z)
            noise = torch.randn(clean.shape, generator=gen, device=device)  # (B, T, N_z, C_z)
            z_ctx = corrupt(noise, clean, tau_c)  # Eq 6 at τ_ctx
            # this rank's rows (strided: its share of the uniform and of the relevant ones)
            z_ctx, b = common.shard(z_ctx), common.shard(b)
            acts, task, B_r = b["actions"], b["task"], len(b["task"])
            tau = torch.full((B_r, T), tau_c, device=device)
            d = torch.full((B_r, T), d_min, device=device)
            _, h = fwd(z_ctx, tau, d, *shift_actions(acts), task)  # h (B_r, T, D)
            rew = b["rewards"][torch.arange(B_r, device=device), :, task]  # (B_r, T) the task's
            tgt = mtp_targets(acts, rew, a.mtp, b["event"])
            bc_mask = tgt["bc"] & b["relevant"][:, None, None]  # (B_r, T, L): relevant rows
            eq9 = agent_loss(model.policy(h), model.reward_logits(h), tgt["actions"],
                             tgt["rewards"], bc_mask, tgt["reward"], model.bins)
            # masked means: each rank's weighted by its share of the targets (1.0 alone)
            terms.update(bc=eq9["bc"] * common.rank_weight(bc_mask.sum()),
                         reward=eq9["reward"] * common.rank_weight(tgt["reward"].sum()))
        common.check_finite(step, **terms)
        loss = sum(norms[k](v) for k, v in terms.items())  # each term ÷ its running RMS (§3)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        common.sync_gradients(model)  # the mean gradient over the ranks (no-op alone)
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
        opt.step()
        step, steps_run = step + 1, steps_run + 1
        if common.is_main() and (step % a.log_every == 0 or step == a.steps):
            lr = common.lr_at(step - 1, a.lr, a.warmup, a.steps)
            log.log(step, {**{k: v.detach() for k, v in terms.items()},
                           "move_acc": eq9["bc_move_acc"], "grad_norm": gnorm, "lr": lr}, B * T)
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

    summary = {
        "stage": "agent", "preset": a.preset, "device": str(device),
        "steps": step, "steps_this_run": steps_run, "params_m": n_params / 1e6,
        **flops.speed(device, wall, steps_run, steps_run * a.batch * a.seq_len),
        "policy": POLICY[a.from_scratch], "from_scratch": a.from_scratch, "mtp": a.mtp,
        "video_loss": video_loss, "eval_episodes": a.eval_episodes, "ctx_tau_used": tau_c,
        "reprompt": a.reprompt,
        # the video loss's rows per step: the uniform half and stage 1b's extra rows
        "video_rows": (n_uni + n_event + n_inventory) if video_loss else 0,
        "video_event_rows": n_event + n_inventory}
    model.eval()
    t0 = time.time()
    policy = AgentPolicy(model, tok, device, a.ctx_tau, a.seed, a.reprompt)
    summary.update(evaluate(policy, meta, a))
    # measuring instruments live in agent_eval.py; imported here so the method file never
    # depends on them at import time
    import agent_eval
    summary.update(agent_eval.report(model, policy, held, a, summary.get("success"), out=a.out))
    summary["eval_s"] = time.time() - t0
    common.write_json(os.path.join(a.out, "summary.json"), summary)
    print("summary:", json.dumps(summary))
    return summary


# ---- Acting in the real environment (ladder prompt, cached policy) and its success (§4.1) --------


def ladder_prompt(frames: np.ndarray, level: np.ndarray,
                  read=environment.decode_frames) -> np.ndarray:
    """Table 6's prompt ladder: the first task not yet achieved, read off the frames (B, H, W, 3);
    `level` (B,), the highest milestone so far (−1: none; a chain), is updated in place.
    read: frames → {"app", "inv"}; the exact reader for real frames, environment.read_frames
    (nearest sprite) for generated ones (play.py)."""
    s = read(frames)
    inv, table = s["inv"], (s["app"] == environment.TABLE).any((1, 2))  # (B, 7), (B,)
    seen = np.stack([inv[:, environment.WOOD] > 0, table, inv[:, environment.WOOD_PICK] > 0,
                     inv[:, environment.STONE_I] > 0, inv[:, environment.STONE_PICK] > 0,
                     inv[:, environment.IRON_I] > 0, inv[:, environment.IRON_PICK] > 0,
                     inv[:, environment.DIAMOND_I] > 0], 1)  # (B, 8) in TASKS order
    highest = np.where(seen.any(1), seen.shape[1] - 1 - seen[:, ::-1].argmax(1), -1)  # (B,)
    np.maximum(level, highest, out=level)
    return np.minimum(level + 1, len(environment.TASKS) - 1)


class AgentPolicy:
    """Plays in environment.evaluate: encode, observe, sample a_t ~ π(· | h_t); reprompt."""

    def __init__(self, model: AgentModel, tok, device, ctx_tau: float, seed: int = 0,
                 reprompt: bool = True):
        self.model, self.tok, self.device, self.ctx_tau = model, tok, device, ctx_tau
        self.gen, self.reprompt = torch.Generator(device).manual_seed(seed), reprompt

    def reset(self, n_envs: int) -> None:
        self.tok_cache = common.KVCache(self.tok.encoder.window)
        self.cache = common.KVCache(self.model.window)
        self.prev, self.record = None, []
        self.level, self.task = np.full(n_envs, -1), np.full(n_envs, -1)

    @torch.no_grad()
    def act(self, frames: np.ndarray) -> np.ndarray:
        dev = self.device
        prompt = ladder_prompt(frames, self.level)  # (B,) numpy
        task = torch.from_numpy(prompt).to(dev)  # (B,)
        switched = torch.from_numpy(prompt != self.task).to(dev)  # (B,) bool
        x = torch.from_numpy(np.ascontiguousarray(frames)).to(dev)[:, None]  # (B, 1, H, W, 3)
        with common.autocast(dev):
            if self.reprompt:
                reprompt(self.model, self.cache, self.record, task, switched, self.ctx_tau)
            z = pack(self.tok.encode(x, cache=self.tok_cache)).float()[:, 0]  # (B, N_z, C_z)
            h = observe(self.model, self.cache, z, self.prev, task, self.ctx_tau, self.gen,
                        self.record if self.reprompt else None)  # (B, D)
            self.prev = sample_action(self.model.policy(h, offset=0), self.gen)  # (B, A) a_t
        self.task = prompt
        return self.prev.cpu().numpy()


def evaluate(policy: AgentPolicy, meta: dict, a: Args) -> dict:
    """The headline figure (§4.1, Table 7): the policy's real-environment success per task on
    `a.eval_episodes` unseen worlds, {"success": {policy name: {task: {rate, stderr}}}}."""
    if a.eval_episodes <= 0 or meta.get("generator") != "minidreamer4 data.py":
        return {}  # no episodes asked for, or data of another environment: nothing to play in
    size, ep_len = meta["image_size"], meta.get("episode_len", 256)
    result = environment.evaluate(policy, a.eval_episodes, a.seed, size, ep_len)
    return {"success": {POLICY[a.from_scratch]: result["success"]}}


def main():
    train(common.parse_args(Args, PRESETS))


if __name__ == "__main__":
    common.run_main(main, Args, PRESETS)  # Ctrl-C: a short message with the --resume command
