"""Stage 2 — agent finetuning: behaviour cloning and a reward model with multi-token prediction (Dreamer 4 §3.3, Eq 9).

The pretrained world model (dynamics.py) becomes an agent. Each time step gets one more token, the
agent token, fed with a task embedding; it reads every other token of the transformer, and no
other token reads it, so the world model's predictions can depend on actions but never on the
task (PAPER.md §5). Two small MLP heads read the agent token's output h_t: a policy head and a
symexp-twohot reward head, each with one output layer per multi-token-prediction (MTP) offset n.
The shortcut-forcing video loss of stage 1b (Eq 7) keeps running, so the transformer stays a world
model that imagine.py can roll out.

Per time step t the transformer sees (DESIGN.md §3; dynamics.py's layout plus the agent token):
    [ action a_{t−1} | (τ_t, d_t) | N_z latent tokens of z̃_t | S_r registers | agent token (task) ]
So h_t has seen a_{t−1} and z_t: the policy at h_t predicts a_t (MTP: a_t … a_{t+L−1}) and the
reward head r_t, the reward of entering frame t (MTP: r_t … r_{t+L−1}).

Reads:  runs/dynamics/ckpt.pt (`python dynamics.py`), its tokenizer and the tokenizer's latent cache.
Writes: runs/agent/  ckpt.pt, args.json, metrics.jsonl, summary.json, success.png, reward_trace.png.

Run:
    python agent.py                                   # default preset: one GPU, after dynamics.py
    python agent.py --preset cpu --from-scratch --out runs/cpu/agent_scratch   # the BC baseline first,
    python agent.py --preset cpu                      # then WM+BC; its success.png shows both
    python agent.py --preset smoke                    # seconds; used by the tests

Equation map:
    Eq 9   −Σ_n ln p(a_{t+n} | h_t) − Σ_n ln p(r_{t+n} | h_t), masked -> agent_loss, mtp_targets
    §3.3   agent tokens: task embedding, one-way attention        -> AgentModel, agent_space_mask
    §3.3   policy head: categorical move + Bernoulli buttons      -> AgentModel.policy, action_log_prob
    §3.3   reward head: symexp twohot (DreamerV3), 255 bins       -> symlog, symexp, twohot, twohot_nll, twohot_mean
    §3.3   50 % uniform / 50 % task-relevant sequences            -> MixtureSampler
    Eq 7   video-prediction loss continues on the uniform half   -> dynamics.shortcut_forcing_loss (in train)
    §4.1   success rate per task in the real environment          -> AgentPolicy, data.evaluate

For imagine.py (stage 3): AgentModel, load_agent, MTPHead (a value head is an MTPHead with L = 1),
symlog/symexp/twohot/twohot_nll/twohot_mean, action_log_prob/sample_action/action_kl, observe
(commit a frame, read h_t), imagine_frame (K shortcut steps from the KV cache), step_world_model.

Deviations and ambiguities (each is also noted where it applies):
  - MTP: L = 8 offsets n = 0…7. Eq 9's sums run n = 0…L, i.e. L + 1 = 9 terms (PAPER.md §9); we
    read "length L = 8" as 8 terms. Each head has one output layer per offset.
  - One agent token per frame (S_g = 1, not stated). Its input is a learned base embedding plus a
    learned task embedding (equivalent to one-hot → linear; the paper uses one-hot task indicators).
  - Which signal level the heads see is not stated. The agent losses read h_t from a pass with every
    frame at the context level τ_ctx (10 % noise), exactly the input met when acting (real frames, or
    imagined ones, are written into the KV cache at τ_ctx and h_t is read from that pass). The video
    loss runs on its own passes with the Eq 4 draws and start frames of stage 1b.
  - Mixture (§3.3): BC on the relevant half, video loss on the uniform half, reward loss on both. A
    relevant window holds a reward event of its task at position ≥ 1 (with the action that caused it);
    its task is drawn uniformly among the tasks with events (rare rungs are not drowned out). Uniform
    windows are prompted with a uniformly drawn task.
  - BC targets stop at the event: under prompt k, the actions after task k is accomplished are no
    longer task-k behaviour (and the evaluation prompt moves on there). Not in the paper.
  - `--relevant segment` (experiment, off; not in the paper): relevant windows over all frames the
    ladder prompts k on, BC masked to them. Far worse (README: 43 / 3 % vs 95 / 50 % on the first rungs).
  - The reward target r_0 of a window's first frame is masked: h_0 has not seen the transition into
    frame 0. MTP targets past the end of a window are masked, never padded.
  - Policy: a component with 2 classes is a Bernoulli (one logit l, written as the categorical with
    logits (0, l)), any other a categorical; ln p(a) is the sum over components (the paper does not
    say how it factorises). Continuous action components are not supported by the policy head.
  - Twohot: 255 bins at symexp(linspace(−20, 20)) (DreamerV3), twohot in symlog space, bins exactly
    symmetric and summed symmetrically, so the zero-initialised output layers predict exactly 0.
  - Loss normalisation: one running RMS per term (video, BC, reward); each term is a masked mean
    over rows, time steps and offsets (Eq 9 sums; the normaliser removes the scale).
  - One batch length T ≤ C (no alternating lengths in this stage).
  - Evaluation prompts: the paper's ladder (Table 6), the first task not yet achieved, read off the
    frame by AgentPolicy (the network sees only latents). On a prompt switch the cached context is
    re-read under the new task (`reprompt`, not in the paper); `--no-reprompt` keeps the old tokens.
  - --from-scratch is the paper's "BC" column (Table 7): same architecture, data and heads, random
    init, no video loss. Sizes, optimiser (AdamW, warm-up, cosine), steps, head widths: not in paper.
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
import data
from dynamics import (DynamicsModel, build_model, context_signal_level, corrupt, forcing_batch, load_dynamics,
                      row_select, sample_frame, shift_actions, shortcut_forcing_loss)
from tokenizer import LatentCache, load_tokenizer, pack


@dataclass
class Args:
    preset: str = "default"  # smoke | cpu | default (one GPU, 64×64)
    dynamics: str = "runs/dynamics/ckpt.pt"  # parent checkpoint, written by `python dynamics.py`
    tokenizer: str = ""  # tokenizer checkpoint; empty = the dynamics checkpoint's parent
    out: str = "runs/agent"  # run folder: checkpoint, metrics, summary, pictures
    from_scratch: bool = False  # the "BC" baseline (Table 7): random init, no video loss
    video_loss: bool = True  # keep the Eq 7 video loss running on the uniform half (§3.3); off with --from-scratch
    mtp: int = 8  # L: MTP offsets n = 0…L−1 (Eq 9; L = 8, the sum to L read as 8 terms)
    head_hidden: int = 256  # width of the policy / reward MLP heads (not in paper)
    bins: int = 255  # twohot bins at symexp(linspace(−20, 20)) (DreamerV3; not in paper)
    batch: int = 32  # sequences per batch, uniform + relevant (not in paper)
    relevant_frac: float = 0.5  # share of task-relevant sequences per batch (§3.3: 50 %)
    relevant: str = "event"  # relevant windows: event (hold the task's reward, §3.3) | segment (the frames the ladder prompts the task on; not in paper)
    seq_len: int = 32  # T ≤ C frames per sequence (not in paper)
    start_frac: float = 0.3  # start-frame share of the video-loss rows (§3.4, as in stage 1b)
    steps: int = 5000  # optimiser steps (not in paper)
    lr: float = 3e-4  # AdamW peak learning rate (not in paper)
    warmup: int = 200  # linear warm-up steps, then cosine decay to 10 % (not in paper)
    weight_decay: float = 0.01  # AdamW weight decay (not in paper)
    grad_clip: float = 1.0  # gradient-norm clipping (not in paper)
    ctx_tau: float = 0.9  # signal level of context frames and of the frames the heads read (τ_ctx, PAPER.md §9)
    log_every: int = 100  # steps between log lines
    ckpt_every: int = 1000  # steps between checkpoints
    eval_episodes: int = 200  # real-environment episodes per policy (§4.1; ≥ 100); 0 skips evaluation
    eval_batches: int = 8  # held-out batches for the BC metrics (not in paper)
    baselines: bool = True  # also evaluate the random and contractor policies on the same worlds
    reprompt: bool = True  # on a ladder prompt switch, re-read the cached context under the new task (not in paper)
    compare: str = ""  # summary.json of another agent run (e.g. --from-scratch) drawn beside this one
    stop_at: int = 0  # stop after this step as if interrupted (to test --resume); 0 = never
    resume: bool = False  # continue the run in --out from its ckpt.pt
    seed: int = 0  # seed for init, data, noise, evaluation worlds and action sampling
    device: str = "auto"  # auto | cpu | cuda | mps
    compile: bool = False  # torch.compile the training forward (off by default)


PRESETS = {
    "smoke": dict(dynamics="runs/smoke/dynamics/ckpt.pt", out="runs/smoke/agent", head_hidden=16, batch=4,
                  seq_len=4, steps=6, warmup=2, log_every=2, ckpt_every=3, eval_episodes=2, eval_batches=1,
                  compare="runs/smoke/agent_scratch/summary.json"),
    "cpu": dict(dynamics="runs/cpu/dynamics/ckpt.pt", out="runs/cpu/agent", head_hidden=128, batch=16, seq_len=16,
                steps=700, lr=1e-3, warmup=100, ckpt_every=100, eval_episodes=100,
                compare="runs/cpu/agent_scratch/summary.json"),
}

FORMAT_VERSION = 1


# ==============================================================================================
# Symlog, symexp and twohot (the reward head; imagine.py reuses them for the value head)
# ==============================================================================================


def symlog(x: torch.Tensor) -> torch.Tensor:
    """symlog(x) = sign(x)·ln(1 + |x|)   (DreamerV3: compresses large magnitudes, identity near 0)."""
    return torch.sign(x) * torch.log1p(x.abs())


def symexp(x: torch.Tensor) -> torch.Tensor:
    """symexp(x) = sign(x)·(e^|x| − 1), the inverse of symlog."""
    return torch.sign(x) * torch.expm1(x.abs())


def twohot_bins(n: int = 255, limit: float = 20.0) -> torch.Tensor:
    """Bin centres in symlog space, linspace(−limit, limit, n) built exactly symmetric (b_i = −b_{n−1−i}).

    In reward space the bins sit at symexp(linspace(−20, 20)) (DreamerV3). Returns (n,).
    """
    assert n % 2 == 1, f"an odd bin count keeps a bin at exactly 0, got {n}"
    half = torch.linspace(0.0, limit, (n + 1) // 2)  # (n/2 + 1,) from 0 to the limit
    return torch.cat([-half.flip(0)[:-1], half])  # (n,)


def twohot(x: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """x (...) real values → (..., n) weights: symlog(x) split between its two neighbouring bins.

    The weights sum to 1 and Σ_i w_i·b_i = symlog(x) exactly (linear interpolation), for x inside
    ±symexp(limit); values beyond are clamped to the outer bin.
    """
    n = bins.shape[0]
    y = symlog(x.float()).clamp(float(bins[0]), float(bins[-1]))  # (...)
    k = torch.searchsorted(bins, y.contiguous(), right=True).clamp(1, n - 1)  # bins[k−1] ≤ y < bins[k]
    lo, hi = bins[k - 1], bins[k]  # (...) each
    w_hi = (y - lo) / (hi - lo)  # (...) share of the upper neighbour
    out = torch.zeros(*y.shape, n, device=y.device)  # (..., n)
    out.scatter_(-1, (k - 1)[..., None], (1 - w_hi)[..., None])
    return out.scatter_add_(-1, k[..., None], w_hi[..., None])  # (..., n)


def twohot_nll(logits: torch.Tensor, x: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """−ln p(x) of a twohot head: −Σ_i twohot(x)_i · log_softmax(logits)_i.  logits (..., n), x (...) → (...)."""
    return -(twohot(x, bins) * F.log_softmax(logits.float(), -1)).sum(-1)


def twohot_mean(logits: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """The head's prediction symexp(Σ_i softmax(logits)_i·b_i)   (..., n) → (...).

    The sum pairs bin i with its mirror bin before adding up (as DreamerV3 does), so uniform
    probabilities, i.e. a zero-initialised output layer, give exactly 0, not a float residue.
    """
    m = bins.shape[0] // 2  # index of the centre bin (b_m = 0)
    pb = F.softmax(logits.float(), -1) * bins  # (..., n)
    return symexp(pb[..., m] + (pb[..., :m].flip(-1) + pb[..., m + 1:]).sum(-1))  # (...)


# ==============================================================================================
# The factorised action distribution (policy head)
# ==============================================================================================


def split_policy_logits(raw: torch.Tensor, action_classes: list[int]) -> list[torch.Tensor]:
    """Raw head output (..., Σ_c width_c) → one logits tensor (..., n_c) per action component.

    A 2-class component (a button) is a Bernoulli with one logit l, written as the categorical with
    logits (0, l): p(1) = σ(l). Any other component is a categorical with n_c logits.
    """
    out, i = [], 0
    for n in action_classes:
        if n == 2:
            out.append(torch.stack([torch.zeros_like(raw[..., i]), raw[..., i]], -1))  # (..., 2)
            i += 1
        else:
            out.append(raw[..., i:i + n])  # (..., n)
            i += n
    return out


def action_log_prob(logits: list[torch.Tensor], actions: torch.Tensor) -> torch.Tensor:
    """ln π(a) = Σ_c ln p_c(a_c): independent components.  logits A × (..., n_c), actions (..., A) → (...)."""
    return sum(F.log_softmax(lg.float(), -1).gather(-1, actions[..., c:c + 1].long())[..., 0]
               for c, lg in enumerate(logits))


def sample_action(logits: list[torch.Tensor], gen: torch.Generator | None = None) -> torch.Tensor:
    """One sample per component by the Gumbel-max trick (seeded by `gen`).  A × (..., n_c) → (..., A) int64."""
    out = []
    for lg in logits:
        u = torch.rand(lg.shape, generator=gen, device=lg.device).clamp(1e-9, 1 - 1e-9)
        out.append((lg.float() - torch.log(-torch.log(u))).argmax(-1))  # argmax(logits + Gumbel noise)
    return torch.stack(out, -1)  # (..., A)


def action_kl(p: list[torch.Tensor], q: list[torch.Tensor]) -> torch.Tensor:
    """KL[p ‖ q] = Σ_c Σ_k p_c(k)·(ln p_c(k) − ln q_c(k)) of two factorised policies → (...)."""
    total = 0
    for lp, lq in zip(p, q):
        lp, lq = F.log_softmax(lp.float(), -1), F.log_softmax(lq.float(), -1)
        total = total + (lp.exp() * (lp - lq)).sum(-1)
    return total


# ==============================================================================================
# Model: agent tokens (one-way attention) and the MTP heads
# ==============================================================================================


def agent_space_mask(n_world: int, n_agent: int) -> torch.Tensor:
    """§3.3: agent tokens attend to every token; no other token attends to the agent tokens.

    Token order [world tokens (action, (τ, d), latents, registers) | agent tokens].
    Returns (N, N) bool, row = query, column = key, True = may attend. (Time layers need no mask:
    each token slot only attends to the same slot in earlier frames.)
    """
    N = n_world + n_agent
    mask = torch.ones(N, N, dtype=torch.bool)
    mask[:n_world, n_world:] = False  # world → agent: never
    return mask


class MTPHead(nn.Module):
    """A small MLP on h_t, then one output layer per MTP offset n = 0…L−1 (§3.3), zero-initialised.

    forward(h) → (..., L, out); forward(h, offset=n) → (..., out) for one offset only.
    """

    def __init__(self, dim: int, hidden: int, out: int, mtp: int):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.out = nn.ModuleList(nn.Linear(hidden, out) for _ in range(mtp))
        for layer in self.out:  # DreamerV3: zero-initialised output layers (PITFALLS.md 11)
            nn.init.zeros_(layer.weight), nn.init.zeros_(layer.bias)

    def forward(self, h: torch.Tensor, offset: int | None = None) -> torch.Tensor:
        x = self.trunk(h)  # (..., hidden)
        if offset is not None:
            return self.out[offset](x)  # (..., out)
        return torch.stack([layer(x) for layer in self.out], dim=-2)  # (..., L, out)


class AgentModel(nn.Module):
    """The dynamics model of stage 1b plus one agent token per frame and the policy and reward heads.

    forward(...) → (ẑ₁ (B, T, N_z, C_z), h (B, T, D)): the x-prediction of the dynamics model
    (unchanged by the agent token) and the agent token's output h_t.
    """

    def __init__(self, dyn: DynamicsModel, n_tasks: int, head_hidden: int, mtp: int, bins: int):
        super().__init__()
        assert all(n >= 2 for n in dyn.action_classes), \
            f"the policy head needs categorical/binary action components, got classes {dyn.action_classes}"
        self.dyn, self.n_tasks, self.mtp = dyn, n_tasks, mtp
        self.action_classes, self.window, self.k_max = dyn.action_classes, dyn.window, dyn.k_max
        D = dyn.latent_in.out_features
        self.agent_base = nn.Parameter(torch.randn(D) * 0.02)  # "this is the agent token"
        self.task_embed = nn.Embedding(n_tasks, D)  # one-hot task → learned embedding (§3.3)
        n_world = 2 + dyn.latent_tokens + dyn.register_tokens.shape[0]  # action, (τ, d), latents, registers
        self.register_buffer("space_mask", agent_space_mask(n_world, 1), persistent=False)
        self.register_buffer("bins", twohot_bins(bins), persistent=False)
        n_out = sum(1 if n == 2 else n for n in self.action_classes)  # one logit per button
        self.policy_head = MTPHead(D, head_hidden, n_out, mtp)
        self.reward_head = MTPHead(D, head_hidden, bins, mtp)

    def forward(self, z_tilde, tau, d, prev_actions, act_valid, task, independent=None,
                cache: common.KVCache | None = None, commit: bool = False):
        """z_tilde (B, T, N_z, C_z); tau, d (B, T); prev_actions (B, T, A) = a_{t−1}, act_valid (B, T);
        task (B,) or (B, T) int64. independent, cache, commit: as DynamicsModel.forward."""
        B, T = tau.shape
        x = self.dyn.tokens(z_tilde, tau, d, prev_actions, act_valid)  # (B, T, N_world, D)
        task = task[:, None].expand(B, T) if task.dim() == 1 else task  # (B, T)
        g = (self.agent_base + self.task_embed(task))[:, :, None]  # (B, T, 1, D) the agent token
        h = self.dyn.transformer(torch.cat([x, g.to(x.dtype)], dim=2), space_mask=self.space_mask,
                                 independent=independent, cache=cache, commit=commit)  # (B, T, N_world + 1, D)
        return self.dyn.latent_out(h[:, :, self.dyn.spatial]), h[:, :, -1]  # (B, T, N_z, C_z), (B, T, D)

    def policy(self, h: torch.Tensor, offset: int | None = None) -> list[torch.Tensor]:
        """Per-component action logits from h (..., D): A × (..., L, n_c), or A × (..., n_c) for one offset."""
        return split_policy_logits(self.policy_head(h, offset).float(), self.action_classes)

    def reward_logits(self, h: torch.Tensor, offset: int | None = None) -> torch.Tensor:
        """Twohot logits (..., L, bins), or (..., bins) for one offset."""
        return self.reward_head(h, offset).float()

    def reward(self, h: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Predicted reward of the prompted task, r̂_{t+offset} = symexp twohot mean (..., D) → (...)."""
        return twohot_mean(self.reward_logits(h, offset), self.bins)


