"""Stage 3 — imagination training: a TD(λ) value head and PMPO in the world model (§3.3, Eqs 10–11).

The agent of stage 2 (agent.py) can already act: its policy head was cloned from the contractors.
Here it practises inside its own world model. Contexts are cut from the dataset; from each one the
frozen transformer is unrolled on its own outputs — the policy picks a_t, the K = 4 shortcut
sampler generates the next frame, the reward head says how much it paid — and a new value head
learns the λ-return of those imagined trajectories (Eq 10). The policy head is improved with PMPO
(Eq 11): raise the probability of actions whose return beat the value, lower the others, and stay
near the behaviour-cloned policy (a frozen copy, π_prior) through a reverse KL. Only the policy
and value heads learn; the transformer, the reward head and the tokenizer stay frozen (§3.3).
Rollouts are indexed by state (lambda_returns says how; docs/conventions.md).

Reads:  runs/agent/ckpt.pt (`python agent.py`), its tokenizer and the tokenizer's latent cache;
        the dataset folder (held-out episodes, replayed in the real environment by imagine_eval.py).
Writes: runs/imagine/  ckpt.pt, args.json, metrics.jsonl, summary.json, and the pictures of
        imagine_eval.py: success.png, success_curve.png, imagined_vs_real.png, rollout.png.

Run:
    python imagine.py                  # default preset: one GPU, after agent.py
    python imagine.py --preset cpu     # 2 CPU cores, after agent.py --preset cpu (+ --from-scratch)
    python imagine.py --preset smoke   # seconds; used by the tests
    python imagine_eval.py runs/cpu/imagine        # re-evaluate a finished run (summary, pictures)
    python imagine_eval.py --table runs/cpu/imagine,runs/cpu/imagine_s1,runs/cpu/imagine_s2 \\
        --out runs/cpu/imagine_table               # mean ± std over training seeds

Equation map:
    Eq 10  lambda_returns    R^λ_t = r_{t+1} + γ c_{t+1}((1 − λ) v_{t+1} + λ R^λ_{t+1}), R^λ_H = v_H
    Eq 10  imagination_loss  −Σ_t ln p_θ(sg(R^λ_t) | s_t): symexp twohot NLL of the value head
    Eq 11  pmpo_loss         (1 − α)/|D⁻| Σ_{D⁻} ln π − α/|D⁺| Σ_{D⁺} ln π + β/N Σ KL[π_θ ‖ π_prior]
    §3.3   build_heads       value head (new), frozen BC prior, frozen transformer and reward head
    §3.3   ContextSampler    dataset contexts (50/50 mixture), one rollout per context
    §3.3   imagine_rollout   rollouts: a_t ~ π, z_{t+1} by K = 4 shortcut steps with the KV cache
    §4.1   evaluate          real-environment success per task, beside WM+BC (Table 7 columns)

Deviations from the paper and choices it leaves open: docs/deviations.md (section `imagine.py`).
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
import environment
from dynamics import context_signal_level, corrupt, shift_actions
from tokenizer import LatentCache, load_tokenizer, pack


@dataclass
class Args:
    preset: str = "default"  # smoke | cpu | default (one GPU, 64×64)
    agent: str = "runs/agent/ckpt.pt"  # parent checkpoint, written by `python agent.py`
    out: str = "runs/imagine"  # run folder: checkpoint, metrics, summary, pictures
    horizon: int = 32  # H imagined steps per rollout (not in paper)
    context: int = 8  # dataset frames that start a rollout (not in paper)
    batch: int = 64  # rollouts per update, one per context (§3.3: one rollout per context)
    relevant_frac: float = 0.5  # share of contexts shortly before a reward event (§3.3: 50/50)
    sample_k: int = 4  # K shortcut steps per imagined frame (§3.2: K = 4)
    gamma: float = 0.997  # discount γ (Eq 10)
    lam: float = 0.95  # λ of the λ-returns (Eq 10; not in paper, DreamerV3's value)
    alpha: float = 0.5  # PMPO weight of the positive set (Eq 11)
    beta: float = 0.3  # PMPO weight of the reverse KL to the BC prior (Eq 11)
    value_hidden: int = 0  # value head MLP width; 0 = the policy head's width (not in paper)
    center_rewards: bool = False  # subtract a running mean of r̂ before Eq 10 (not in paper)
    steps: int = 1000  # updates, each on a fresh batch of rollouts (not in paper)
    lr: float = 1e-4  # policy head peak learning rate, AdamW (not in paper)
    value_lr: float = 3e-4  # value head peak learning rate, AdamW (not in paper)
    warmup: int = 50  # linear warm-up steps, then cosine decay to 10 % (not in paper)
    grad_clip: float = 1.0  # gradient-norm clipping over both heads (not in paper)
    log_every: int = 20  # steps between log lines
    ckpt_every: int = 100  # steps between checkpoints
    eval_every: int = 250  # steps between points of the success curve; 0 = none
    curve_episodes: int = 50  # real-environment episodes per point of the success curve
    eval_episodes: int = 200  # final real-environment episodes per policy (§4.1); 0 = skip
    reprompt: bool = True  # evaluation: re-read the cached context on a prompt switch (agent.py)
    probe_starts: int = 16  # held-out start states per task for imagined vs real (0 = skip)
    compare: str = ""  # summary.json of `agent.py --from-scratch`: its success joins the bars
    stop_at: int = 0  # stop after this step as if interrupted (to test --resume); 0 = never
    resume: bool = False  # continue the run in --out from its ckpt.pt
    seed: int = 0  # seed for contexts, noise, action sampling and evaluation worlds
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "auto"  # auto | fp32 | bf16: compute dtype; auto = start-up probe (not in paper)


PRESETS = {
    "smoke": dict(agent="runs/smoke/agent/ckpt.pt", out="runs/smoke/imagine",
                  horizon=4, context=2, batch=4, steps=4, warmup=1,
                  log_every=2, ckpt_every=2, eval_every=2, dtype="fp32",
                  curve_episodes=2, eval_episodes=2, probe_starts=1,
                  compare="runs/smoke/agent_scratch/summary.json"),
    "cpu": dict(agent="runs/cpu/agent/ckpt.pt", out="runs/cpu/imagine",
                batch=16, steps=150, lr=3e-4, value_lr=1e-3, warmup=10,
                log_every=10, ckpt_every=50, eval_every=50,
                curve_episodes=50, eval_episodes=100, probe_starts=8,
                compare="runs/cpu/agent_scratch/summary.json"),
}

FORMAT_VERSION = 1


# ==============================================================================================
# Eq 10: λ-returns, and Eq 11: PMPO
# ==============================================================================================


def lambda_returns(rewards: torch.Tensor, values: torch.Tensor, cont: torch.Tensor, gamma: float,
                   lam: float) -> torch.Tensor:
    """Eq 10, indexed by state: R_t = r_{t+1} + γ c_{t+1} ((1 − λ) v_{t+1} + λ R_{t+1}), R_H = v_H.

    A rollout, indexed by state (docs/conventions.md; tests/test_imagine.py pins it):
        context ... z_0 --a_0--> z_1, r_1 --a_1--> z_2, r_2 ... --a_{H−1}--> z_H, r_H
    h_t has seen a_{t−1} and z_t; r_t is the reward of ENTERING state t (of the transition
    s_{t−1}, a_{t−1} → s_t); v_t is the value of state t. The paper prints
    "r_t + γ c_t((1 − λ) v_t + λ R_{t+1})": DreamerV3 stores the reward and continuation of a
    transition with the state it starts from, and its v_t there is the value of the state the
    transition enters. Reading v_t as the current state's value would bootstrap a state from
    itself; we use v_{t+1}. The advantage of a_t is A_t = R_t − v_t.

    rewards, cont, values: (B, H+1); rewards[:, t] = r_t (r_0 is never used), cont[:, t] = c_t is
    0 if state t is terminal, values[:, t] = v_t. Returns R_0 … R_{H−1} (B, H). The loop runs
    backwards over time, vectorised over the batch; a return is a target: the caller detaches it.
    """
    H = rewards.shape[1] - 1
    ret = values[:, H]  # R_H = v_H: bootstrap from the last imagined state
    out = []
    for t in reversed(range(H)):
        # Eq 10: R_t = r_{t+1} + γ c_{t+1} ((1 − λ) v_{t+1} + λ R_{t+1})
        mixed = (1 - lam) * values[:, t + 1] + lam * ret
        ret = rewards[:, t + 1] + gamma * cont[:, t + 1] * mixed
        out.append(ret)
    return torch.stack(out[::-1], dim=1)  # (B, H)


def pmpo_loss(pol_logits: list[torch.Tensor], prior_logits: list[torch.Tensor],
              actions: torch.Tensor, adv: torch.Tensor, alpha: float = 0.5,
              beta: float = 0.3) -> dict:
    """Eq 11 (PMPO with a reverse KL to the behavioural prior) over the N states of a batch:

        L = (1 − α)/|D⁻| Σ_{D⁻} ln π_θ(a_i | s_i) − α/|D⁺| Σ_{D⁺} ln π_θ(a_i | s_i)
            + β/N Σ_i KL[π_θ ‖ π_prior]
        D⁺ = {i : A_i ≥ 0},  D⁻ = {i : A_i < 0}  (only the sign of the advantage is used)

    pol_logits, prior_logits: A × (..., n_c) per-component logits (agent.split_policy_logits) of
    π_θ and π_prior; actions (..., A); adv (...) advantages (detached here: sg). ln π and the KL
    are sums over the action components. An empty set contributes 0.
    """
    adv = adv.detach()
    # not in paper: ln π and KL factorise as sums over the action components (docs/deviations.md)
    logp = ag.action_log_prob(pol_logits, actions)  # (...) ln π_θ(a_i | s_i)
    prior_logits = [lg.detach() for lg in prior_logits]
    kl = ag.action_kl(pol_logits, prior_logits)  # (...) reverse KL[π_θ ‖ π_prior]
    pos, neg = (adv >= 0).float(), (adv < 0).float()  # D⁺ (zero counts as positive), D⁻
    # 1/|D⁺| Σ_{D⁺} ln π and 1/|D⁻| Σ_{D⁻} ln π   (0 if the set is empty)
    pos_mean = (logp * pos).sum() / pos.sum().clamp_min(1)
    neg_mean = (logp * neg).sum() / neg.sum().clamp_min(1)
    kl_mean = kl.mean()  # 1/N Σ KL
    loss = (1 - alpha) * neg_mean - alpha * pos_mean + beta * kl_mean
    return {"loss": loss, "pos_logp": pos_mean.detach(), "neg_logp": neg_mean.detach(),
            "kl": kl_mean.detach(), "frac_pos": pos.mean()}


# ==============================================================================================
# Heads: the new value head and the frozen behavioural prior (§3.3)
# ==============================================================================================


def build_heads(model: ag.AgentModel, value_hidden: int = 0):
    """Freeze the agent, unfreeze its policy head, add a value head and a frozen policy copy.

    Value head: an agent.MTPHead with one output (L = 1) of `bins` twohot logits, output layer
    zero-initialised (so v = 0 at the start). Prior π_prior: a deep copy of the stage-2 policy
    head, never updated. Returns (value_head, prior_head).
    """
    model.requires_grad_(False)  # transformer, tokens, agent token, reward head: frozen (§3.3)
    model.policy_head.requires_grad_(True)  # trainable: the policy head …
    D = model.agent_base.shape[0]
    hidden = value_hidden or model.policy_head.trunk[0].out_features
    value = ag.MTPHead(D, hidden, model.bins.shape[0], 1)  # … and the new value head
    value = value.to(model.bins.device)
    prior = copy.deepcopy(model.policy_head).requires_grad_(False).eval()  # π_prior: BC, frozen
    return value, prior


def value_of(value_head: ag.MTPHead, h: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """v_t = symexp twohot mean of the value head at h_t.  (..., D) → (...)."""
    return ag.twohot_mean(value_head(h.float(), 0), bins)


# ==============================================================================================
# Contexts: the 50/50 mixture of dataset windows (§3.3), with their task prompts
# ==============================================================================================


class ContextSampler:
    """Dataset contexts of `context` frames, from the latent cache, one imagined rollout each.

    Uniform half: any window of the split; prompt = the first task (in list order) not yet
    achieved in the episode at the window's last frame (the evaluation ladder). Relevant half: a
    task uniformly among those with reward events, one of its events at frame e, a window ending
    at e − j with j ~ U{1…H} (the success lies inside the horizon), prompt = that task. The
    prompts are not in the paper (docs/deviations.md). `rng` is the sampler's own.
    """

    def __init__(self, cache: LatentCache, context: int, horizon: int, seed: int = 0):
        assert cache.actions is not None and cache.rewards is not None, \
            "imagination training needs a dataset with action and reward labels"
        self.latents, self.actions, self.T = cache.latents, cache.actions, context
        rew = np.asarray(cache.rewards) > 0  # (ΣT, n_tasks)
        done = np.zeros_like(rew)
        for e in cache.episodes:  # achieved so far in the episode, frame by frame
            o, n = e["offset"], e["length"]
            done[o:o + n] = np.logical_or.accumulate(rew[o:o + n], axis=0)
        # (ΣT,) the first task not yet done
        self.prompt = np.where(done.all(1), rew.shape[1] - 1, done.argmin(1))
        eps = [e for e in cache.episodes if e["length"] >= context]
        assert eps, f"no episode of at least {context} frames"
        self.ends = np.concatenate([np.arange(e["offset"] + context - 1, e["offset"] + e["length"])
                                    for e in eps])
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
        latents = np.asarray(self.latents[idx], dtype=np.float32)  # (B, T, N_b, D_b)
        actions = np.asarray(self.actions[idx], dtype=np.int64)  # (B, T, A)
        return {"latents": torch.from_numpy(latents),
                "actions": torch.from_numpy(actions),
                "task": torch.tensor(tasks, dtype=torch.int64),
                "relevant": torch.arange(len(ends)) >= n_uniform,
                "end": torch.tensor(ends, dtype=torch.int64)}


# ==============================================================================================
# Imagination: unroll the frozen world model on its own outputs (§3.3)
# ==============================================================================================


def observe_context(model: ag.AgentModel, cache: common.KVCache, clean: torch.Tensor,
                    actions: torch.Tensor, task: torch.Tensor, ctx_tau: float,
                    gen: torch.Generator | None = None) -> torch.Tensor:
    """Write a context into the KV cache in one pass, every frame at τ_ctx (as agent.observe
    does frame by frame). clean (B, T, N_z, C_z) packed latents; actions (B, T, A) in dataset
    convention (a_t taken at frame t; the last one is not used). Returns h of the last context
    frame (B, D): the rollout's h_0."""
    B, T = actions.shape[:2]
    dev = clean.device
    # not in paper: the heads read h_t of frames written at τ_ctx (docs/deviations.md)
    tau_c, d_min = context_signal_level(ctx_tau, model.k_max), 1.0 / model.k_max
    noise = torch.randn(clean.shape, generator=gen, device=dev)
    z_ctx = corrupt(noise, clean, tau_c)  # Eq 6 at τ_ctx   (B, T, N_z, C_z)
    tau = torch.full((B, T), tau_c, device=dev)
    d = torch.full((B, T), d_min, device=dev)
    prev, valid = shift_actions(actions)  # the action token of frame t carries a_{t−1}
    _, h = model(z_ctx, tau, d, prev, valid, task, cache=cache, commit=True)  # h (B, T, D)
    return h[:, -1]  # (B, D)


