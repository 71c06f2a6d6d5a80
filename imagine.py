"""Stage 3 — imagination training: a TD(λ) value head and PMPO inside the world model (Dreamer 4 §3.3, Eqs 10–11).

The agent of stage 2 (agent.py) can already act: its policy head was cloned from the contractors.
Here it practises inside its own world model. Contexts are cut from the dataset; from each one
the frozen transformer is unrolled on its own outputs — the policy picks a_t, the K = 4 shortcut
sampler generates the next frame, the reward head says how much it paid — and a new value head
learns the λ-return of those imagined trajectories (Eq 10). The policy head is improved with PMPO
(Eq 11): raise the probability of actions whose return beat the value, lower the others, and stay
near the behaviour-cloned policy (a frozen copy, π_prior) through a reverse KL. Only the policy and
value heads learn; the transformer, the reward head and the tokenizer stay frozen (PAPER.md §6).

Indexing (DESIGN.md §3, written out once here; tests/test_imagine.py pins it):
    context ... z_0 --a_0--> z_1, r_1 --a_1--> z_2, r_2 ... --a_{H−1}--> z_H, r_H
    h_t has seen a_{t−1} and z_t.  π(a_t | h_t),  r_t = reward head at h_t (the reward of ENTERING
    state t, i.e. of the transition s_{t−1}, a_{t−1} → s_t),  v_t = value head at h_t.
    All rollout arrays are indexed by state: h, rewards, values (B, H+1); actions (B, H).
    Eq 10 in this indexing:  R_t = r_{t+1} + γ·c_{t+1}·((1 − λ)·v_{t+1} + λ·R_{t+1}),  R_H = v_H.
    The paper prints "r_t + γ c_t((1 − λ) v_t + λ R_{t+1})": DreamerV3 stores the reward and the
    continuation of a transition with the state it *starts* from, and its v_t there is the value of
    the state the transition *enters* (PAPER.md §6, §9.5). Reading v_t as the value of the current
    state would bootstrap a state from itself; we use v_{t+1}. The advantage of a_t is A_t = R_t − v_t.

Reads:  runs/agent/ckpt.pt (`python agent.py`), its tokenizer and the tokenizer's latent cache;
        the dataset folder (held-out episodes, replayed in the real environment for the probes).
Writes: runs/imagine/  ckpt.pt, args.json, metrics.jsonl, summary.json, success.png, success_curve.png,
        imagined_vs_real.png, rollout.png;  with --table: table.md, table.json, table.png.

Run:
    python imagine.py                          # default preset: one GPU, after agent.py
    python imagine.py --preset cpu             # 2 CPU cores, after agent.py --preset cpu (and its --from-scratch)
    python imagine.py --preset smoke           # seconds; used by the tests
    python imagine.py --table runs/cpu/imagine,runs/cpu/imagine_s1,runs/cpu/imagine_s2 --out runs/cpu/imagine_table
                                               # the README table: mean ± std over training seeds (seed s: agent.py
                                               # --seed s with and without --from-scratch, then imagine.py --seed s)

Equation map:
    Eq 10  R^λ_t = r_{t+1} + γ c_{t+1} ((1 − λ) v_{t+1} + λ R^λ_{t+1}),  R^λ_H = v_H   -> lambda_returns
    Eq 10  −Σ_t ln p_θ(sg(R^λ_t) | s_t): symexp twohot NLL of the value head       -> imagination_loss
    Eq 11  (1 − α)/|D⁻| Σ_{D⁻} ln π − α/|D⁺| Σ_{D⁺} ln π + β/N Σ KL[π_θ ‖ π_prior]     -> pmpo_loss
    §3.3   value head (new, zero output), frozen BC prior, frozen transformer + reward head -> build_heads
    §3.3   contexts from the dataset (50/50 mixture), one rollout per context          -> ContextSampler
    §3.3   rollouts: a_t ~ π, z_{t+1} by K = 4 shortcut steps with the KV cache        -> imagine_rollout
    §4.1   real-environment success per task (Table 7 columns)                         -> evaluate_success, make_table
    (ours) imagined vs real success of the same policy from the same held-out states    -> imagined_vs_real

Measurements beyond the paper: from held-out states shortly before a reward event (the real episode is
replayed to that state: data.Env is deterministic given its world seed and the recorded actions) each
policy is rolled out H steps both in imagination and in the real environment. Does the world model rank
the policies as the real environment does? The recorded contractor actions, replayed open loop, succeed
in reality by construction, so their imagined success is the world model's recall of reward events.

Deviations and ambiguities (each is also noted where it applies):
  - Horizon H = 32 imagined steps (not in paper); contexts of 8 dataset frames (not in paper).
  - λ = 0.95 (not in paper; DreamerV3's). γ = 0.997, α = 0.5, β = 0.3 as in the paper.
  - c_t = 1 everywhere: the built-in episodes have a fixed length and no terminal states, and the
    paper describes no continuation head (PAPER.md §12).
  - PMPO's ln π and KL over the factorised action space (categorical move + Bernoulli buttons) are
    sums over the components (the paper does not say how they factorise); the KL of independent
    components is exactly that sum. A ≥ 0 counts as positive; an empty D⁺ or D⁻ contributes 0.
  - Task prompts (not in paper): a context of the relevant half ends 1…H steps before a reward event
    of task k in the data and is prompted with k (so success is reachable within the horizon); a
    uniform context is prompted with the first task of the list not yet achieved in its episode,
    the same ladder rule as the evaluation prompt (agent.ladder_prompt). The prompt is fixed during
    a rollout.
  - The policy and value heads read h_t of frames written into the KV cache at τ_ctx (the stage-2
    convention, agent.observe); the imagined frame itself is generated from pure noise with K = 4.
  - Reward centering (`--center-rewards`, on by default; not in the paper): Eq 10 sees r̂_t − r̄ with r̄ a
    running mean of the predicted rewards. It leaves the optimal policy unchanged here and lets the value
    head become accurate within our few hundred updates (RewardCenter says why; --no-center-rewards is
    the literal Eq 10).
  - No loss normalisation in this stage (an ambiguity): §3 says "all loss terms" are divided by their
    running RMS, while App F says PMPO, which uses only the sign of the advantage, needs no (return)
    normalisation. PMPO's three terms are all in nats, and the value head has its own parameters, so
    its scale does not interact with the policy's; we leave both unnormalised.
  - One gradient step per batch of rollouts (on-policy), AdamW, warm-up + cosine, no weight decay;
    learning rates, batch and steps are not in the paper. No slow/EMA critic (not in the paper).
  - The seeds of the README table vary the agent, the BC baseline and this stage; the tokenizer and
    the dynamics model are shared (they are the expensive stages).
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

import agent as ag
import common
import data
from dynamics import context_signal_level, corrupt, shift_actions
from tokenizer import LatentCache, load_tokenizer, pack, unpack


@dataclass
class Args:
    preset: str = "default"  # smoke | cpu | default (one GPU, 64×64)
    agent: str = "runs/agent/ckpt.pt"  # parent checkpoint, written by `python agent.py`
    out: str = "runs/imagine"  # run folder: checkpoint, metrics, summary, pictures
    horizon: int = 32  # H imagined steps per rollout (not in paper)
    context: int = 8  # dataset frames that start a rollout (not in paper)
    batch: int = 64  # rollouts per update, one per context (§3.3: one rollout per context)
    relevant_frac: float = 0.5  # share of contexts that end shortly before a reward event (§3.3: 50/50 mixture)
    sample_k: int = 4  # K shortcut steps per imagined frame (§3.2: K = 4)
    gamma: float = 0.997  # discount γ (Eq 10)
    lam: float = 0.95  # λ of the λ-returns (Eq 10; not in paper, DreamerV3's value)
    alpha: float = 0.5  # PMPO weight of the positive set (Eq 11)
    beta: float = 0.3  # PMPO weight of the reverse KL to the BC prior (Eq 11)
    value_hidden: int = 0  # width of the value head's MLP; 0 = the policy head's width (not in paper)
    center_rewards: bool = True  # subtract a running mean of r̂ before Eq 10 (reward centering; not in paper)
    steps: int = 1000  # updates, each on a fresh batch of rollouts (not in paper)
    lr: float = 1e-4  # policy head peak learning rate, AdamW (not in paper)
    value_lr: float = 3e-4  # value head peak learning rate, AdamW (not in paper)
    warmup: int = 50  # linear warm-up steps, then cosine decay to 10 % (not in paper)
    grad_clip: float = 1.0  # gradient-norm clipping over both heads (not in paper)
    log_every: int = 20  # steps between log lines
    ckpt_every: int = 100  # steps between checkpoints
    eval_every: int = 250  # steps between real-environment evaluations for the success curve; 0 = none
    curve_episodes: int = 50  # real-environment episodes per point of the success curve
    eval_episodes: int = 200  # final real-environment episodes per policy (§4.1; ≥ 100); 0 skips evaluation
    reprompt: bool = True  # evaluation: on a ladder prompt switch, re-read the cached context (agent.reprompt)
    probe_starts: int = 16  # held-out start states per task for imagined vs real (0 = skip)
    compare: str = ""  # summary.json of the BC-from-scratch run (agent.py --from-scratch), for the table
    table: str = ""  # comma-separated imagine run folders: only write the mean ± std table of their summaries
    stop_at: int = 0  # stop after this step as if interrupted (to test --resume); 0 = never
    resume: bool = False  # continue the run in --out from its ckpt.pt
    seed: int = 0  # seed for contexts, noise, action sampling and evaluation worlds
    device: str = "auto"  # auto | cpu | cuda | mps


PRESETS = {
    "smoke": dict(agent="runs/smoke/agent/ckpt.pt", out="runs/smoke/imagine", horizon=4, context=2, batch=4,
                  steps=4, warmup=1, log_every=2, ckpt_every=2, eval_every=2, curve_episodes=2, eval_episodes=2,
                  probe_starts=1, compare="runs/smoke/agent_scratch/summary.json"),
    "cpu": dict(agent="runs/cpu/agent/ckpt.pt", out="runs/cpu/imagine", batch=16, steps=150, lr=3e-4, value_lr=1e-3,
                warmup=10, log_every=10, ckpt_every=50, eval_every=50, curve_episodes=50, eval_episodes=100,
                probe_starts=8, compare="runs/cpu/agent_scratch/summary.json"),
}

FORMAT_VERSION = 1
POLICY_ORDER = ["random", "contractors", "BC (scratch)", "WM+BC", "Dreamer 4"]  # the columns of Table 7


# ==============================================================================================
# Eq 10: λ-returns, and Eq 11: PMPO
# ==============================================================================================


def lambda_returns(rewards: torch.Tensor, values: torch.Tensor, cont: torch.Tensor, gamma: float,
                   lam: float) -> torch.Tensor:
    """Eq 10 indexed by state (module docstring): R_t = r_{t+1} + γ c_{t+1} ((1 − λ) v_{t+1} + λ R_{t+1}), R_H = v_H.

    rewards, cont, values: (B, H+1); rewards[:, t] = r_t is the reward of entering state t (r_0 is
    never used), cont[:, t] = c_t is 0 if state t is terminal, values[:, t] = v_t. Returns R_0 … R_{H−1}
    (B, H). The loop runs backwards over time and is vectorised over the batch; a return is a
    target, so the caller detaches it (sg).
    """
    H = rewards.shape[1] - 1
    ret = values[:, H]  # R_H = v_H: bootstrap from the last imagined state
    out = []
    for t in reversed(range(H)):
        # Eq 10: R_t = r_{t+1} + γ c_{t+1} ((1 − λ) v_{t+1} + λ R_{t+1})
        ret = rewards[:, t + 1] + gamma * cont[:, t + 1] * ((1 - lam) * values[:, t + 1] + lam * ret)
        out.append(ret)
    return torch.stack(out[::-1], dim=1)  # (B, H)


def pmpo_loss(pol_logits: list[torch.Tensor], prior_logits: list[torch.Tensor], actions: torch.Tensor,
              adv: torch.Tensor, alpha: float = 0.5, beta: float = 0.3) -> dict:
    """Eq 11 (PMPO with a reverse KL to the behavioural prior), over the N states of a batch of rollouts:

        L = (1 − α)/|D⁻| Σ_{D⁻} ln π_θ(a_i | s_i) − α/|D⁺| Σ_{D⁺} ln π_θ(a_i | s_i) + β/N Σ_i KL[π_θ ‖ π_prior]
        D⁺ = {i : A_i ≥ 0},  D⁻ = {i : A_i < 0}  (only the sign of the advantage is used)

    pol_logits, prior_logits: A × (..., n_c) per-component logits (agent.split_policy_logits) of π_θ and
    π_prior; actions (..., A); adv (...) advantages (detached here: sg). ln π and the KL are sums over
    the action components. An empty set contributes 0.
    """
    adv = adv.detach()
    logp = ag.action_log_prob(pol_logits, actions)  # (...) ln π_θ(a_i | s_i), Σ over components
    kl = ag.action_kl(pol_logits, [lg.detach() for lg in prior_logits])  # (...) reverse KL[π_θ ‖ π_prior]
    pos, neg = (adv >= 0).float(), (adv < 0).float()  # D⁺ (zero counts as positive), D⁻
    pos_mean = (logp * pos).sum() / pos.sum().clamp_min(1)  # 1/|D⁺| Σ_{D⁺} ln π   (0 if D⁺ is empty)
    neg_mean = (logp * neg).sum() / neg.sum().clamp_min(1)  # 1/|D⁻| Σ_{D⁻} ln π   (0 if D⁻ is empty)
    kl_mean = kl.mean()  # 1/N Σ KL
    loss = (1 - alpha) * neg_mean - alpha * pos_mean + beta * kl_mean
    return {"loss": loss, "pos_logp": pos_mean.detach(), "neg_logp": neg_mean.detach(), "kl": kl_mean.detach(),
            "frac_pos": pos.mean()}


# ==============================================================================================
# Heads: the new value head and the frozen behavioural prior (§3.3)
# ==============================================================================================


def build_heads(model: ag.AgentModel, value_hidden: int = 0):
    """Freeze the agent, unfreeze its policy head, add a value head and a frozen copy of the policy head.

    Value head: an agent.MTPHead with one output (L = 1) of `bins` twohot logits, output layer
    zero-initialised (so v = 0 at the start, PITFALLS.md 11). Prior π_prior: a deep copy of the
    stage-2 policy head, never updated. Returns (value_head, prior_head).
    """
    model.requires_grad_(False)  # transformer, tokens, agent token, reward head: frozen (§3.3)
    model.policy_head.requires_grad_(True)  # trainable: the policy head …
    D = model.agent_base.shape[0]
    hidden = value_hidden or model.policy_head.trunk[0].out_features
    value = ag.MTPHead(D, hidden, model.bins.shape[0], 1).to(model.bins.device)  # … and the new value head
    prior = copy.deepcopy(model.policy_head).requires_grad_(False).eval()  # π_prior: the BC policy, frozen
    return value, prior


def value_of(value_head: ag.MTPHead, h: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """v_t = symexp twohot mean of the value head at h_t.  (..., D) → (...)."""
    return ag.twohot_mean(value_head(h.float(), 0), bins)


# ==============================================================================================
# Contexts: the 50/50 mixture of dataset windows (§3.3), with their task prompts
# ==============================================================================================


class ContextSampler:
    """Dataset contexts of `context` frames, from the latent cache, one imagined rollout each.

    Uniform half: any window of the split; prompt = the first task (in list order) not yet achieved in
    the episode at the window's last frame (the evaluation ladder). Relevant half: a task uniformly among
    those with reward events, one of its events at frame e, a window ending at e − j with j ~ U{1…H}
    (the success lies inside the horizon), prompt = that task. `rng` is the sampler's own.
    """

    def __init__(self, cache: LatentCache, context: int, horizon: int, seed: int = 0):
        assert cache.actions is not None and cache.rewards is not None, \
            "imagination training needs action and reward labels (DESIGN.md §3)"
        self.latents, self.actions, self.T = cache.latents, cache.actions, context
        rew = np.asarray(cache.rewards) > 0  # (ΣT, n_tasks)
        done = np.zeros_like(rew)
        for e in cache.episodes:  # achieved so far in the episode, frame by frame
            o, n = e["offset"], e["length"]
            done[o:o + n] = np.logical_or.accumulate(rew[o:o + n], axis=0)
        self.prompt = np.where(done.all(1), rew.shape[1] - 1, done.argmin(1))  # (ΣT,) first task not yet done
        eps = [e for e in cache.episodes if e["length"] >= context]
        assert eps, f"no episode of at least {context} frames"
        self.ends = np.concatenate([np.arange(e["offset"] + context - 1, e["offset"] + e["length"]) for e in eps])
        self.events = {}  # task -> [(lowest, highest) context end]
        for e in eps:
            o, n = e["offset"], e["length"]
            for t, k in zip(*np.nonzero(rew[o:o + n])):
                lo, hi = max(o + context - 1, o + t - horizon), o + t - 1
                if lo <= hi:
                    self.events.setdefault(int(k), []).append((lo, hi))
        self.rng = np.random.default_rng(seed)

    def sample(self, n_uniform: int, n_relevant: int) -> dict:
        """Uniform rows first. CPU tensors: latents (B, T, N_b, D_b), actions (B, T, A), task (B,),
        relevant (B,) bool, end (B,) global index of each context's last frame."""
        if n_relevant and not self.events:
            raise ValueError("no reward events in this split: no relevant contexts to sample")
        ends = list(self.rng.choice(self.ends, size=n_uniform))
        tasks = [int(self.prompt[e]) for e in ends]
        kinds = sorted(self.events)
        for _ in range(n_relevant):
            k = kinds[self.rng.integers(len(kinds))]
            lo, hi = self.events[k][self.rng.integers(len(self.events[k]))]
            ends.append(int(self.rng.integers(lo, hi + 1)))
            tasks.append(k)
        idx = np.asarray(ends)[:, None] + np.arange(1 - self.T, 1)  # (B, T) global frame indices
        return {"latents": torch.from_numpy(np.asarray(self.latents[idx], dtype=np.float32)),
                "actions": torch.from_numpy(np.asarray(self.actions[idx], dtype=np.int64)),
                "task": torch.tensor(tasks, dtype=torch.int64), "relevant": torch.arange(len(ends)) >= n_uniform,
                "end": torch.tensor(ends, dtype=torch.int64)}