# ==============================================================================================
# Stepping the world model with the agent: observe a frame, imagine a frame (for acting and imagine.py)
# ==============================================================================================


def _step_inputs(model: AgentModel, prev_action, B: int, device):
    """(B, 1, A) previous actions (zeros where unknown) and (B, 1) validity for one new frame."""
    if prev_action is None:  # frame 0 (or unknown): the "no action" embedding alone
        return torch.zeros(B, 1, len(model.action_classes), dtype=torch.long, device=device), \
            torch.zeros(B, 1, dtype=torch.bool, device=device)
    return prev_action[:, None].long(), torch.ones(B, 1, dtype=torch.bool, device=device)


def observe(model: AgentModel, cache: common.KVCache, z: torch.Tensor, prev_action, task: torch.Tensor,
            ctx_tau: float, gen: torch.Generator | None = None, record: list | None = None) -> torch.Tensor:
    """Write frame t into the KV cache at τ_ctx and return the agent output h_t (B, D).

    z (B, N_z, C_z) packed clean latents of frame t (from the tokenizer, or imagine_frame);
    prev_action (B, A) = a_{t−1}, or None at t = 0; task (B,). Call under torch.no_grad() when acting.
    record: a list that keeps the inputs (z̃, a_{t−1}, validity) of the C − 1 cached frames, for reprompt.
    """
    B, dev = z.shape[0], z.device
    tau_c, d_min = context_signal_level(ctx_tau, model.k_max), 1.0 / model.k_max
    noise = torch.randn(z[:, None].shape, generator=gen, device=dev)  # (B, 1, N_z, C_z)
    z_ctx = corrupt(noise, z[:, None].float(), tau_c)  # Eq 6 at τ_ctx: 10 % noise
    prev, valid = _step_inputs(model, prev_action, B, dev)
    full = lambda v: torch.full((B, 1), v, device=dev)  # noqa: E731
    _, h = model(z_ctx, full(tau_c), full(d_min), prev, valid, task, cache=cache, commit=True)
    if record is not None:
        record.append((z_ctx, prev, valid))
        del record[:max(0, len(record) - (model.window - 1))]  # the frames a next frame still sees
    return h[:, 0]  # (B, D)