@torch.no_grad()
def imagine_rollout(model: ag.AgentModel, clean: torch.Tensor, actions: torch.Tensor,
                    task: torch.Tensor, horizon: int, k: int, ctx_tau: float,
                    gen: torch.Generator | None = None, act=None,
                    keep_latents: bool = False) -> dict:
    """One imagined rollout per context (§3.3): a_t ~ π(· | h_t), z_{t+1} from K shortcut steps
    given a_t (agent.step_world_model, KV cache), r_{t+1} from the reward head at h_{t+1}.

    clean (B, T_c, N_z, C_z), actions (B, T_c, A): the dataset context; task (B,) prompts.
    act(h_t (B, D), t) → per-component logits of the acting policy (default: the policy head).
    Returns h (B, H+1, D) and rewards (B, H+1) (r_0 = 0: entering the context's last frame is not
    part of the rollout), actions (B, H, A), and with keep_latents the generated z_1 … z_H
    (B, H, N_z, C_z).
    """
    act = act or (lambda h, t: model.policy(h, offset=0))
    cache = common.KVCache(model.window)
    h = observe_context(model, cache, clean, actions, task, ctx_tau, gen)  # h_0 (B, D)
    hs, acts, zs = [h], [], []
    for t in range(horizon):
        a = ag.sample_action(act(h, t), gen)  # a_t (B, A), taken at state t
        z, h = ag.step_world_model(model, cache, a, task, k, ctx_tau, gen)  # z_{t+1}, h_{t+1}
        hs.append(h)
        acts.append(a)
        if keep_latents:
            zs.append(z)
    h = torch.stack(hs, 1).float()  # (B, H+1, D)
    rewards = model.reward(h, 0)  # (B, H+1) r̂_t of the prompted task: reward of entering state t
    rewards[:, 0] = 0  # r_0 belongs to the transition into the context's last frame
    return {"h": h, "rewards": rewards,
            "actions": torch.stack(acts, 1),  # (B, H, A)
            "latents": torch.stack(zs, 1) if keep_latents else None}  # (B, H, N_z, C_z)


