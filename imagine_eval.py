"""Measuring instruments of stage 3 (imagine.py): baselines, probes, pictures and the seed table.

imagine.train calls `report` at its end. The same instruments run on a finished run folder:

    python imagine_eval.py runs/cpu/imagine            # re-evaluate: summary.json and pictures
    python imagine_eval.py runs/smoke/imagine --eval-episodes 2 --probe-starts 1
    python imagine_eval.py --table runs/cpu/imagine,runs/cpu/imagine_s1,runs/cpu/imagine_s2 \\
        --out runs/cpu/imagine_table                   # table.md, table.json, table.png

The README table varies the seed of the agent, of the BC baseline and of this stage (seed s:
`agent.py --seed s` with and without `--from-scratch`, then `imagine.py --seed s`); the tokenizer
and the dynamics model are shared across seeds.

Beyond the paper, imagined vs real: from held-out states shortly before a reward event (the real
episode is replayed to that state: environment.Env is deterministic given its world seed and the
recorded actions) each policy is rolled out H steps both in imagination and in the real
environment. Does the world model rank the policies as the real environment does? The recorded
contractor actions, replayed open loop, succeed in reality by construction, so their imagined
success is the world model's recall of reward events.

Writes (into the run folder): success.png, success_curve.png, imagined_vs_real.png, rollout.png.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shlex
import time

import numpy as np
import torch

import agent as ag
import agent_eval
import common
import dynamics
import environment
import imagine
import tokenizer
from tokenizer import LatentCache, load_tokenizer, pack, unpack

POLICY_ORDER = ["random", "contractors", "BC (scratch)", "WM+BC", "Dreamer 4"]  # Table 7 columns


# ==============================================================================================
# The report imagine.train ends with
# ==============================================================================================


def report(model: ag.AgentModel, value_head: ag.MTPHead, prior: ag.MTPHead, tok,
           held: LatentCache, meta: dict, a: imagine.Args, ctx_tau: float, device,
           curve: list[dict], success: dict) -> dict:
    """Baselines beside the headline `success` (imagine.evaluate; {} = not evaluated), the
    success curve, and imagined vs real from held-out states. Writes the pictures into a.out;
    returns the summary keys: compared_with, success, reward_head_on_real_replay,
    imagined_vs_real, rank_agreement (each only when measured)."""
    out = {}
    if success:
        out.update(with_baselines(success, meta, a))
    save_curve(curve, a.out)
    out.update(probe_report(model, value_head, prior, tok, held, meta, a, ctx_tau, device))
    return out


def policy_rank(item: tuple[str, dict]) -> int:
    """Sort key of (policy name, success): the column order of Table 7."""
    return POLICY_ORDER.index(item[0])


def with_baselines(success: dict, meta: dict, a: imagine.Args) -> dict:
    """Add the random and contractor policies and the compared run (--compare) to the headline
    success, on the same worlds; draw success.png and print the table."""
    success = dict(success)
    size, ep_len = meta["image_size"], meta.get("episode_len", 256)
    players = (("random", environment.RandomPolicy(a.seed)),
               ("contractors", environment.ContractorPolicy(a.seed)))
    for label, player in players:
        result = environment.evaluate(player, a.eval_episodes, a.seed, size, ep_len)
        success[label] = result["success"]
    out = {}
    if a.compare and os.path.exists(a.compare):
        theirs = json.load(open(a.compare))
        if theirs.get("eval_episodes") != a.eval_episodes:
            print(f"note: {a.compare} used {theirs.get('eval_episodes')} evaluation worlds, "
                  f"this run {a.eval_episodes}")
        success[theirs["policy"]] = theirs["success"][theirs["policy"]]
        out["compared_with"] = a.compare
    out["success"] = dict(sorted(success.items(), key=policy_rank))
    title = (f"real-environment success per task, {a.eval_episodes} evaluation worlds "
             f"(± standard error)")
    agent_eval.save_pictures(out["success"], None, a.out, title)
    for k in environment.TASKS:
        cells = [f"{n} {100 * s[k]['rate']:5.1f} ± {100 * s[k]['stderr']:.1f}"
                 for n, s in out["success"].items()]
        print(f"  {k:<20s}" + " | ".join(cells))
    return out


def probe_report(model: ag.AgentModel, value_head: ag.MTPHead, prior: ag.MTPHead, tok,
                 held: LatentCache, meta: dict, a: imagine.Args, ctx_tau: float, device) -> dict:
    """Imagined vs real success of four policies from the same held-out states; the reward head
    on the replayed contractor frames; the rank agreement; imagined_vs_real.png, rollout.png."""
    if a.probe_starts <= 0 or not imagine.builtin_env(meta):
        return {}
    starts = probe_states(held, a.probe_starts, a.context, a.horizon, a.seed)
    if not starts:
        return {}
    policies = {"contractor replay": "replay",
                "random": uniform_policy(model.action_classes),
                "WM+BC": head_policy(prior, model.action_classes),
                "Dreamer 4": model_policy(model)}
    out, probes, keep = {}, {}, None
    for name, act in policies.items():
        res = imagined_vs_real(model, value_head, tok, starts, meta, a, ctx_tau, device, act,
                               keep=name == "Dreamer 4")
        probes[name] = probe_summary(res, len(meta["tasks"]))
        if name == "contractor replay":  # real frames with guaranteed events: the reward head alone
            out["reward_head_on_real_replay"] = reward_head_quality(res["r_real"], res["true_r"])
        keep = res if name == "Dreamer 4" else keep
    out["imagined_vs_real"], out["rank_agreement"] = probes, rank_agreement(probes)
    save_probe_picture(probes, a.out, a.horizon)
    # The picture's rollout: the hardest task whose real rollout succeeded, else the hardest probed.
    order = np.argsort(-keep["task"] - 100 * keep["real_success"], kind="stable")
    i = int(order[0])
    save_rollout_picture(keep["trace"], i, meta["tasks"][int(keep["task"][i])], a.out)
    for name, p in probes.items():
        rates = " ".join(f"{k} {100 * v['imagined']:.0f}/{100 * v['real']:.0f}"
                         for k, v in p.items())
        print(f"  imagined/real success within H (%), {name}: {rates}")
    r, q = out["rank_agreement"], out.get("reward_head_on_real_replay", {})
    print(f"  the imagined return orders {r['agree']} of {r['pairs']} policy pairs as the real "
          f"environment does")
    if "separated" in r:
        sep = r["separated"]
        print(f"  … and {sep['agree']} of the {sep['pairs']} pairs whose real difference is "
              f"separated (95 % interval over the starts)")
    if q:
        print(f"  reward head on the real replayed contractor frames: AUC {q['auc']:.3f}, mean r̂ "
              f"{q['mean_at_events']:.3f} at {q['events']} true events vs "
              f"{q['mean_elsewhere']:.3f} elsewhere")
    return out


# ==============================================================================================
# Acting policies for the probes: act(h_t (B, D), t) → per-component logits
# ==============================================================================================


def scripted_policy(actions: torch.Tensor, action_classes: list[int]):
    """An `act` that plays fixed actions (B, H, A): logits 10⁴ on the scripted class of each
    component."""
    def act(h, t):
        return [torch.nn.functional.one_hot(actions[:, t, c], n).float() * 1e4
                for c, n in enumerate(action_classes)]
    return act


def uniform_policy(action_classes: list[int]):
    """An `act` with zero logits: uniform over every action component."""
    def act(h, t):
        return [torch.zeros(*h.shape[:-1], n, device=h.device) for n in action_classes]
    return act


def head_policy(head: ag.MTPHead, action_classes: list[int]):
    """An `act` reading another policy head at offset 0 (e.g. π_prior, the WM+BC policy)."""
    def act(h, t):
        return ag.split_policy_logits(head(h, 0).float(), action_classes)
    return act


def model_policy(model: ag.AgentModel):
    """An `act` reading the model's own policy head (the trained Dreamer 4 policy)."""
    def act(h, t):
        return model.policy(h, offset=0)
    return act