def reprompt(model: AgentModel, cache: common.KVCache, record: list, task: torch.Tensor, rows: torch.Tensor,
             ctx_tau: float) -> None:
    """A prompt switch while acting (not in the paper): re-read the cached context of `rows` (B,) bool
    under their new `task` (B,). Training windows carry one task, but the cached agent tokens of the
    last C − 1 frames hold the old prompt. The recorded inputs (the same noisy latents) run as one
    window under the new task in a fresh cache, and `rows` take its keys/values: the next observe then
    equals an uncached pass over the last C frames under the new task (tested). Other rows are kept."""
    if not record or not rows.any():
        return
    z, prev, valid = (torch.cat(x, 1) for x in zip(*record))  # (B, T_c, N_z, C_z), (B, T_c, A), (B, T_c)
    (B, T), fresh = valid.shape, common.KVCache(cache.window)
    fresh.pos = cache.pos - T  # the same absolute frame positions (RoPE)
    full = lambda v: torch.full((B, T), v, device=z.device)  # noqa: E731
    model(z, full(context_signal_level(ctx_tau, model.k_max)), full(1.0 / model.k_max), prev, valid, task,
          cache=fresh, commit=True)
    sel = rows.repeat_interleave(model.space_mask.shape[0])[:, None, None, None]  # (B·N, 1, 1, 1): keys are (B·N, Hk, T_c, Dh)
    for i, (k, v) in fresh.kv.items():
        cache.kv[i] = (torch.where(sel, k, cache.kv[i][0]), torch.where(sel, v, cache.kv[i][1]))