def imagination_loss(model: ag.AgentModel, value_head: ag.MTPHead, prior: ag.MTPHead, roll: dict,
                     a: Args, r_bar: float = 0.0) -> dict:
    """Eqs 10–11 on a batch of rollouts: the value head's twohot NLL against sg(R^λ), and PMPO.

    r_bar: subtracted from every reward before Eq 10 (reward centering, see RewardCenter; 0 =
    off). Only the two heads get gradients: h_t comes from the frozen transformer (no graph), the
    rewards from the frozen reward head, and the returns and advantages are targets. No loss is
    normalised by its running RMS (an ambiguity of §3 vs App F; docs/deviations.md).
    """
    h, bins = roll["h"], model.bins  # h (B, H+1, D)
    B, H = roll["actions"].shape[:2]
    with torch.no_grad():
        v = value_of(value_head, h, bins)  # (B, H+1) v_t
        cont = torch.ones_like(v)  # not in paper: c_t = 1, no terminal states (docs/deviations.md)
        # Eq 10: R^λ_t  (B, H), a target: sg
        ret = lambda_returns(roll["rewards"] - r_bar, v, cont, a.gamma, a.lam)
        adv = ret - v[:, :H]  # A_t = R^λ_t − v_t  (Eq 11)
        prior_raw = prior(h[:, :H], 0).float()
        prior_logits = ag.split_policy_logits(prior_raw, model.action_classes)
    pol_logits = model.policy(h[:, :H], offset=0)  # A × (B, H, n_c)
    pm = pmpo_loss(pol_logits, prior_logits, roll["actions"], adv, a.alpha, a.beta)  # Eq 11
    # Eq 10: −ln p(sg(R^λ_t) | s_t)
    value_nll = ag.twohot_nll(value_head(h[:, :H], 0), ret, bins).mean()
    explained = 1 - (ret - v[:, :H]).var() / ret.var().clamp_min(1e-8)  # of R^λ by v
    return {"loss": pm["loss"] + value_nll,
            "pmpo": pm["loss"].detach(),
            "value": value_nll.detach(),
            "kl": pm["kl"],
            "frac_pos": pm["frac_pos"],
            "pos_logp": pm["pos_logp"],
            "neg_logp": pm["neg_logp"],
            "return": ret.mean(),
            "v": v.mean(),
            "reward_sum": roll["rewards"].sum(1).mean(),
            "value_ev": explained,
            "imag_success": (roll["rewards"].max(1).values > 0.5).float().mean()}