# ==============================================================================================
# Imagination: unroll the frozen world model on its own outputs (§3.3)
# ==============================================================================================


def observe_context(model: ag.AgentModel, cache: common.KVCache, clean: torch.Tensor, actions: torch.Tensor,
                    task: torch.Tensor, ctx_tau: float, gen: torch.Generator | None = None) -> torch.Tensor:
    """Write a context into the KV cache in one pass, every frame at τ_ctx (as agent.observe does frame by
    frame). clean (B, T, N_z, C_z) packed latents; actions (B, T, A) in dataset convention (a_t taken at
    frame t; the last one is not used). Returns h of the last context frame (B, D): the rollout's h_0."""
    B, T = actions.shape[:2]
    dev = clean.device
    tau_c, d_min = context_signal_level(ctx_tau, model.k_max), 1.0 / model.k_max
    z_ctx = corrupt(torch.randn(clean.shape, generator=gen, device=dev), clean, tau_c)  # Eq 6 at τ_ctx
    _, h = model(z_ctx, torch.full((B, T), tau_c, device=dev), torch.full((B, T), d_min, device=dev),
                 *shift_actions(actions), task, cache=cache, commit=True)  # h (B, T, D)
    return h[:, -1]  # (B, D)


@torch.no_grad()
def imagine_rollout(model: ag.AgentModel, clean: torch.Tensor, actions: torch.Tensor, task: torch.Tensor,
                    horizon: int, k: int, ctx_tau: float, gen: torch.Generator | None = None, act=None,
                    keep_latents: bool = False) -> dict:
    """One imagined rollout per context (§3.3): a_t ~ π(· | h_t), z_{t+1} from K shortcut steps given a_t
    (agent.step_world_model, KV cache), r_{t+1} from the reward head at h_{t+1}.

    clean (B, T_c, N_z, C_z), actions (B, T_c, A): the dataset context; task (B,) prompts.
    act(h_t (B, D), t) → per-component logits of the acting policy (default: the model's policy head).
    Returns h (B, H+1, D) and rewards (B, H+1) (r_0 = 0: entering the context's last frame is not part of
    the rollout), actions (B, H, A), and with keep_latents the generated z_1 … z_H (B, H, N_z, C_z).
    """
    act = act or (lambda h, t: model.policy(h, offset=0))
    cache = common.KVCache(model.window)
    h = observe_context(model, cache, clean, actions, task, ctx_tau, gen)  # h_0 (B, D)
    hs, acts, zs = [h], [], []
    for t in range(horizon):
        a = ag.sample_action(act(h, t), gen)  # a_t (B, A), taken at state t
        z, h = ag.step_world_model(model, cache, a, task, k, ctx_tau, gen)  # z_{t+1}, h_{t+1}
        hs.append(h), acts.append(a)
        if keep_latents:
            zs.append(z)
    h = torch.stack(hs, 1).float()  # (B, H+1, D)
    rewards = model.reward(h, 0)  # (B, H+1) r̂_t of the prompted task, the reward of entering state t
    rewards[:, 0] = 0  # r_0 belongs to the transition into the context's last frame: not the rollout's
    return {"h": h, "rewards": rewards, "actions": torch.stack(acts, 1),  # actions (B, H, A)
            "latents": torch.stack(zs, 1) if keep_latents else None}