def imagine_frame(model: AgentModel, cache: common.KVCache, prev_action, task: torch.Tensor, k: int = 4,
                  gen: torch.Generator | None = None) -> torch.Tensor:
    """Frame t (B, N_z, C_z) from the cached history and a_{t−1}: K shortcut steps of d = 1/K (§3.2).
    Does not change the cache (observe commits the frame)."""
    assert cache.kv, "imagine_frame needs a context: observe at least one frame first"
    B, dev = next(iter(cache.kv.values()))[0].shape[0] // model.space_mask.shape[0], model.bins.device  # keys (B·N, …)
    prev, valid = _step_inputs(model, prev_action, B, dev)
    noise = torch.randn(B, 1, model.dyn.latent_tokens, model.dyn.latent_dim, generator=gen, device=dev)
    full = lambda v: torch.full((B, 1), float(v), device=dev)  # noqa: E731
    f = lambda z, tau, d: model(z, full(tau), full(d), prev, valid, task, cache=cache)[0].float()  # noqa: E731
    return sample_frame(f, noise, k)[:, 0]  # (B, N_z, C_z)


def step_world_model(model: AgentModel, cache: common.KVCache, prev_action, task: torch.Tensor, k: int = 4,
                     ctx_tau: float = 0.9, gen: torch.Generator | None = None):
    """One imagined step: frame t ~ world model given a_{t−1}, written into the cache; returns (z_t, h_t)."""
    z = imagine_frame(model, cache, prev_action, task, k, gen)  # (B, N_z, C_z)
    return z, observe(model, cache, z, prev_action, task, ctx_tau, gen)


# ==============================================================================================
# Objective (Eq 9): MTP targets and masks, behaviour cloning and reward NLL
# ==============================================================================================


def mtp_targets(actions: torch.Tensor, rewards: torch.Tensor, L: int, event: torch.Tensor | None = None) -> dict:
    """MTP targets of h_t for n = 0…L−1 (DESIGN.md §3): a_{t+n} (taken at frame t+n), r_{t+n} (entering t+n).

    actions (B, T, A); rewards (B, T) of the prompted task; event (B,) window position of the
    prompted task's reward (−1: none). Returns actions (B, T, L, A), rewards (B, T, L) and the
    boolean masks (B, T, L): `inside` (t + n < T: offsets past the end are masked, not padded),
    `bc` (inside and t + n < event: the actions that lead up to the task), `reward` (inside, except
    r_0 of the window's first frame, whose transition h_0 has not seen).
    """
    (B, T, A), dev = actions.shape, actions.device
    j = torch.arange(T, device=dev)[:, None] + torch.arange(L, device=dev)  # (T, L) target index t + n
    inside = (j < T).expand(B, T, L)  # (B, T, L)
    jc = j.clamp(max=T - 1)  # in-range index for the gather; masked entries are never used
    event = torch.full((B,), -1, device=dev) if event is None else event
    before = (event < 0)[:, None, None] | (j < event[:, None, None])  # (B, T, L)
    reward_mask = inside.clone()
    reward_mask[:, 0, 0] = False  # r_0 of the window: the transition into frame 0 is not in the window
    return {"actions": actions[:, jc], "rewards": rewards[:, jc],  # (B, T, L, A), (B, T, L)
            "inside": inside, "bc": inside & before, "reward": reward_mask}


def agent_loss(pol_logits: list[torch.Tensor], rew_logits: torch.Tensor, actions: torch.Tensor,
               rewards: torch.Tensor, bc_mask: torch.Tensor, reward_mask: torch.Tensor, bins: torch.Tensor) -> dict:
    """Eq 9:  L = − Σ_n ln p(a_{t+n} | h_t) − Σ_n ln p(r_{t+n} | h_t)   (n = 0…L−1), as masked means.

    pol_logits A × (B, T, L, n_c); rew_logits (B, T, L, bins); actions (B, T, L, A); rewards (B, T, L);
    masks (B, T, L) bool. Returns bc and reward (the two Eq 9 terms; each is normalised by its own
    running RMS in train) and diagnostics.
    """
    nll_a = -action_log_prob(pol_logits, actions)  # (B, T, L) −ln π(a_{t+n} | h_t)
    nll_r = twohot_nll(rew_logits, rewards, bins)  # (B, T, L) −ln p(r_{t+n} | h_t)
    mb, mr = bc_mask.float(), reward_mask.float()
    bc = (nll_a * mb).sum() / mb.sum().clamp_min(1)
    rew = (nll_r * mr).sum() / mr.sum().clamp_min(1)
    with torch.no_grad():  # move accuracy at offset 0, for the log
        hit = (pol_logits[0][..., 0, :].argmax(-1) == actions[..., 0, 0]).float()  # (B, T)
        acc = (hit * mb[..., 0]).sum() / mb[..., 0].sum().clamp_min(1)
    return {"bc": bc, "reward": rew, "bc_move_acc": acc,
            "bc_per_offset": ((nll_a * mb).sum((0, 1)) / mb.sum((0, 1)).clamp_min(1)).detach()}