class RewardCenter:
    """Reward centering (Naik et al. 2024; not in the paper; off by default, `--center-rewards`
    turns it on): r̄ ← 0.99·r̄ + 0.01·mean(r̂) (the first batch sets it), and Eq 10 uses r̂_t − r̄.

    The imagined episodes never end (c = 1) and all have H steps, so subtracting a constant from
    every reward changes no action's advantage once v is right: the optimal policy is the same.
    What it changes is how soon v is right. The reward head predicts an expectation, a small
    positive r̂ on every frame; with γ = 0.997 that alone is worth Σ γ^t r̂ of value, which the
    value head, starting at 0, reaches only by bootstrapping, about a factor γ per refit. Until
    then R^λ > v nearly everywhere, D⁻ stays empty and PMPO only sharpens the policy. That
    was so for a reward head that paid 0.02–0.05 on every frame; the cpu preset's head pays
    0.0015–0.004 off the events, and over four seeds the agents did as well without centering
    (docs/deviations.md), so the default is the literal Eq 10.
    """

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
        self.value = float(state["value"])
        self.count = int(state["count"])
        self.decay = float(state["decay"])


class swap_policy:
    """`with swap_policy(model, head):` the model acts with another policy head (e.g. π_prior)."""

    def __init__(self, model: ag.AgentModel, head: ag.MTPHead):
        self.model, self.head = model, head

    def __enter__(self):
        self.kept, self.model.policy_head = self.model.policy_head, self.head

    def __exit__(self, *exc):
        self.model.policy_head = self.kept