# ==============================================================================================
# Imagined vs real from the same held-out states
# ==============================================================================================


def probe_states(held: LatentCache, n_per_task: int, context: int, horizon: int,
                 seed: int) -> list[dict]:
    """Held-out start states for imagined-vs-real: per task up to n of them, each 1 … H/2 steps
    before one of that task's reward events in a held-out episode (so the recorded contractor
    succeeded within H/2)."""
    rng, rew, out = np.random.default_rng([seed, 7]), np.asarray(held.rewards) > 0, []
    for k in range(rew.shape[1]):
        events = []
        for e in held.episodes:
            hits = np.nonzero(rew[e["offset"]:e["offset"] + e["length"], k])[0]
            events += [(e, t) for t in hits if t - 1 >= context - 1]
        # with replacement over a few events, a new j each time
        for i in range(min(n_per_task, 4 * len(events))):
            e, t = events[rng.integers(len(events))]
            t0 = int(max(context - 1, t - rng.integers(1, max(2, horizon // 2 + 1))))
            out.append({"id": e["id"], "t0": t0, "task": k})
    return out


def replay_starts(starts: list[dict], meta: dict, context: int, horizon: int) -> dict:
    """Replay each start's held-out episode in the real environment up to its frame t0 (same
    world seed, the recorded actions: the same frames, environment.Env is deterministic).
    Returns the envs, the context frames (B, T_c, H, W, 3) uint8 and actions (B, T_c, A), and the
    contractor's next `horizon` recorded actions (B, H, A), no-ops past the episode's end."""
    root, envs, frames, actions, future = meta["_root"], [], [], [], []
    for s in starts:
        ep = np.load(os.path.join(root, s["id"] + ".npz"))
        # may run past the recorded episode's end
        env = environment.Env(meta["image_size"], episode_len=10 ** 9)
        f = [env.reset(environment.episode_seed(meta["seed"], "data", int(s["id"][2:])))]
        for t in range(s["t0"]):
            f.append(env.step(ep["actions"][t])[0])
        assert np.array_equal(f[-1], ep["frames"][s["t0"]]), \
            f"replay of {s['id']} diverged from the dataset"
        envs.append(env)
        frames.append(np.stack(f[-context:]))
        actions.append(ep["actions"][s["t0"] - context + 1:s["t0"] + 1])
        nxt = ep["actions"][s["t0"]:s["t0"] + horizon]
        pad = np.zeros((horizon - len(nxt), nxt.shape[1]), nxt.dtype)
        future.append(np.concatenate([nxt, pad]))
    return {"envs": envs, "frames": np.stack(frames), "actions": np.stack(actions),
            "future": np.stack(future)}


@torch.no_grad()
def imagined_vs_real(model: ag.AgentModel, value_head, tok, starts: list[dict], meta: dict,
                     a: imagine.Args, ctx_tau: float, device, act, keep: bool = False) -> dict:
    """From the same held-out states, roll the same policy out H steps in imagination and in
    the real environment. Per start: imagined success (r̂ > 0.5 for the prompted task at some
    step), real success (the task's reward arrives), the imagined return Σ r̂, and with keep the
    traces for rollout.png. act(h, t) as in imagine.imagine_rollout, or "replay": the
    contractor's recorded actions, open loop (its real success is 1 by construction, so its
    imagined success is the world model's recall of reward events)."""
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
        im = imagine.imagine_rollout(model, clean, acts, task, a.horizon, a.sample_k, ctx_tau,
                                     gen, act, keep_latents=keep)
        # The real environment, step by step: encode the new frame, write it into the cache,
        # read h_t.
        cache = common.KVCache(model.window)
        h = imagine.observe_context(model, cache, clean, acts, task, ctx_tau, gen)  # h_0 (B, D)
        hs, true_r, frames = [h], [np.zeros(B)], [rep["frames"][:, -1]]
        for t in range(a.horizon):
            act_t = ag.sample_action(act(h, t), gen)  # a_t (B, A)
            steps = [env.step(act_t[i].cpu().numpy()) for i, env in enumerate(rep["envs"])]
            frame = np.stack([s[0] for s in steps])  # (B, H, W, 3)
            true_r.append(np.array([s[1][starts[i]["task"]] for i, s in enumerate(steps)]))
            x_t = torch.from_numpy(frame).to(device)[:, None]  # (B, 1, H, W, 3)
            z = pack(tok.encode(x_t, cache=tok_cache)).float()[:, 0]  # (B, N_z, C_z)
            h = ag.observe(model, cache, z, act_t, task, ctx_tau, gen)  # h_{t+1}
            hs.append(h)
            frames.append(frame)
    h_real = torch.stack(hs, 1).float()  # (B, H+1, D)
    r_real = model.reward(h_real, 0)
    r_real[:, 0] = 0
    true_r = np.stack(true_r, 1)  # (B, H+1)
    out = {"imag_success": (im["rewards"].max(1).values > 0.5).cpu().numpy(),
           "real_success": true_r.max(1) > 0,
           "imag_return": im["rewards"].sum(1).cpu().numpy(),
           "real_return": true_r.sum(1),
           "real_pred_success": (r_real.max(1).values > 0.5).cpu().numpy(),
           "task": task.cpu().numpy(),
           "r_real": r_real[:, 1:].cpu().numpy(),  # (B, H) r̂_t, t = 1 … H
           "true_r": true_r[:, 1:]}  # (B, H) r_t, t = 1 … H
    if keep:
        def v(h):
            return imagine.value_of(value_head, h, model.bins).cpu().numpy()
        out["trace"] = {"imag_reward": im["rewards"].cpu().numpy(),
                        "imag_value": v(im["h"]),
                        "real_reward_pred": r_real.cpu().numpy(),
                        "real_value": v(h_real),
                        "real_reward": true_r,
                        "real_frames": np.stack(frames, 1)}
        with common.autocast(device):  # decode context + imagined latents in one causal pass
            z_all = torch.cat([clean, im["latents"].float()], 1)  # (B, T_c + H, N_z, C_z)
            video = tok.decode(unpack(z_all)).float().clamp(0, 1)  # (B, T_c + H, H, W, 3)
            # (B, H+1, H, W, 3) from the context's last frame
            out["trace"]["imag_frames"] = (video[:, a.context - 1:] * 255).byte().cpu().numpy()
    return out


def probe_summary(res: dict, n_tasks: int) -> dict:
    """Per task: imagined and real success rates within H, and the number of start states."""
    out = {}
    for k in range(n_tasks):
        m = res["task"] == k
        if m.any():
            name = environment.TASKS[k] if k < len(environment.TASKS) else str(k)
            out[name] = {"n": int(m.sum()),
                         "imagined": float(res["imag_success"][m].mean()),
                         "real": float(res["real_success"][m].mean()),
                         "reward_head_on_real": float(res["real_pred_success"][m].mean()),
                         "imagined_return": float(res["imag_return"][m].mean()),
                         # per start, in the order of the starts every policy shares
                         "real_hits": res["real_success"][m].astype(int).tolist()}
    return out


def reward_head_quality(r_hat: np.ndarray, r: np.ndarray) -> dict:
    """How well the reward head separates true reward events from other steps (r_hat, r:
    matching arrays): AUC (probability that an event step gets a higher r̂ than a non-event
    step, a tie counting one half) and the mean r̂ of each."""
    pos, neg = r_hat[r > 0], r_hat[r <= 0]
    if not len(pos) or not len(neg):
        return {}
    higher = (pos[:, None] > neg[None]).mean()
    ties = (pos[:, None] == neg[None]).mean()
    return {"auc": float(higher + 0.5 * ties), "mean_at_events": float(pos.mean()),
            "mean_elsewhere": float(neg.mean()), "events": int(len(pos))}


def rank_agreement(probes: dict) -> dict:
    """Does the world model rank policies as the real environment does? Over every task and every
    pair of policies whose real success differs: the share of pairs that the imagined return
    Σ r̂ orders the same way. With a few starts per task most real differences are a start or
    two, as likely noise as not, so "separated" repeats the count over the pairs whose real
    difference has a 95 % interval that excludes 0 (common.bootstrap_ci, paired over the starts
    every policy shares); it needs the per-start outcomes (`real_hits`)."""
    agree = total = agree_sep = total_sep = 0
    names = list(probes)
    with_hits = all("real_hits" in v for p in probes.values() for v in p.values())
    for k in sorted(set.intersection(*(set(p) for p in probes.values()))):
        for i, p in enumerate(names):
            for q in names[i + 1:]:
                real = probes[p][k]["real"] - probes[q][k]["real"]
                if real == 0:
                    continue
                imagined = probes[p][k]["imagined_return"] - probes[q][k]["imagined_return"]
                total += 1
                agree += imagined * real > 0
                if not with_hits:
                    continue
                ci = common.bootstrap_ci([probes[p][k]["real_hits"]],
                                         paired=[probes[q][k]["real_hits"]])
                if ci["lo"] > 0 or ci["hi"] < 0:
                    total_sep += 1
                    agree_sep += imagined * real > 0
    out = {"agree": int(agree), "pairs": total, "share": agree / max(total, 1)}
    if with_hits:
        out["separated"] = {"agree": int(agree_sep), "pairs": total_sep,
                            "share": agree_sep / max(total_sep, 1)}
    return out


# ==============================================================================================
# Pictures
# ==============================================================================================


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_curve(curve: list[dict], out: str) -> None:
    """success_curve.png: real-environment success per task over training steps (step 0: the
    WM+BC policy)."""
    if not curve:
        return
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    steps = [c["step"] for c in curve]
    for i, k in enumerate(curve[0]["success"]):
        rates = [100 * c["success"][k]["rate"] for c in curve]
        ax.plot(steps, rates, "o-", color=f"C{i}", ms=3, label=k)
    ax.set_xlabel("imagination training step")
    ax.set_ylabel("success (% of episodes)")
    ax.set_ylim(-2, 102)
    ax.legend(fontsize=6, ncol=2)
    ax.set_title(f"real-environment success during imagination training "
                 f"({curve[0]['episodes']} episodes per point)", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "success_curve.png"), dpi=100)
    plt.close(fig)


def task_order(name: str) -> int:
    return environment.TASKS.index(name) if name in environment.TASKS else 0


def save_probe_picture(probes: dict, out: str, horizon: int) -> None:
    """imagined_vs_real.png: per task, imagined vs real success within H from the same states."""
    plt = _plt()
    names = list(probes)
    tasks = sorted({k for p in probes.values() for k in p}, key=task_order)
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
    axes[0].set_ylabel(f"success within H = {horizon} steps (%)")
    axes[0].set_ylim(0, 105)
    axes[0].legend(fontsize=6)
    axes[1].plot([0, 100], [0, 100], "k:", lw=0.8)
    axes[1].set_xlabel("real success (%)")
    axes[1].set_ylabel("imagined success (%)")
    axes[1].legend(fontsize=6)
    fig.suptitle("does the world model rank policies correctly? held-out start states shortly "
                 "before a reward event", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "imagined_vs_real.png"), dpi=100)
    plt.close(fig)


def save_rollout_picture(trace: dict, i: int, task: str, out: str) -> None:
    """rollout.png: one imagined rollout (decoded) with its reward and value traces, beside the
    real-environment rollout of the same policy from the same state."""
    plt = _plt()
    H = trace["imag_reward"].shape[1] - 1
    shown = np.unique(np.linspace(0, H, 9).round().astype(int))
    fig = plt.figure(figsize=(12, 5.6))
    rows = (("imag_frames", "imagined", "C3"), ("real_frames", "real", "C2"))
    for r, (key, label, color) in enumerate(rows):
        for j, t in enumerate(shown):
            ax = fig.add_subplot(4, len(shown), r * len(shown) + j + 1)
            ax.imshow(trace[key][i, t], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_color(color)
                s.set_linewidth(2)
            ax.set_title(f"{label} t={t}", fontsize=6)
    ax = fig.add_subplot(2, 1, 2)
    ax.plot(trace["imag_reward"][i], "C3-", lw=1.2, label="imagined: reward head r̂_t")
    ax.plot(trace["real_reward_pred"][i], "C2-", lw=1.2, label="real: reward head r̂_t")
    hit = np.nonzero(trace["real_reward"][i] > 0)[0]
    ax.plot(hit, np.ones(len(hit)), "kv", ms=7, label="real: true reward event")
    ax.set_xlabel("imagined / real step t (0 = last context frame)")
    ax.set_ylabel("reward")
    ax.set_ylim(-0.1, 1.3)
    ax2 = ax.twinx()  # the value lives on its own scale (a discounted sum of rewards)
    ax2.plot(trace["imag_value"][i], "C3--", lw=1, label="imagined: value v_t (right axis)")
    ax2.plot(trace["real_value"][i], "C2--", lw=1, label="real: value v_t (right axis)")
    ax2.set_ylabel("value")
    lines = ax.get_legend_handles_labels(), ax2.get_legend_handles_labels()
    ax.legend(lines[0][0] + lines[1][0], lines[0][1] + lines[1][1], fontsize=6, ncol=3,
              loc="upper left")
    fig.suptitle(f"the same policy from the same held-out state, prompted '{task}': imagined "
                 f"(red) vs real (green)", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "rollout.png"), dpi=100)
    plt.close(fig)


# ==============================================================================================
# The seed table: mean ± std over training seeds
# ==============================================================================================


# The claims the table makes: each pair's difference must have an interval that excludes 0.
CLAIMS = [("WM+BC", "BC (scratch)"), ("Dreamer 4", "WM+BC"), ("Dreamer 4", "BC (scratch)")]


def made_by(runs: list[str]) -> list[str]:
    """The commands that (re)make the imagine runs `runs`, parents first: each run's tokenizer,
    world model, BC-from-scratch baseline (its --compare), WM+BC agent and imagination run, every
    one with the flags of its args.json (common.command_for), and a re-evaluation where the
    summary was rewritten with other worlds, baseline or probes than the run was trained with.
    Each command once."""
    def read(d: str, name: str) -> dict:  # d/args.json or d/summary.json; {} if absent
        path = os.path.join(d, name)
        return json.load(open(path)) if os.path.exists(path) else {}

    def reevaluated(d: str, script: str) -> list[str]:
        args, summary = read(d, "args.json"), read(d, "summary.json")
        n = summary.get("eval_episodes")
        if n is None:
            return []
        # What the summary was evaluated with that the training command did not say
        extra = []
        compared = summary.get("compared_with")
        if compared and compared != args.get("compare"):
            extra += ["--compare", compared]
        probes = summary.get("imagined_vs_real") or {}
        starts = next((t["n"] for p in probes.values() for t in p.values()), 0)
        if starts != args.get("probe_starts", starts):
            extra += ["--probe-starts", str(starts)]
        if n == args.get("eval_episodes") and not extra:
            return []
        return [shlex.join(["python", script, d, "--eval-episodes", str(n), *extra])]

    cmds = []
    for r in runs:
        a_im = read(r, "args.json")
        agent_dir = os.path.dirname(a_im.get("agent", ""))
        a_ag = read(agent_dir, "args.json")
        dyn_dir = os.path.dirname(a_ag.get("dynamics", ""))
        tok = a_ag.get("tokenizer") or read(dyn_dir, "args.json").get("tokenizer", "")
        scratch = os.path.dirname(read(r, "summary.json").get("compared_with")
                                  or a_im.get("compare", ""))
        chain = []
        if tok:
            chain.append(common.command_for("tokenizer.py", tokenizer.Args, tokenizer.PRESETS,
                                            os.path.dirname(tok)))
        if dyn_dir:
            chain.append(common.command_for("dynamics.py", dynamics.Args, dynamics.PRESETS,
                                            dyn_dir))
        if scratch:
            chain.append(common.command_for("agent.py", ag.Args, ag.PRESETS, scratch))
            chain += reevaluated(scratch, "agent_eval.py")
        if agent_dir:
            chain.append(common.command_for("agent.py", ag.Args, ag.PRESETS, agent_dir))
        chain.append(common.command_for("imagine.py", imagine.Args, imagine.PRESETS, r))
        chain += reevaluated(r, "imagine_eval.py")
        cmds += [c for c in chain if c not in cmds]
    return cmds


def make_table(runs: list[str], out: str) -> dict:
    """The README table: success per task, mean ± std (ddof = 1) over the training seeds of
    `runs`, and where the runs kept each world's outcome, a 95 % interval from a bootstrap over
    seeds and worlds (common.bootstrap_ci) and, for each pair of CLAIMS, the interval of the
    difference on the same worlds: a claim holds only where it excludes 0.
    Writes table.md, table.json and table.png into `out`; returns the table."""
    summaries = [json.load(open(os.path.join(r, "summary.json"))) for r in runs]
    names = [n for n in POLICY_ORDER if all(n in s.get("success", {}) for s in summaries)]
    tasks = list(summaries[0]["success"][names[0]])
    with_hits = all("hits" in s["success"][n][k] for s in summaries for n in names for k in tasks)

    def hits(n, k):  # per seed: each world's outcome, in %
        return [100 * np.asarray(s["success"][n][k]["hits"]) for s in summaries]

    table = {}
    for n in names:
        table[n] = {}
        for k in tasks:
            v = [100 * s["success"][n][k]["rate"] for s in summaries]
            std = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
            table[n][k] = {"mean": float(np.mean(v)), "std": std, "values": v}
            if with_hits:
                table[n][k]["ci95"] = common.bootstrap_ci(hits(n, k))
    claims = {}
    for a_, b_ in (c for c in CLAIMS if with_hits and c[0] in names and c[1] in names):
        for k in tasks:
            ci = common.bootstrap_ci(hits(a_, k), paired=hits(b_, k))
            claims[f"{a_} − {b_}: {k}"] = {**ci, "separated": ci["lo"] > 0 or ci["hi"] < 0}
    eps = sorted({s["eval_episodes"] for s in summaries})
    how = ("mean [95 % interval, bootstrap over seeds and worlds]" if with_hits
           else "mean ± std")
    lines = [f"Real-environment success (% of episodes), {how} over {len(runs)} training "
             f"seeds, {'/'.join(map(str, eps))} held-out worlds per seed and policy.", "",
             "| task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for k in tasks:
        if with_hits:
            cells = [f"{table[n][k]['mean']:.1f} [{table[n][k]['ci95']['lo']:.1f}, "
                     f"{table[n][k]['ci95']['hi']:.1f}]" for n in names]
        else:
            cells = [f"{table[n][k]['mean']:.1f} ± {table[n][k]['std']:.1f}" for n in names]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    if claims:
        lines += ["", "Differences on the same worlds (points, 95 % interval); a claim holds "
                  "only where the interval excludes 0:", ""]
        lines += [f"- {c}: {r['mean']:+.1f} [{r['lo']:+.1f}, {r['hi']:+.1f}]"
                  f"{'' if r['separated'] else ' (not separated)'}" for c, r in claims.items()]
    lines += ["", "The commands that made these runs (each run's own flags, read from its "
              "args.json; the built-in dataset is generated by the tokenizer stage):", "", "```"]
    lines += made_by(runs) + [shlex.join(["python", "imagine_eval.py", "--table", ",".join(runs),
                                          "--out", out]), "```"]
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, "table.md"), "w").write("\n".join(lines) + "\n")
    common.write_json(os.path.join(out, "table.json"), {"runs": runs, "table": table,
                                                         "claims": claims})
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 3.6))
    w = 0.8 / len(names)
    for i, n in enumerate(names):
        x = np.arange(len(tasks)) + (i - (len(names) - 1) / 2) * w
        mean = np.array([table[n][k]["mean"] for k in tasks])
        if with_hits:  # the 95 % interval, asymmetric
            err = [mean - [table[n][k]["ci95"]["lo"] for k in tasks],
                   np.array([table[n][k]["ci95"]["hi"] for k in tasks]) - mean]
        else:
            err = [table[n][k]["std"] for k in tasks]
        ax.bar(x, mean, w, yerr=err, capsize=2, label=n)
    ax.set_xticks(range(len(tasks)), [k.replace("_", "\n") for k in tasks], fontsize=7)
    ax.set_ylabel("success (% of episodes)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7)
    ax.set_title(f"real-environment success per task, {how} over {len(runs)} training "
                 f"seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "table.png"), dpi=100)
    plt.close(fig)
    print("\n".join(lines))
    return table


# ==============================================================================================
# Re-evaluation of a finished run folder
# ==============================================================================================

EVAL_KEYS = ("compared_with", "success", "reward_head_on_real_replay", "imagined_vs_real",
             "rank_agreement")


def reevaluate(run_dir: str, device: str = "auto", **overrides) -> dict:
    """Load run_dir/ckpt.pt (and its tokenizer and latent cache), run the headline evaluation
    (imagine.evaluate) and `report` again, and rewrite run_dir/summary.json and the pictures.
    overrides: Args fields (eval_episodes, probe_starts, compare, reprompt); None keeps the run's.
    With the run's own settings the figures are those of the run (same seeds, same worlds)."""
    model, value_head, ckpt = imagine.load_imagine(os.path.join(run_dir, "ckpt.pt"))
    dev = common.pick_device(device, ckpt["args"].get("dtype", "auto"))  # the run's compute dtype
    model, value_head = model.to(dev), value_head.to(dev)
    model.eval()
    prior = copy.deepcopy(model.policy_head)
    prior.load_state_dict(ckpt["prior"])
    prior.requires_grad_(False).eval()
    fields = {f.name for f in dataclasses.fields(imagine.Args)}
    a = imagine.Args(**{k: v for k, v in ckpt["args"].items() if k in fields})
    a.out = run_dir
    for k, v in overrides.items():
        if v is not None:
            setattr(a, k, v)
    tok_path = ckpt["tokenizer"]
    tok, _ = load_tokenizer(tok_path, dev)
    held = LatentCache(os.path.dirname(os.path.abspath(tok_path)), "heldout", seed=a.seed + 1)
    meta = dict(held.meta, _root=held.data_root)
    ctx_tau = ckpt["agent_args"]["ctx_tau"]
    t0 = time.time()
    success = {}
    if a.eval_episodes > 0 and imagine.builtin_env(meta):
        success = imagine.evaluate(model, prior, tok, dev, ctx_tau, meta, a)
    path = os.path.join(run_dir, "summary.json")
    summary = json.load(open(path)) if os.path.exists(path) else {"stage": "imagine"}
    new = report(model, value_head, prior, tok, held, meta, a, ctx_tau, dev, ckpt["curve"],
                 success)
    for k in EVAL_KEYS:  # a figure not measured this time must not survive from the last time
        if k not in new:
            summary.pop(k, None)
    summary.update({"eval_episodes": a.eval_episodes, "reprompt": a.reprompt}, **new)
    summary["eval_s"] = time.time() - t0
    common.write_json(path, summary)
    print(f"rewrote {path}")
    return summary


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description="Stage 3 measuring instruments: re-evaluate a "
                                "finished imagine run, or tabulate several seeds.")
    p.add_argument("run", nargs="?", help="run folder of imagine.py (holds ckpt.pt)")
    p.add_argument("--eval-episodes", type=int, help="real-environment worlds per policy")
    p.add_argument("--probe-starts", type=int, help="held-out start states per task (0 = skip)")
    p.add_argument("--compare", help="summary.json of `agent.py --from-scratch`")
    p.add_argument("--reprompt", action=argparse.BooleanOptionalAction,
                   help="re-read the cached context on a prompt switch (default: the run's)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--table", help="comma-separated imagine run folders: the mean ± std table")
    p.add_argument("--out", help="with --table: the folder for table.md, table.json, table.png")
    args = p.parse_args(argv)
    if args.table:
        if not args.out:
            p.error("--table needs --out DIR")
        return make_table([r for r in args.table.split(",") if r], args.out)
    if not args.run:
        p.error("give a run folder (e.g. runs/smoke/imagine) or --table RUN,RUN,... --out DIR")
    return reevaluate(args.run, args.device, eval_episodes=args.eval_episodes,
                      probe_starts=args.probe_starts, compare=args.compare,
                      reprompt=args.reprompt)


if __name__ == "__main__":
    main()