# ==============================================================================================
# Data: the 50/50 mixture of uniform and task-relevant sequences (§3.3)
# ==============================================================================================


class MixtureSampler:
    """Windows of `seq_len` frames from the latent cache: uniform ones and task-relevant ones.

    latents (ΣT, N_b, D_b), actions (ΣT, A), rewards (ΣT, n_tasks): one split, episodes concatenated;
    episodes [{"offset", "length"}]. Uniform: any window, prompted with a uniformly drawn task.
    Relevant: a task uniformly among the tasks with events, one of its events, and a window that
    holds it at position ≥ 1 (the action that caused it is inside). segment=True: a window over the
    frames the ladder prompts with the task before the event (`prompt`), BC on those frames only.
    """

    def __init__(self, latents, actions, rewards, episodes: list[dict], seq_len: int, seed: int = 0,
                 segment: bool = False):
        assert actions is not None and rewards is not None, \
            "agent finetuning needs action and reward labels (DESIGN.md §3: bring-your-own data without them " \
            "trains the tokenizer and dynamics only)"
        self.latents, self.actions, self.rewards, self.T = latents, actions, rewards, seq_len
        self.n_tasks = rewards.shape[1]
        self.episodes = [e for e in episodes if e["length"] >= seq_len]
        assert self.episodes, f"no episode of at least {seq_len} frames"
        self.starts = np.concatenate([np.arange(e["offset"], e["offset"] + e["length"] - seq_len + 1)
                                      for e in self.episodes])  # every valid window start
        self.events = {}  # task -> [(global frame of the event, lowest start, highest start)]
        self.prompt = np.zeros(len(rewards), np.int64)  # the ladder's prompt at every frame (segment mode)
        for e in self.episodes:
            o, n = e["offset"], e["length"]
            r = np.asarray(rewards[o:o + n]) > 0  # (n, n_tasks)
            level = np.maximum.accumulate(highest_true(r))  # (n,) the highest milestone rewarded so far
            self.prompt[o:o + n] = np.minimum(level + 1, self.n_tasks - 1)  # as ladder_prompt, from the rewards
            for t, k in zip(*np.nonzero(r)):
                first = t - seq_len + 1  # event mode: the event at position ≥ 1 of the window
                if segment:  # the first frame prompted with task k before its event (none: skip)
                    on = np.nonzero(self.prompt[o:o + t] == k)[0]
                    if not len(on):
                        continue
                    first = int(on[0]) - seq_len + 1
                lo, hi = max(o, o + first), min(o + n - seq_len, o + t - 1)
                if lo <= hi:
                    self.events.setdefault(int(k), []).append((o + int(t), lo, hi))
        self.segment = segment
        self.rng = np.random.default_rng(seed)

    @classmethod
    def from_cache(cls, cache: LatentCache, seq_len: int, seed: int = 0, segment: bool = False) -> "MixtureSampler":
        return cls(cache.latents, cache.actions, cache.rewards, cache.episodes, seq_len, seed, segment)

    def sample(self, n_uniform: int, n_relevant: int) -> dict:
        """Uniform rows first, then relevant rows. Returns CPU tensors: latents (B, T, N_b, D_b), actions
        (B, T, A), rewards (B, T, n_tasks), task (B,), relevant (B,) bool, event (B,) (position of the
        prompted task's first reward in the window, −1 if none), on_prompt (B, T) bool (frames BC may
        train: all, or with segment=True those the ladder prompts with the row's task)."""
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
        task = np.asarray(tasks, dtype=np.int64)
        hit = rew[np.arange(len(task)), :, task] > 0  # (B, T) the prompted task's events
        return {"latents": torch.from_numpy(np.asarray(self.latents[idx], dtype=np.float32)),
                "actions": torch.from_numpy(np.asarray(self.actions[idx], dtype=np.int64)),
                "rewards": torch.from_numpy(rew), "task": torch.from_numpy(task),
                "relevant": torch.arange(len(task)) >= n_uniform,
                "event": torch.from_numpy(np.where(hit.any(1), hit.argmax(1), -1)),
                "on_prompt": torch.from_numpy(self.prompt[idx] == task[:, None]) if self.segment
                else torch.ones(idx.shape, dtype=torch.bool)}


# ==============================================================================================
# Acting in the real environment (data.evaluate) and evaluation
# ==============================================================================================


def highest_true(hit: np.ndarray) -> np.ndarray:
    """(B, K) bool → (B,) index of the last True per row (the highest milestone), −1 where none."""
    return np.where(hit.any(1), hit.shape[1] - 1 - hit[:, ::-1].argmax(1), -1)


def ladder_prompt(frames: np.ndarray, level: np.ndarray) -> np.ndarray:
    """The evaluator's prompt ladder (Table 6): the first task not yet achieved.

    Reads the achieved milestones off the frames (B, H, W, 3) with data.decode_frames; `level` (B,)
    is the highest milestone index seen so far (−1: none), updated in place. The built-in ladder is
    a chain (each milestone needs all earlier ones), so "achieved" is "level ≥ task".
    """
    s = data.decode_frames(frames)
    inv, table = s["inv"], (s["app"] == data.TABLE).any((1, 2))  # (B, 7), (B,)
    seen = np.stack([inv[:, data.WOOD] > 0, table, inv[:, data.WOOD_PICK] > 0, inv[:, data.STONE_I] > 0,
                     inv[:, data.STONE_PICK] > 0, inv[:, data.IRON_I] > 0, inv[:, data.IRON_PICK] > 0,
                     inv[:, data.DIAMOND_I] > 0], 1)  # (B, 8) in TASKS order
    np.maximum(level, highest_true(seen), out=level)
    return np.minimum(level + 1, len(data.TASKS) - 1)


class AgentPolicy:
    """The trained policy as a data.evaluate player: per step encode the frame (tokenizer KV cache),
    write it into the transformer's KV cache (observe), read h_t, sample a_t ~ π(· | h_t) (offset 0);
    on a ladder prompt switch, first re-read the cached context under the new task (reprompt)."""

    def __init__(self, model: AgentModel, tok, device, ctx_tau: float, seed: int = 0, reprompt: bool = True):
        self.model, self.tok, self.device, self.ctx_tau = model, tok, device, ctx_tau
        self.gen, self.reprompt = torch.Generator(device).manual_seed(seed), reprompt

    def reset(self, n_envs: int) -> None:
        self.tok_cache, self.cache = common.KVCache(self.tok.encoder.window), common.KVCache(self.model.window)
        self.prev, self.level, self.task, self.record = None, np.full(n_envs, -1), np.full(n_envs, -1), []

    @torch.no_grad()
    def act(self, frames: np.ndarray) -> np.ndarray:
        prompt = ladder_prompt(frames, self.level)  # (B,) numpy
        task, switched = (torch.from_numpy(v).to(self.device) for v in (prompt, prompt != self.task))
        x = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device)[:, None]  # (B, 1, H, W, 3) uint8
        with common.autocast(self.device):
            if self.reprompt:
                reprompt(self.model, self.cache, self.record, task, switched, self.ctx_tau)
            z = pack(self.tok.encode(x, cache=self.tok_cache)).float()[:, 0]  # (B, N_z, C_z)
            h = observe(self.model, self.cache, z, self.prev, task, self.ctx_tau, self.gen,
                        self.record if self.reprompt else None)  # (B, D)
            self.prev = sample_action(self.model.policy(h, offset=0), self.gen)  # (B, A) a_t
        self.task = prompt
        return self.prev.cpu().numpy()