# ==============================================================================================
# Evaluation: real-environment success per task (§4.1), the trained policy beside WM+BC
# ==============================================================================================


def evaluate_success(model: ag.AgentModel, tok, device, ctx_tau: float, episodes: int, seed: int,
                     meta: dict, reprompt: bool = True) -> dict:
    """Real-environment success per task of the model's policy (held-out worlds)."""
    policy = ag.AgentPolicy(model, tok, device, ctx_tau, seed, reprompt)
    size, ep_len = meta["image_size"], meta.get("episode_len", 256)
    return environment.evaluate(policy, episodes, seed, size, ep_len)["success"]


def evaluate(model: ag.AgentModel, prior: ag.MTPHead, tok, device, ctx_tau: float, meta: dict,
             a: Args) -> dict:
    """The headline: success per task of the trained policy (Dreamer 4) and of the stage-2
    policy π_prior (WM+BC) on the same held-out worlds."""
    n = a.eval_episodes
    success = {"Dreamer 4": evaluate_success(model, tok, device, ctx_tau, n, a.seed, meta,
                                             a.reprompt)}
    with swap_policy(model, prior):  # WM+BC: the stage-2 policy, on the same worlds
        success["WM+BC"] = evaluate_success(model, tok, device, ctx_tau, n, a.seed, meta,
                                            a.reprompt)
    return success