def imagination_loss(model: ag.AgentModel, value_head: ag.MTPHead, prior: ag.MTPHead, roll: dict,
                     a: Args, r_bar: float = 0.0) -> dict:
    """Eqs 10–11 on a batch of rollouts: the value head's twohot NLL against sg(R^λ), and PMPO for the policy.

    r_bar: subtracted from every reward before Eq 10 (reward centering, see RewardCenter; 0 = off).
    Only the two heads get gradients: h_t comes from the frozen transformer (no graph), the rewards from
    the frozen reward head, and the returns and advantages are targets.
    """
    h, bins = roll["h"], model.bins  # h (B, H+1, D)
    B, H = roll["actions"].shape[:2]
    with torch.no_grad():
        v = value_of(value_head, h, bins)  # (B, H+1) v_t
        cont = torch.ones_like(v)  # c_t = 1: no terminal states (module docstring)
        ret = lambda_returns(roll["rewards"] - r_bar, v, cont, a.gamma, a.lam)  # (B, H) R^λ_t   (Eq 10)
        adv = ret - v[:, :H]  # A_t = R^λ_t − v_t  (Eq 11)
        prior_logits = ag.split_policy_logits(prior(h[:, :H], 0).float(), model.action_classes)
    pol_logits = model.policy(h[:, :H], offset=0)  # A × (B, H, n_c)
    pm = pmpo_loss(pol_logits, prior_logits, roll["actions"], adv, a.alpha, a.beta)  # Eq 11
    value_nll = ag.twohot_nll(value_head(h[:, :H], 0), ret, bins).mean()  # Eq 10: −ln p(sg(R^λ_t) | s_t)
    return {"loss": pm["loss"] + value_nll, "pmpo": pm["loss"].detach(), "value": value_nll.detach(),
            "kl": pm["kl"], "frac_pos": pm["frac_pos"], "pos_logp": pm["pos_logp"], "neg_logp": pm["neg_logp"],
            "return": ret.mean(), "v": v.mean(), "reward_sum": roll["rewards"].sum(1).mean(),
            "value_ev": 1 - (ret - v[:, :H]).var() / ret.var().clamp_min(1e-8),  # explained variance of R^λ by v
            "imag_success": (roll["rewards"].max(1).values > 0.5).float().mean()}