@torch.no_grad()
def predict_rewards(model: AgentModel, clean: torch.Tensor, actions: torch.Tensor, ctx_tau: float,
                    gen: torch.Generator) -> torch.Tensor:
    """r̂_t (offset 0) of every task prompt along one whole episode, frames at τ_ctx as when acting.

    clean (T, N_z, C_z) packed latents, actions (T, A). One pass per episode: time attention is
    windowed to C, so this equals stepping with the KV cache. Returns (n_tasks, T).
    """
    K, T, dev = model.n_tasks, clean.shape[0], clean.device
    tau_c = context_signal_level(ctx_tau, model.k_max)
    z = corrupt(torch.randn(clean[None].shape, generator=gen, device=dev), clean[None].float(), tau_c)  # (1, T, N_z, C_z)
    prev, valid = shift_actions(actions[None])  # (1, T, A), (1, T)
    full = lambda v: torch.full((K, T), v, device=dev)  # noqa: E731
    with common.autocast(dev):  # one row per task prompt: the same frames and noise
        _, h = model(z.expand(K, -1, -1, -1), full(tau_c), full(1.0 / model.k_max), prev.expand(K, -1, -1),
                     valid.expand(K, -1), torch.arange(K, device=dev))  # (K, T, D)
        return model.reward(h, 0).float()  # (K, T)


def play_episode(policy: AgentPolicy, seed: int, image_size: int, episode_len: int) -> dict:
    """One real-environment episode of the policy: frames, actions, rewards, prompts, and afterwards the
    reward head's r̂_t for every task prompt along it (for reward_trace.png)."""
    env = data.Env(image_size, episode_len)
    frame = env.reset(seed)
    policy.reset(1)
    rec = {"frames": [], "actions": [], "rewards": [np.zeros(len(data.TASKS), np.float32)], "task": []}
    for t in range(episode_len):
        rec["frames"].append(frame)
        rec["actions"].append(policy.act(frame[None])[0]), rec["task"].append(int(policy.task[0]))
        if t == episode_len - 1:
            break
        frame, r, _, _ = env.step(rec["actions"][-1])
        rec["rewards"].append(r)
    ep = {k: np.stack(v) for k, v in rec.items()}
    dev = policy.device
    with torch.no_grad(), common.autocast(dev):
        clean = pack(policy.tok.encode(torch.from_numpy(ep["frames"]).to(dev)[None])).float()[0]  # (T, N_z, C_z)
    ep["pred"] = predict_rewards(policy.model, clean, torch.from_numpy(ep["actions"]).to(dev), policy.ctx_tau,
                                 torch.Generator(dev).manual_seed(seed)).cpu().numpy()  # (n_tasks, T)
    return ep


@torch.no_grad()
def evaluate_offline(model: AgentModel, held: LatentCache, a: Args, device) -> dict:
    """Held-out BC NLL and move accuracy (relevant windows), and the reward head's event detection on
    whole held-out episodes: every frame, every task prompt, r̂_t > 0.5 counts as a predicted event."""
    sampler = MixtureSampler.from_cache(held, a.seq_len)
    sampler.rng = np.random.default_rng([a.seed, 999])
    tau_c, d_min, gen = context_signal_level(a.ctx_tau, model.k_max), 1.0 / model.k_max, torch.Generator(device)
    gen.manual_seed(a.seed + 999)
    nll, acc = [], []
    for _ in range(a.eval_batches if sampler.events else 0):
        b = sampler.sample(0, a.batch)
        clean, acts = pack(b["latents"].to(device)), b["actions"].to(device)
        with common.autocast(device):
            _, h = model(corrupt(torch.randn(clean.shape, generator=gen, device=device), clean, tau_c),
                         torch.full(acts.shape[:2], tau_c, device=device), torch.full(acts.shape[:2], d_min, device=device),
                         *shift_actions(acts), b["task"].to(device))
            pol = model.policy(h, offset=0)  # A × (B, T, n_c)
        m = mtp_targets(acts, torch.zeros(acts.shape[:2], device=device), 1, b["event"].to(device))["bc"][..., 0]  # (B, T)
        nll.append(float((-action_log_prob(pol, acts) * m).sum() / m.sum()))
        acc.append(float(((pol[0].argmax(-1) == acts[..., 0]).float() * m).sum() / m.sum()))
    # Reward events on whole held-out episodes, every task prompt: r̂_t of frames 1…n−1 (n_tasks, n − 1) each.
    scores, trues = [], []
    for e in held.episodes:
        o, n = e["offset"], e["length"]
        clean = pack(torch.from_numpy(np.array(held.latents[o:o + n], dtype=np.float32))).to(device)
        acts = torch.from_numpy(np.array(held.actions[o:o + n])).to(device)  # (n, A)
        trues.append(np.array(held.rewards[o + 1:o + n]).T > 0)
        scores.append(predict_rewards(model, clean, acts, a.ctx_tau, gen)[:, 1:].cpu().numpy())
    r_hat, true = np.concatenate(scores, 1), np.concatenate(trues, 1)  # (n_tasks, Σ(n − 1))
    pred = r_hat > 0.5
    tp, fp, fn = int((pred & true).sum()), int((pred & ~true).sum()), int((~pred & true).sum())
    prec, rec = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    return {"heldout_bc_nll": float(np.mean(nll)) if nll else None, "heldout_move_acc": float(np.mean(acc)) if acc else None,
            "reward_precision": prec, "reward_recall": rec, "reward_f1": 2 * prec * rec / max(prec + rec, 1e-9),
            "reward_events": tp + fn, "reward_predicted": tp + fp, "reward_auc": auc(r_hat.ravel(), true.ravel()),
            "reward_mean_at_events": float(r_hat[true].mean()) if true.any() else None,
            "reward_mean_elsewhere": float(r_hat[~true].mean()),
            "reward_recall_per_task": {name: float(pred[k][true[k]].mean()) if true[k].any() else None
                                       for k, name in enumerate(held.meta["tasks"])}}


def auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve = P(score of an event > score of a non-event), ties counted half."""
    P, N = int(labels.sum()), int((~labels).sum())
    if not P or not N:
        return None
    _, inv, counts = np.unique(scores, return_inverse=True, return_counts=True)
    rank = (np.cumsum(counts) - (counts - 1) / 2)[inv]  # average 1-based rank of every score
    return float((rank[labels].sum() - P * (P + 1) / 2) / (P * N))


def save_pictures(success: dict, episode: dict | None, out: str, title: str) -> None:
    """success.png: success per task with standard errors for every policy evaluated; reward_trace.png:
    one real-environment episode of the policy, frames at its events and the reward head's prediction."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, tasks = list(success), list(next(iter(success.values())))
    fig, ax = plt.subplots(figsize=(10, 3.6))
    w = 0.8 / len(names)
    for i, name in enumerate(names):
        rate = [100 * success[name][k]["rate"] for k in tasks]
        err = [100 * success[name][k]["stderr"] for k in tasks]
        ax.bar(np.arange(len(tasks)) + (i - (len(names) - 1) / 2) * w, rate, w, yerr=err, capsize=2, label=name)
    ax.set_xticks(range(len(tasks)), [k.replace("_", "\n") for k in tasks], fontsize=7)
    ax.set_ylabel("success (% of episodes)"), ax.set_ylim(0, 105), ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout(), fig.savefig(os.path.join(out, "success.png"), dpi=100), plt.close(fig)
    if episode is None:
        return
    T = episode["pred"].shape[1]
    events = [int(t) for t in np.nonzero(episode["rewards"].max(1) > 0)[0]]
    shown = sorted(set(events[:6] + [int(t) for t in np.linspace(0, T - 1, 12 - min(len(events), 6))]))[:12]
    fig = plt.figure(figsize=(12, 4.6))
    for i, t in enumerate(shown):
        ax = fig.add_subplot(2, len(shown), i + 1)
        ax.imshow(episode["frames"][t], interpolation="nearest"), ax.axis("off")
        ax.set_title(f"t={t}" + (" ★" if t in events else ""), fontsize=7, color="C3" if t in events else "k")
    ax = fig.add_subplot(2, 1, 2)
    for k, name in enumerate(data.TASKS):  # r̂_t per task prompt (lines), true events (triangles), same colour
        ax.plot(episode["pred"][k], lw=0.8, color=f"C{k}", label=name)
        hit = np.nonzero(episode["rewards"][:, k] > 0)[0]
        ax.plot(hit, np.ones(len(hit)) * 1.1, "v", color=f"C{k}", ms=7)
    ax.step(range(T), np.asarray(episode["task"]) / 10, "k", where="post", lw=0.6, alpha=0.4)
    ax.set_xlabel("time step"), ax.set_ylabel("predicted reward r̂_t"), ax.set_ylim(-0.1, 1.25)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))  # outside: never hides an event
    fig.suptitle("one real-environment episode of the policy: the reward head's r̂_t for every task prompt (lines), "
                 "true reward events (▼), prompt ladder index / 10 (grey)", fontsize=8)
    fig.tight_layout(), fig.savefig(os.path.join(out, "reward_trace.png"), dpi=100), plt.close(fig)


# ==============================================================================================
# Training
# ==============================================================================================


def build_agent(agent_args: dict, dyn_args: dict, shapes: dict) -> AgentModel:
    """Rebuild the model from plain args dicts (as stored in the checkpoint)."""
    dyn = build_model(dyn_args, *shapes["latent"], shapes["action_classes"])
    return AgentModel(dyn, len(shapes["tasks"]), agent_args["head_hidden"], agent_args["mtp"], agent_args["bins"])


def load_agent(path: str = "runs/agent/ckpt.pt", device="cpu"):
    """The trained agent for imagine.py. Returns (model, checkpoint dict); the checkpoint holds the
    tokenizer path (ckpt["tokenizer"]) and the task names (ckpt["shapes"]["tasks"])."""
    ckpt = common.load_checkpoint(path, "agent", "python agent.py")
    model = build_agent(ckpt["args"], ckpt["dynamics_args"], ckpt["shapes"])
    model.load_state_dict(ckpt["model"])
    return model.to(device), ckpt