def builtin_env(meta: dict) -> bool:
    """Whether the dataset comes from data.py's environment (then the real environment exists)."""
    from_data_py = meta.get("generator") == data.GENERATOR
    return from_data_py and list(meta["tasks"]) == environment.TASKS


# ==============================================================================================
# Checkpoint and training
# ==============================================================================================


def load_imagine(path: str = "runs/imagine/ckpt.pt", device="cpu"):
    """The imagination-trained agent: (model with the trained policy head, value head, ckpt)."""
    how = common.command_for("imagine.py", Args, PRESETS, os.path.dirname(path))  # writes it
    ckpt = common.load_checkpoint(path, "imagine", how)
    model = ag.build_agent(ckpt["agent_args"], ckpt["dynamics_args"], ckpt["shapes"])
    model.load_state_dict(ckpt["model"])
    value = ag.MTPHead(model.agent_base.shape[0], ckpt["value_hidden"], model.bins.shape[0], 1)
    value.load_state_dict(ckpt["value"])
    return model.to(device), value.to(device), ckpt


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def train(a: Args) -> dict:
    common.single_process_only("imagine.py")  # not data-parallel (common.py)
    common.seed_everything(a.seed)
    device = common.pick_device_for_run(a)  # records the compute dtype in a.dtype
    os.makedirs(a.out, exist_ok=True)
    ckpt_path = os.path.join(a.out, "ckpt.pt")

    # Parents: the agent of stage 2, its tokenizer and the tokenizer's latent cache.
    model, agent_ckpt = ag.load_agent(a.agent, device)
    model.eval()
    tok_path = agent_ckpt["tokenizer"]
    tok, _ = load_tokenizer(tok_path, device)
    tok_dir = os.path.dirname(os.path.abspath(tok_path))
    train_cache = LatentCache(tok_dir, "train", seed=a.seed)
    held = LatentCache(tok_dir, "heldout", seed=a.seed + 1)
    meta = dict(train_cache.meta, _root=train_cache.data_root)
    if list(meta["tasks"]) != list(agent_ckpt["shapes"]["tasks"]):
        agent_dir = os.path.dirname(a.agent)
        raise ValueError(f"{a.agent} was trained on tasks {agent_ckpt['shapes']['tasks']}, the "
                         f"latent cache at {tok_dir} has {meta['tasks']}: retrain it with "
                         f"`{common.command_for('agent.py', ag.Args, ag.PRESETS, agent_dir)}`")
    ctx_tau = agent_ckpt["args"]["ctx_tau"]  # the heads read h_t at the level they were trained on
    value_head, prior = build_heads(model, a.value_hidden)
    sampler = ContextSampler(train_cache, a.context, a.horizon, a.seed)
    n_rel = int(round(a.batch * a.relevant_frac))
    n_uni = a.batch - n_rel
    n_policy, n_value = count_parameters(model.policy_head), count_parameters(value_head)
    n_events = sum(len(v) for v in sampler.events.values())
    print(f"imagine: from {a.agent} (step {agent_ckpt['step']}); training {n_policy:,} policy + "
          f"{n_value:,} value parameters, the other {count_parameters(model) - n_policy:,} "
          f"frozen; {a.batch} rollouts × H = {a.horizon} per step, K = {a.sample_k}, contexts "
          f"of {a.context} frames ({len(sampler.ends):,} contexts, {n_events} reward events)")
    # not in paper: one on-policy AdamW step per batch of rollouts, no EMA critic
    opt = torch.optim.AdamW([{"params": list(model.policy_head.parameters()), "peak": a.lr},
                             {"params": list(value_head.parameters()), "peak": a.value_lr}],
                            lr=a.lr, weight_decay=0.0, betas=(0.9, 0.99))
    step, curve, center = 0, [], RewardCenter()
    if a.resume:
        how = f"python imagine.py --preset {a.preset} --out {a.out}"  # the run that writes it
        ckpt = common.load_checkpoint(ckpt_path, "imagine", how)
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
    builtin = builtin_env(meta)

    def save(step):
        common.save_checkpoint(ckpt_path, {
            "format_version": FORMAT_VERSION, "stage": "imagine", "step": step,
            "model": model.state_dict(), "value": value_head.state_dict(),
            "prior": prior.state_dict(), "optimizer": opt.state_dict(),
            "normalizers": {"reward_center": center.state_dict()}, "curve": curve,
            "args": asdict(a), "value_hidden": value_head.trunk[0].out_features,
            "agent_args": agent_ckpt["args"], "dynamics_args": agent_ckpt["dynamics_args"],
            "shapes": agent_ckpt["shapes"], "tokenizer": tok_path,
            "parent": {"stage": "agent", "path": os.path.abspath(a.agent),
                       "step": agent_ckpt["step"]}})

    def curve_point(step):  # real-environment success of the current policy over training steps
        due = a.eval_every > 0 and (step % a.eval_every == 0 or step == a.steps)
        if due and a.curve_episodes > 0 and builtin and (not curve or curve[-1]["step"] != step):
            success = evaluate_success(model, tok, device, ctx_tau, a.curve_episodes, a.seed,
                                       meta, a.reprompt)
            curve.append({"step": step, "episodes": a.curve_episodes, "success": success})
            rates = " ".join(f"{k} {100 * v['rate']:.0f}" for k, v in success.items())
            print(f"  real-environment success (%) at step {step}: {rates}")

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    gen = torch.Generator(device)
    curve_point(step)
    flops = common.FlopMeter(opt)  # counts the first step's FLOPs (MFU in summary.json)
    t_start, steps_run, t_eval = time.time(), 0, 0.0
    while step < a.steps:
        # Per-step streams seeded from (seed, step): --resume sees exactly the contexts, noise and
        # action samples of an uninterrupted run.
        sampler.rng = np.random.default_rng([a.seed, step])
        gen.manual_seed(a.seed * 1_000_003 + step)
        b = sampler.sample(n_uni, n_rel)
        for g in opt.param_groups:
            g["lr"] = common.lr_at(step, g["peak"], a.warmup, a.steps)
        with common.autocast(device):
            clean = pack(b["latents"].to(device))  # (B, T_c, N_z, C_z)
            roll = imagine_rollout(model, clean, b["actions"].to(device), b["task"].to(device),
                                   a.horizon, a.sample_k, ctx_tau, gen)
        # not in paper: reward centering (off by default); r_0 is not the rollout's
        r_bar = center.update(roll["rewards"][:, 1:]) if a.center_rewards else 0.0
        terms = imagination_loss(model, value_head, prior, roll, a, r_bar)
        common.check_finite(step, pmpo=terms["pmpo"], value=terms["value"])
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        params = [p for g in opt.param_groups for p in g["params"]]
        gnorm = torch.nn.utils.clip_grad_norm_(params, a.grad_clip)
        opt.step()
        step, steps_run = step + 1, steps_run + 1
        if step % a.log_every == 0 or step == a.steps:
            values = {k: v for k, v in terms.items() if k != "loss"}
            values |= {"r_bar": r_bar, "grad_norm": gnorm,
                       "lr": common.lr_at(step - 1, a.lr, a.warmup, a.steps)}
            log.log(step, values, a.batch * a.horizon)
        if steps_run == 3 and device.type == "cpu" and a.preset == "default":
            eta = (time.time() - t_start) / 3 * (a.steps - step) / 60
            print(f"!! the default preset is sized for a GPU: on this CPU it would take about "
                  f"{eta:.0f} min. Try --preset cpu.")
        t0 = time.time()
        curve_point(step)
        t_eval += time.time() - t0
        if step % a.ckpt_every == 0 or step == a.steps or step == a.stop_at:
            save(step)
        if a.stop_at and step >= a.stop_at:
            print(f"stopping at step {step} (--stop-at); continue with --resume")
            return {}
    wall = time.time() - t_start - t_eval

    # Final evaluation and summary.json.
    summary = {
        "stage": "imagine", "preset": a.preset, "device": str(device),
        "steps": step, "steps_this_run": steps_run,
        **flops.speed(device, wall, steps_run, steps_run * a.batch * a.horizon),
        "policy": "Dreamer 4", "horizon": a.horizon, "sample_k": a.sample_k, "gamma": a.gamma,
        "lam": a.lam, "alpha": a.alpha, "beta": a.beta, "eval_episodes": a.eval_episodes,
        "curve": curve, "ctx_tau_used": context_signal_level(ctx_tau, model.k_max),
        "parent": os.path.abspath(a.agent), "reprompt": a.reprompt,
    }
    model.eval()
    t0 = time.time()
    success = {}
    if a.eval_episodes > 0 and builtin:
        success = evaluate(model, prior, tok, device, ctx_tau, meta, a)
    elif a.eval_episodes > 0:
        print("note: the dataset is not the built-in environment's: no real-environment evaluation")
    # measuring instruments live in imagine_eval.py; imported here so the method file never
    # depends on them at import time
    import imagine_eval
    summary.update(imagine_eval.report(model, value_head, prior, tok, held, meta, a, ctx_tau,
                                       device, curve, success))
    summary["eval_s"] = time.time() - t0
    common.write_json(os.path.join(a.out, "summary.json"), summary)
    print("summary:", json.dumps(summary))
    return summary


def main():
    train(common.parse_args(Args, PRESETS))


if __name__ == "__main__":
    common.run_main(main, Args, PRESETS)  # Ctrl-C: a short message with the --resume command