class RewardCenter:
    """Reward centering (Naik et al. 2024, not in the paper): r̄ ← 0.99·r̄ + 0.01·mean(r̂) (the first batch sets
    it), and Eq 10 uses r̂_t − r̄. The imagined episodes never end (c = 1) and all have H steps, so subtracting a
    constant from every reward changes no action's advantage once v is right: the optimal policy is the same.
    What it changes is how soon v is right. The reward head predicts an expectation, a small positive r̂ on
    every frame (≈ 0.02–0.05 at our scale); with γ = 0.997 that alone is worth Σ γ^t r̂ ≈ 10 nats of value,
    which the value head, starting at 0, reaches only by bootstrapping, about a factor γ per refit. Until then
    R^λ > v nearly everywhere, D⁻ stays empty and PMPO only sharpens the policy (measured: 99 % of the states
    in D⁺ over a 150-step CPU run without centering)."""

    def __init__(self, decay: float = 0.99):
        self.decay, self.value, self.count = decay, 0.0, 0

    def update(self, rewards: torch.Tensor) -> float:
        m = float(rewards.mean())
        self.value = m if self.count == 0 else self.decay * self.value + (1 - self.decay) * m
        self.count += 1
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "count": self.count, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.count, self.decay = float(state["value"]), int(state["count"]), float(state["decay"])


# ==============================================================================================
# Evaluation: real-environment success, imagined vs real from the same states, pictures, the table
# ==============================================================================================


class swap_policy:
    """`with swap_policy(model, head):` the model acts with another policy head (e.g. π_prior) inside."""

    def __init__(self, model: ag.AgentModel, head: ag.MTPHead):
        self.model, self.head = model, head

    def __enter__(self):
        self.kept, self.model.policy_head = self.model.policy_head, self.head

    def __exit__(self, *exc):
        self.model.policy_head = self.kept


def evaluate_success(model: ag.AgentModel, tok, device, ctx_tau: float, episodes: int, seed: int,
                     meta: dict, reprompt: bool = True) -> dict:
    """Real-environment success per task of the model's policy (data.evaluate: held-out world seeds)."""
    policy = ag.AgentPolicy(model, tok, device, ctx_tau, seed, reprompt)
    return data.evaluate(policy, episodes, seed, meta["image_size"], meta.get("episode_len", 256))["success"]