def train(a: Args) -> dict:
    common.seed_everything(a.seed)
    device = common.pick_device(a.device)
    os.makedirs(a.out, exist_ok=True)
    ckpt_path = os.path.join(a.out, "ckpt.pt")

    # Parents: the dynamics model, its tokenizer and the tokenizer's latent cache (DESIGN.md §2).
    dyn, dyn_ckpt = load_dynamics(a.dynamics, device)
    tok_path = a.tokenizer or dyn_ckpt["parent"]["path"]
    tok, tok_ckpt = load_tokenizer(tok_path, device)
    tok_dir = os.path.dirname(os.path.abspath(tok_path))
    train_cache, held = LatentCache(tok_dir, "train", seed=a.seed), LatentCache(tok_dir, "heldout", seed=a.seed + 1)
    meta, shapes = train_cache.meta, dict(dyn_ckpt["shapes"], tasks=list(train_cache.meta["tasks"]))
    if [int(n) for _, n in meta["action_components"]] != shapes["action_classes"] or \
            shapes["latent"] != [tok.n_latents // 2, 2 * tok.latent_dim]:
        raise ValueError(f"{a.dynamics} does not fit {tok_path} and its dataset (actions {shapes['action_classes']}, "
                         f"latents {shapes['latent']}): retrain it with `python dynamics.py --tokenizer {tok_path}`")
    assert a.seq_len <= dyn.window, f"T = {a.seq_len} must not exceed the dynamics context C = {dyn.window}"
    assert a.relevant in ("event", "segment"), f"--relevant must be event or segment, got {a.relevant!r}"
    sampler = MixtureSampler.from_cache(train_cache, a.seq_len, a.seed, segment=a.relevant == "segment")
    if a.from_scratch:  # the "BC" baseline: the same architecture, randomly initialised
        dyn = build_model(dyn_ckpt["args"], *shapes["latent"], shapes["action_classes"]).to(device)
    model = AgentModel(dyn, len(shapes["tasks"]), a.head_hidden, a.mtp, a.bins).to(device)
    video_loss = a.video_loss and not a.from_scratch
    n_params = sum(p.numel() for p in model.parameters())
    print(f"agent: {n_params / 1e6:.2f}M parameters ({'random init' if a.from_scratch else 'from ' + a.dynamics}, "
          f"{'with' if video_loss else 'no'} video loss); "
          f"tasks {shapes['tasks']}; L = {a.mtp} MTP offsets; {len(sampler.starts):,} windows, "
          f"{sum(len(v) for v in sampler.events.values())} reward events in the train split")
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay, betas=(0.9, 0.95))
    norms = {k: common.RunningRMS() for k in ("video", "bc", "reward")}
    step = 0
    if a.resume:
        ckpt = common.load_checkpoint(ckpt_path, "agent", f"python agent.py --out {a.out}")
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
            "format_version": FORMAT_VERSION, "stage": "agent", "step": step, "model": model.state_dict(),
            "optimizer": opt.state_dict(), "normalizers": {k: n.state_dict() for k, n in norms.items()},
            "args": asdict(a), "dynamics_args": dyn_ckpt["args"], "shapes": shapes, "tokenizer": os.path.abspath(tok_path),
            "parent": {"stage": "dynamics", "path": os.path.abspath(a.dynamics), "step": dyn_ckpt["step"],
                       "weights_used": not a.from_scratch}})

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    gen = torch.Generator(device)
    k_min, flow_frac = dyn_ckpt["args"].get("k_min", 1), dyn_ckpt["args"].get("flow_frac", 0.0)
    tau_c, d_min = context_signal_level(a.ctx_tau, model.k_max), 1 / model.k_max
    n_rel = int(round(a.batch * a.relevant_frac))
    n_uni = a.batch - n_rel
    t_start, steps_run = time.time(), 0
    while step < a.steps:
        # Per-step streams seeded from (seed, step): --resume sees exactly the batches and noise of an
        # uninterrupted run, and the data stream does not depend on model initialisation.
        sampler.rng = np.random.default_rng([a.seed, step])
        gen.manual_seed(a.seed * 1_000_003 + step)
        b = {k: v.to(device) for k, v in sampler.sample(n_uni, n_rel).items()}
        lat, acts, task = b["latents"], b["actions"], b["task"]
        B, T = acts.shape[:2]
        for g in opt.param_groups:
            g["lr"] = common.lr_at(step, a.lr, a.warmup, a.steps)
        with common.autocast(device):
            terms = {}
            if video_loss and n_uni:  # Eq 7 keeps running on the uniform half (§3.3), as in stage 1b
                fb = forcing_batch(lat[:n_uni], acts[:n_uni], model.k_max, a.start_frac, gen, k_min, flow_frac)
                def f(z, tau, d, rows=None):  # ẑ₁ for the uniform half (or its `rows`, see Eq 7's half steps)
                    prev, valid, indep = row_select(fb, rows)
                    tk = task[:n_uni] if rows is None else task[:n_uni][rows]
                    return fwd(z, tau, d, prev, valid, tk, indep)[0].float()
                terms["video"] = shortcut_forcing_loss(f, fb["clean"], fb["noise"], fb["tau"], fb["d"], model.k_max,
                                                       dyn_ckpt["args"].get("boot_clip", 0.0))["loss"]
            # The agent pass: every row, every frame at τ_ctx, the input the heads see when acting.
            clean = pack(lat)  # (B, T, N_z, C_z)
            z_ctx = corrupt(torch.randn(clean.shape, generator=gen, device=device), clean, tau_c)  # Eq 6 at τ_ctx
            _, h = fwd(z_ctx, torch.full((B, T), tau_c, device=device), torch.full((B, T), d_min, device=device),
                       *shift_actions(acts), task)  # h (B, T, D)
            rew = b["rewards"].gather(2, task[:, None, None].expand(B, T, 1))[..., 0]  # (B, T) prompted task
            tgt = mtp_targets(acts, rew, a.mtp, b["event"])
            eq9 = agent_loss(model.policy(h), model.reward_logits(h), tgt["actions"], tgt["rewards"],
                             tgt["bc"] & (b["relevant"][:, None] & b["on_prompt"])[..., None],  # BC on the
                             tgt["reward"], model.bins)  # relevant half (and, with --relevant segment, its prompted frames)
            terms.update(bc=eq9["bc"], reward=eq9["reward"])
        common.check_finite(step, **terms)
        loss = sum(norms[k](v) for k, v in terms.items())  # each term ÷ its running RMS (§3 intro)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
        opt.step()
        step, steps_run = step + 1, steps_run + 1
        if step % a.log_every == 0 or step == a.steps:
            log.log(step, {**{k: v.detach() for k, v in terms.items()}, "move_acc": eq9["bc_move_acc"],
                           "grad_norm": gnorm, "lr": common.lr_at(step - 1, a.lr, a.warmup, a.steps)}, B * T)
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

    # Final evaluation, pictures, summary.json (DESIGN.md §7).
    name = "BC (scratch)" if a.from_scratch else "WM+BC"
    summary = {
        "stage": "agent", "preset": a.preset, "device": str(device),
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "steps": step, "steps_this_run": steps_run, "wall_s": wall, "steps_per_s": steps_run / max(wall, 1e-9),
        "frames_per_s": steps_run * a.batch * a.seq_len / max(wall, 1e-9), "peak_mem_gb": common.peak_memory_gb(device),
        "params_m": n_params / 1e6, "policy": name, "from_scratch": a.from_scratch, "video_loss": video_loss, "mtp": a.mtp,
        "eval_episodes": a.eval_episodes, "ctx_tau_used": tau_c, "reprompt": a.reprompt,
    }
    model.eval()
    t0 = time.time()
    summary.update(evaluate_offline(model, held, a, device))
    builtin = meta.get("generator") == "minidreamer4 data.py" and list(meta["tasks"]) == data.TASKS
    if a.eval_episodes > 0 and builtin:
        size, ep_len = meta["image_size"], meta.get("episode_len", 256)
        policy = AgentPolicy(model, tok, device, a.ctx_tau, a.seed, a.reprompt)
        success = {name: data.evaluate(policy, a.eval_episodes, a.seed, size, ep_len)["success"]}
        if a.baselines:
            for label, player in (("random", data.RandomPolicy(a.seed)), ("contractors", data.ContractorPolicy(a.seed))):
                success[label] = data.evaluate(player, a.eval_episodes, a.seed, size, ep_len)["success"]
        other = os.path.abspath(os.path.dirname(a.compare)) if a.compare else None
        if other and other != os.path.abspath(a.out) and os.path.exists(a.compare):
            theirs = json.load(open(a.compare))
            if theirs.get("policy") != name:  # never replace this run's own column (e.g. another seed's scratch run)
                success[theirs["policy"]] = theirs["success"][theirs["policy"]]
                summary["compared_with"] = a.compare
        summary["success"] = success
        episode = play_episode(policy, data.episode_seed(a.seed, "eval", 10 ** 6), size, ep_len)
        save_pictures(dict(sorted(success.items(), key=lambda kv: ["random", "contractors", "BC (scratch)",
                                                                   "WM+BC"].index(kv[0]))), episode, a.out,
                      f"real-environment success per task, {a.eval_episodes} evaluation worlds (± standard error)")
        for k in data.TASKS:
            print(f"  {k:<20s}" + " | ".join(f"{n} {100 * s[k]['rate']:5.1f} ± {100 * s[k]['stderr']:.1f}"
                                            for n, s in success.items()))
    elif a.eval_episodes > 0:
        print("note: the dataset is not the built-in environment's: no real-environment evaluation")
    summary["eval_s"] = time.time() - t0
    nan = lambda v: float("nan") if v is None else v  # noqa: E731  (no held-out reward events: no BC metric)
    print(f"eval: held-out BC NLL {nan(summary['heldout_bc_nll']):.3f}, move accuracy {nan(summary['heldout_move_acc']):.3f} | "
          f"reward events: precision {summary['reward_precision']:.3f}, recall {summary['reward_recall']:.3f} "
          f"({summary['reward_events']} events), AUC {nan(summary['reward_auc']):.3f}")
    common.write_json(os.path.join(a.out, "summary.json"), summary)
    print("summary:", json.dumps(summary))
    return summary


def main():
    train(common.parse_args(Args, PRESETS))


if __name__ == "__main__":
    main()