def probe_states(held: LatentCache, n_per_task: int, context: int, horizon: int, seed: int) -> list[dict]:
    """Held-out start states for imagined-vs-real: per task up to n of them, each 1 … H/2 steps before one of
    that task's reward events in a held-out episode (so the recorded contractor succeeded within H/2)."""
    rng, rew, out = np.random.default_rng([seed, 7]), np.asarray(held.rewards) > 0, []
    for k in range(rew.shape[1]):
        events = [(e, t) for e in held.episodes for t in np.nonzero(rew[e["offset"]:e["offset"] + e["length"], k])[0]
                  if t - 1 >= context - 1]
        for i in range(min(n_per_task, 4 * len(events))):  # with replacement over a few events, new j each time
            e, t = events[rng.integers(len(events))]
            t0 = int(max(context - 1, t - rng.integers(1, max(2, horizon // 2 + 1))))
            out.append({"id": e["id"], "t0": t0, "task": k})
    return out


def replay_starts(starts: list[dict], meta: dict, context: int, horizon: int) -> dict:
    """Replay each start's held-out episode in the real environment up to its frame t0 (same world seed, the
    recorded actions: the same frames, data.Env is deterministic). Returns the envs, the context frames
    (B, T_c, H, W, 3) uint8 and actions (B, T_c, A), and the contractor's next `horizon` recorded actions
    (B, H, A), no-ops past the episode's end."""
    root, envs, frames, actions, future = meta["_root"], [], [], [], []
    for s in starts:
        ep = np.load(os.path.join(root, s["id"] + ".npz"))
        env = data.Env(meta["image_size"], episode_len=10 ** 9)  # the probe may run past the recorded episode's end
        f = [env.reset(data.episode_seed(meta["seed"], "data", int(s["id"][2:])))]
        for t in range(s["t0"]):
            f.append(env.step(ep["actions"][t])[0])
        assert np.array_equal(f[-1], ep["frames"][s["t0"]]), f"replay of {s['id']} diverged from the dataset"
        envs.append(env)
        frames.append(np.stack(f[-context:]))
        actions.append(ep["actions"][s["t0"] - context + 1:s["t0"] + 1])
        nxt = ep["actions"][s["t0"]:s["t0"] + horizon]
        future.append(np.concatenate([nxt, np.zeros((horizon - len(nxt), nxt.shape[1]), nxt.dtype)]))
    return {"envs": envs, "frames": np.stack(frames), "actions": np.stack(actions), "future": np.stack(future)}


@torch.no_grad()
def imagined_vs_real(model: ag.AgentModel, value_head, tok, starts: list[dict], meta: dict, a: Args, ctx_tau: float,
                     device, act, keep: bool = False) -> dict:
    """From the same held-out states, roll the same policy out H steps in imagination and in the real
    environment. Per start: imagined success (r̂ > 0.5 for the prompted task at some step), real success
    (the task's reward arrives), the imagined return Σ r̂, and with keep the traces for rollout.png.
    act(h, t) as in imagine_rollout, or "replay": the contractor's recorded actions, open loop (its real
    success is 1 by construction, so its imagined success is the world model's recall of reward events)."""
    rep = replay_starts(starts, meta, a.context, a.horizon)
    if act == "replay":
        act = scripted_policy(torch.from_numpy(rep["future"]).to(device), model.action_classes)
    B, task = len(starts), torch.tensor([s["task"] for s in starts], device=device)
    x = torch.from_numpy(rep["frames"]).to(device)  # (B, T_c, H, W, 3) uint8
    acts = torch.from_numpy(rep["actions"]).to(device)  # (B, T_c, A)
    tok_cache = common.KVCache(tok.encoder.window)
    with common.autocast(device):
        clean = pack(tok.encode(x, cache=tok_cache)).float()  # (B, T_c, N_z, C_z)
    gen = torch.Generator(device).manual_seed(a.seed + 11)
    with common.autocast(device):
        im = imagine_rollout(model, clean, acts, task, a.horizon, a.sample_k, ctx_tau, gen, act, keep_latents=keep)
        # The real environment, step by step: encode the new frame, write it into the cache, read h_t.
        cache = common.KVCache(model.window)
        h = observe_context(model, cache, clean, acts, task, ctx_tau, gen)  # h_0 (B, D)
        hs, true_r, frames = [h], [np.zeros(B)], [rep["frames"][:, -1]]
        for t in range(a.horizon):
            act_t = ag.sample_action(act(h, t), gen)  # a_t (B, A)
            steps = [env.step(act_t[i].cpu().numpy()) for i, env in enumerate(rep["envs"])]
            frame = np.stack([s[0] for s in steps])  # (B, H, W, 3)
            true_r.append(np.array([s[1][starts[i]["task"]] for i, s in enumerate(steps)]))
            z = pack(tok.encode(torch.from_numpy(frame).to(device)[:, None], cache=tok_cache)).float()[:, 0]
            h = ag.observe(model, cache, z, act_t, task, ctx_tau, gen)  # h_{t+1}
            hs.append(h), frames.append(frame)
    h_real = torch.stack(hs, 1).float()  # (B, H+1, D)
    r_real = model.reward(h_real, 0)
    r_real[:, 0] = 0
    true_r = np.stack(true_r, 1)  # (B, H+1)
    out = {"imag_success": (im["rewards"].max(1).values > 0.5).cpu().numpy(), "real_success": true_r.max(1) > 0,
           "imag_return": im["rewards"].sum(1).cpu().numpy(), "real_return": true_r.sum(1),
           "real_pred_success": (r_real.max(1).values > 0.5).cpu().numpy(), "task": task.cpu().numpy(),
           "r_real": r_real[:, 1:].cpu().numpy(), "true_r": true_r[:, 1:]}  # (B, H) r̂_t and r_t, t = 1 … H
    if keep:
        v = lambda h: value_of(value_head, h, model.bins).cpu().numpy()  # noqa: E731
        out["trace"] = {"imag_reward": im["rewards"].cpu().numpy(), "imag_value": v(im["h"]),
                        "real_reward_pred": r_real.cpu().numpy(), "real_value": v(h_real), "real_reward": true_r,
                        "real_frames": np.stack(frames, 1)}
        with common.autocast(device):  # decode context + imagined latents in one causal pass
            z_all = torch.cat([clean, im["latents"].float()], 1)  # (B, T_c + H, N_z, C_z)
            out["trace"]["imag_frames"] = (tok.decode(unpack(z_all)).float().clamp(0, 1)[:, a.context - 1:] * 255
                                           ).byte().cpu().numpy()  # (B, H+1, H, W, 3) from the context's last frame
    return out


def scripted_policy(actions: torch.Tensor, action_classes: list[int]):
    """An `act` that plays fixed actions (B, H, A): logits 10⁴ on the scripted class of every component."""
    return lambda h, t: [torch.nn.functional.one_hot(actions[:, t, c], n).float() * 1e4
                         for c, n in enumerate(action_classes)]


def probe_summary(res: dict, n_tasks: int) -> dict:
    """Per task: imagined and real success rates within H, and the number of start states."""
    out = {}
    for k in range(n_tasks):
        m = res["task"] == k
        if m.any():
            name = data.TASKS[k] if k < len(data.TASKS) else str(k)
            out[name] = {"n": int(m.sum()), "imagined": float(res["imag_success"][m].mean()),
                         "real": float(res["real_success"][m].mean()),
                         "reward_head_on_real": float(res["real_pred_success"][m].mean()),
                         "imagined_return": float(res["imag_return"][m].mean())}
    return out


def reward_head_quality(r_hat: np.ndarray, r: np.ndarray) -> dict:
    """How well the reward head separates true reward events from other steps (r_hat, r: matching arrays):
    AUC (probability that an event step gets a higher r̂ than a non-event step) and the mean r̂ of each."""
    pos, neg = r_hat[r > 0], r_hat[r <= 0]
    if not len(pos) or not len(neg):
        return {}
    auc = float((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean())
    return {"auc": auc, "mean_at_events": float(pos.mean()), "mean_elsewhere": float(neg.mean()),
            "events": int(len(pos))}


def rank_agreement(probes: dict) -> dict:
    """Does the world model rank policies as the real environment does? Over every task and every pair of
    policies whose real success differs: the share of pairs that the imagined return Σ r̂ orders the same way."""
    agree = total = 0
    names = list(probes)
    for k in set.intersection(*(set(p) for p in probes.values())):
        for i, p in enumerate(names):
            for q in names[i + 1:]:
                real = probes[p][k]["real"] - probes[q][k]["real"]
                if real != 0:
                    total += 1
                    agree += (probes[p][k]["imagined_return"] - probes[q][k]["imagined_return"]) * real > 0
    return {"agree": int(agree), "pairs": total, "share": agree / max(total, 1)}


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_curve(curve: list[dict], out: str) -> None:
    """success_curve.png: real-environment success per task over training steps (step 0: the WM+BC policy)."""
    if not curve:
        return
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    steps = [c["step"] for c in curve]
    for i, k in enumerate(curve[0]["success"]):
        ax.plot(steps, [100 * c["success"][k]["rate"] for c in curve], "o-", color=f"C{i}", ms=3, label=k)
    ax.set_xlabel("imagination training step"), ax.set_ylabel("success (% of episodes)"), ax.set_ylim(-2, 102)
    ax.legend(fontsize=6, ncol=2), ax.set_title(f"real-environment success during imagination training "
                                                f"({curve[0]['episodes']} episodes per point)", fontsize=9)
    fig.tight_layout(), fig.savefig(os.path.join(out, "success_curve.png"), dpi=100), plt.close(fig)


def save_probe_picture(probes: dict, out: str, horizon: int) -> None:
    """imagined_vs_real.png: per task, imagined vs real success within H from the same held-out states."""
    plt = _plt()
    names = list(probes)
    tasks = sorted({k for p in probes.values() for k in p}, key=lambda k: data.TASKS.index(k) if k in data.TASKS else 0)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [2, 1]})
    w = 0.8 / len(names)
    for i, name in enumerate(names):
        x = np.arange(len(tasks)) + (i - (len(names) - 1) / 2) * w
        real = [100 * probes[name].get(k, {}).get("real", np.nan) for k in tasks]
        imag = [100 * probes[name].get(k, {}).get("imagined", np.nan) for k in tasks]
        axes[0].bar(x, real, w, color=f"C{i}", label=f"{name}: real")
        axes[0].plot(x, imag, "k_", ms=10, mew=2)
        axes[1].scatter(real, imag, color=f"C{i}", label=name, s=18)
    axes[0].plot([], [], "k_", ms=10, mew=2, label="imagined (same states, same policy)")
    axes[0].set_xticks(range(len(tasks)), [k.replace("_", "\n") for k in tasks], fontsize=7)
    axes[0].set_ylabel(f"success within H = {horizon} steps (%)"), axes[0].set_ylim(0, 105), axes[0].legend(fontsize=6)
    axes[1].plot([0, 100], [0, 100], "k:", lw=0.8)
    axes[1].set_xlabel("real success (%)"), axes[1].set_ylabel("imagined success (%)"), axes[1].legend(fontsize=6)
    fig.suptitle("does the world model rank policies correctly? held-out start states shortly before a reward event",
                 fontsize=9)
    fig.tight_layout(), fig.savefig(os.path.join(out, "imagined_vs_real.png"), dpi=100), plt.close(fig)


def save_rollout_picture(trace: dict, i: int, task: str, out: str) -> None:
    """rollout.png: one imagined rollout (decoded) with its reward and value traces, beside the real-environment
    rollout of the same policy from the same state."""
    plt = _plt()
    H = trace["imag_reward"].shape[1] - 1
    shown = np.unique(np.linspace(0, H, 9).round().astype(int))
    fig = plt.figure(figsize=(12, 5.6))
    for r, (key, label, color) in enumerate((("imag_frames", "imagined", "C3"), ("real_frames", "real", "C2"))):
        for j, t in enumerate(shown):
            ax = fig.add_subplot(4, len(shown), r * len(shown) + j + 1)
            ax.imshow(trace[key][i, t], interpolation="nearest"), ax.set_xticks([]), ax.set_yticks([])
            for s in ax.spines.values():
                s.set_color(color), s.set_linewidth(2)
            ax.set_title(f"{label} t={t}", fontsize=6)
    ax = fig.add_subplot(2, 1, 2)
    ax.plot(trace["imag_reward"][i], "C3-", lw=1.2, label="imagined: reward head r̂_t")
    ax.plot(trace["real_reward_pred"][i], "C2-", lw=1.2, label="real: reward head r̂_t")
    hit = np.nonzero(trace["real_reward"][i] > 0)[0]
    ax.plot(hit, np.ones(len(hit)), "kv", ms=7, label="real: true reward event")
    ax.set_xlabel("imagined / real step t (0 = last context frame)"), ax.set_ylabel("reward"), ax.set_ylim(-0.1, 1.3)
    ax2 = ax.twinx()  # the value lives on its own scale (a discounted sum, of centred rewards by default)
    ax2.plot(trace["imag_value"][i], "C3--", lw=1, label="imagined: value v_t (right axis)")
    ax2.plot(trace["real_value"][i], "C2--", lw=1, label="real: value v_t (right axis)")
    ax2.set_ylabel("value")
    lines = ax.get_legend_handles_labels(), ax2.get_legend_handles_labels()
    ax.legend(lines[0][0] + lines[1][0], lines[0][1] + lines[1][1], fontsize=6, ncol=3, loc="upper left")
    fig.suptitle(f"the same policy from the same held-out state, prompted '{task}': imagined (red) vs real (green)",
                 fontsize=9)
    fig.tight_layout(), fig.savefig(os.path.join(out, "rollout.png"), dpi=100), plt.close(fig)


def make_table(runs: list[str], out: str) -> dict:
    """The README table: success per task, mean ± std (ddof = 1) over the training seeds of `runs`."""
    summaries = [json.load(open(os.path.join(r, "summary.json"))) for r in runs]
    names = [n for n in POLICY_ORDER if all(n in s.get("success", {}) for s in summaries)]
    tasks = list(summaries[0]["success"][names[0]])
    table = {n: {k: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "values": v}
                 for k in tasks for v in [[100 * s["success"][n][k]["rate"] for s in summaries]]} for n in names}
    eps = sorted({s["eval_episodes"] for s in summaries})
    lines = [f"Real-environment success (% of episodes), mean ± std over {len(runs)} training seeds, "
             f"{'/'.join(map(str, eps))} held-out worlds per seed and policy.", "",
             "| task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for k in tasks:
        cells = [f"{table[n][k]['mean']:.1f} ± {table[n][k]['std']:.1f}" for n in names]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, "table.md"), "w").write("\n".join(lines) + "\n")
    common.write_json(os.path.join(out, "table.json"), {"runs": runs, "table": table})
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 3.6))
    w = 0.8 / len(names)
    for i, n in enumerate(names):
        ax.bar(np.arange(len(tasks)) + (i - (len(names) - 1) / 2) * w, [table[n][k]["mean"] for k in tasks], w,
               yerr=[table[n][k]["std"] for k in tasks], capsize=2, label=n)
    ax.set_xticks(range(len(tasks)), [k.replace("_", "\n") for k in tasks], fontsize=7)
    ax.set_ylabel("success (% of episodes)"), ax.set_ylim(0, 105), ax.legend(fontsize=7)
    ax.set_title(f"real-environment success per task, mean ± std over {len(runs)} training seeds", fontsize=9)
    fig.tight_layout(), fig.savefig(os.path.join(out, "table.png"), dpi=100), plt.close(fig)
    print("\n".join(lines))
    return table


# ==============================================================================================
# Training
# ==============================================================================================


def load_imagine(path: str = "runs/imagine/ckpt.pt", device="cpu"):
    """The imagination-trained agent: (model with the trained policy head, value head, checkpoint dict)."""
    ckpt = common.load_checkpoint(path, "imagine", "python imagine.py")
    model = ag.build_agent(ckpt["agent_args"], ckpt["dynamics_args"], ckpt["shapes"])
    model.load_state_dict(ckpt["model"])
    value = ag.MTPHead(model.agent_base.shape[0], ckpt["value_hidden"], model.bins.shape[0], 1)
    value.load_state_dict(ckpt["value"])
    return model.to(device), value.to(device), ckpt


def train(a: Args) -> dict:
    if a.table:
        return make_table([r for r in a.table.split(",") if r], a.out)
    common.seed_everything(a.seed)
    device = common.pick_device(a.device)
    os.makedirs(a.out, exist_ok=True)
    ckpt_path = os.path.join(a.out, "ckpt.pt")

    # Parents: the agent of stage 2, its tokenizer and the tokenizer's latent cache (DESIGN.md §2).
    model, agent_ckpt = ag.load_agent(a.agent, device)
    model.eval()
    tok_path = agent_ckpt["tokenizer"]
    tok, _ = load_tokenizer(tok_path, device)
    tok_dir = os.path.dirname(os.path.abspath(tok_path))
    train_cache, held = LatentCache(tok_dir, "train", seed=a.seed), LatentCache(tok_dir, "heldout", seed=a.seed + 1)
    meta = dict(train_cache.meta, _root=train_cache.data_root)
    if list(meta["tasks"]) != list(agent_ckpt["shapes"]["tasks"]):
        raise ValueError(f"{a.agent} was trained on tasks {agent_ckpt['shapes']['tasks']}, the latent cache at "
                         f"{tok_dir} has {meta['tasks']}: retrain it with `python agent.py`")
    ctx_tau = agent_ckpt["args"]["ctx_tau"]  # the heads read h_t at the signal level they were trained on
    value_head, prior = build_heads(model, a.value_hidden)
    sampler = ContextSampler(train_cache, a.context, a.horizon, a.seed)
    n_rel = int(round(a.batch * a.relevant_frac))
    n_uni = a.batch - n_rel
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    print(f"imagine: from {a.agent} (step {agent_ckpt['step']}); training {count(model.policy_head):,} policy + "
          f"{count(value_head):,} value parameters, the other {count(model) - count(model.policy_head):,} frozen; "
          f"{a.batch} rollouts × H = {a.horizon} per step, K = {a.sample_k}, contexts of {a.context} frames "
          f"({len(sampler.ends):,} contexts, {sum(len(v) for v in sampler.events.values())} reward events)")
    opt = torch.optim.AdamW([{"params": list(model.policy_head.parameters()), "peak": a.lr},
                             {"params": list(value_head.parameters()), "peak": a.value_lr}],
                            lr=a.lr, weight_decay=0.0, betas=(0.9, 0.99))
    step, curve, center = 0, [], RewardCenter()
    if a.resume:
        ckpt = common.load_checkpoint(ckpt_path, "imagine", f"python imagine.py --out {a.out}")
        model.load_state_dict(ckpt["model"])
        value_head.load_state_dict(ckpt["value"])
        prior.load_state_dict(ckpt["prior"])
        opt.load_state_dict(ckpt["optimizer"])
        step, curve = ckpt["step"], ckpt["curve"]
        center.load_state_dict(ckpt["normalizers"]["reward_center"])
        print(f"resumed from {ckpt_path} at step {step}")
    common.write_json(os.path.join(a.out, "args.json"), asdict(a))
    print("args:", json.dumps(asdict(a)))
    log = common.MetricsLog(a.out, a.steps, resume=a.resume, start_step=step)
    builtin = meta.get("generator") == "minidreamer4 data.py" and list(meta["tasks"]) == data.TASKS

    def save(step):
        common.save_checkpoint(ckpt_path, {
            "format_version": FORMAT_VERSION, "stage": "imagine", "step": step, "model": model.state_dict(),
            "value": value_head.state_dict(), "prior": prior.state_dict(), "optimizer": opt.state_dict(),
            "normalizers": {"reward_center": center.state_dict()}, "curve": curve, "args": asdict(a),
            "value_hidden": value_head.trunk[0].out_features, "agent_args": agent_ckpt["args"],
            "dynamics_args": agent_ckpt["dynamics_args"],
            "shapes": agent_ckpt["shapes"], "tokenizer": tok_path,
            "parent": {"stage": "agent", "path": os.path.abspath(a.agent), "step": agent_ckpt["step"]}})

    def curve_point(step):  # real-environment success of the current policy (success over training steps)
        if a.eval_every > 0 and a.curve_episodes > 0 and builtin and (step % a.eval_every == 0 or step == a.steps):
            if not curve or curve[-1]["step"] != step:
                curve.append({"step": step, "episodes": a.curve_episodes, "success": evaluate_success(
                    model, tok, device, ctx_tau, a.curve_episodes, a.seed, meta, a.reprompt)})
                rates = " ".join(f"{k} {100 * v['rate']:.0f}" for k, v in curve[-1]["success"].items())
                print(f"  real-environment success (%) at step {step}: {rates}")

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    gen = torch.Generator(device)
    curve_point(step)
    t_start, steps_run, t_eval = time.time(), 0, 0.0
    while step < a.steps:
        # Per-step streams seeded from (seed, step): --resume sees exactly the contexts, noise and action
        # samples of an uninterrupted run.
        sampler.rng = np.random.default_rng([a.seed, step])
        gen.manual_seed(a.seed * 1_000_003 + step)
        b = sampler.sample(n_uni, n_rel)
        for g in opt.param_groups:
            g["lr"] = common.lr_at(step, g["peak"], a.warmup, a.steps)
        with common.autocast(device):
            roll = imagine_rollout(model, pack(b["latents"].to(device)), b["actions"].to(device), b["task"].to(device),
                                   a.horizon, a.sample_k, ctx_tau, gen)
        r_bar = center.update(roll["rewards"][:, 1:]) if a.center_rewards else 0.0  # r_0 is not the rollout's
        terms = imagination_loss(model, value_head, prior, roll, a, r_bar)
        common.check_finite(step, pmpo=terms["pmpo"], value=terms["value"])
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        gnorm = torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], a.grad_clip)
        opt.step()
        step, steps_run = step + 1, steps_run + 1
        if step % a.log_every == 0 or step == a.steps:
            log.log(step, {k: v for k, v in terms.items() if k != "loss"} | {"r_bar": r_bar, "grad_norm": gnorm,
                    "lr": common.lr_at(step - 1, a.lr, a.warmup, a.steps)}, a.batch * a.horizon)
        if steps_run == 3 and device.type == "cpu" and a.preset == "default":
            eta = (time.time() - t_start) / 3 * (a.steps - step) / 60
            print(f"!! the default preset is sized for a GPU: on this CPU it would take about {eta:.0f} min. "
                  f"Try --preset cpu.")
        t0 = time.time()
        curve_point(step)
        t_eval += time.time() - t0
        if step % a.ckpt_every == 0 or step == a.steps or step == a.stop_at:
            save(step)
        if a.stop_at and step >= a.stop_at:
            print(f"stopping at step {step} (--stop-at); continue with --resume")
            return {}
    wall = time.time() - t_start - t_eval

    # Final evaluation, pictures, summary.json (DESIGN.md §7).
    summary = {
        "stage": "imagine", "preset": a.preset, "device": str(device),
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "steps": step, "steps_this_run": steps_run, "wall_s": wall, "steps_per_s": steps_run / max(wall, 1e-9),
        "frames_per_s": steps_run * a.batch * a.horizon / max(wall, 1e-9), "peak_mem_gb": common.peak_memory_gb(device),
        "policy": "Dreamer 4", "horizon": a.horizon, "sample_k": a.sample_k, "gamma": a.gamma, "lam": a.lam,
        "alpha": a.alpha, "beta": a.beta, "eval_episodes": a.eval_episodes, "curve": curve,
        "ctx_tau_used": context_signal_level(ctx_tau, model.k_max), "parent": os.path.abspath(a.agent),
        "reprompt": a.reprompt,
    }
    model.eval()
    t0 = time.time()
    if a.eval_episodes > 0 and builtin:
        success = {"Dreamer 4": evaluate_success(model, tok, device, ctx_tau, a.eval_episodes, a.seed, meta, a.reprompt)}
        with swap_policy(model, prior):  # WM+BC: the stage-2 policy, on the same worlds
            success["WM+BC"] = evaluate_success(model, tok, device, ctx_tau, a.eval_episodes, a.seed, meta, a.reprompt)
        size, ep_len = meta["image_size"], meta.get("episode_len", 256)
        for label, player in (("random", data.RandomPolicy(a.seed)), ("contractors", data.ContractorPolicy(a.seed))):
            success[label] = data.evaluate(player, a.eval_episodes, a.seed, size, ep_len)["success"]
        if a.compare and os.path.exists(a.compare):
            theirs = json.load(open(a.compare))
            if theirs.get("eval_episodes") != a.eval_episodes:
                print(f"note: {a.compare} used {theirs.get('eval_episodes')} evaluation worlds, "
                      f"this run {a.eval_episodes}")
            success[theirs["policy"]] = theirs["success"][theirs["policy"]]
            summary["compared_with"] = a.compare
        summary["success"] = dict(sorted(success.items(), key=lambda kv: POLICY_ORDER.index(kv[0])))
        ag.save_pictures(summary["success"], None, a.out, f"real-environment success per task, {a.eval_episodes} "
                         f"evaluation worlds (± standard error)")
        for k in data.TASKS:
            print(f"  {k:<20s}" + " | ".join(f"{n} {100 * s[k]['rate']:5.1f} ± {100 * s[k]['stderr']:.1f}"
                                            for n, s in summary["success"].items()))
    elif a.eval_episodes > 0:
        print("note: the dataset is not the built-in environment's: no real-environment evaluation")
    save_curve(curve, a.out)
    starts = probe_states(held, a.probe_starts, a.context, a.horizon, a.seed) if a.probe_starts > 0 and builtin else []
    if starts:
        policies = {"contractor replay": "replay",
                    "random": lambda h, t: [torch.zeros(*h.shape[:-1], n, device=h.device)
                                            for n in model.action_classes],
                    "WM+BC": lambda h, t: ag.split_policy_logits(prior(h, 0).float(), model.action_classes),
                    "Dreamer 4": lambda h, t: model.policy(h, offset=0)}
        probes, keep = {}, None
        for name, act in policies.items():
            res = imagined_vs_real(model, value_head, tok, starts, meta, a, ctx_tau, device, act,
                                   keep=name == "Dreamer 4")
            probes[name] = probe_summary(res, len(meta["tasks"]))
            if name == "contractor replay":  # real frames with guaranteed events: the reward head alone
                summary["reward_head_on_real_replay"] = reward_head_quality(res["r_real"], res["true_r"])
            keep = res if name == "Dreamer 4" else keep
        summary["imagined_vs_real"], summary["rank_agreement"] = probes, rank_agreement(probes)
        save_probe_picture(probes, a.out, a.horizon)
        # The picture's rollout: the hardest task whose real rollout succeeded, else the hardest task probed.
        order = np.argsort(-keep["task"] - 100 * keep["real_success"], kind="stable")
        i = int(order[0])
        save_rollout_picture(keep["trace"], i, meta["tasks"][int(keep["task"][i])], a.out)
        for name, p in probes.items():
            print(f"  imagined/real success within H (%), {name}: " + " ".join(
                f"{k} {100 * v['imagined']:.0f}/{100 * v['real']:.0f}" for k, v in p.items()))
        r, q = summary["rank_agreement"], summary.get("reward_head_on_real_replay", {})
        print(f"  the imagined return orders {r['agree']} of {r['pairs']} policy pairs as the real environment does")
        if q:
            print(f"  reward head on the real replayed contractor frames: AUC {q['auc']:.3f}, mean r̂ "
                  f"{q['mean_at_events']:.3f} at {q['events']} true events vs {q['mean_elsewhere']:.3f} elsewhere")
    summary["eval_s"] = time.time() - t0
    common.write_json(os.path.join(a.out, "summary.json"), summary)
    print("summary:", json.dumps(summary))
    return summary


def main():
    train(common.parse_args(Args, PRESETS))


if __name__ == "__main__":
    main()
