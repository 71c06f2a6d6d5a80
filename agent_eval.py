"""Measuring instruments of stage 2 (agent.py): held-out BC NLL, the reward head's event detection
on held-out episodes, the random and contractor baselines and another run's column beside the
policy's success, and the pictures success.png and reward_trace.png.

agent.py calls `report` at the end of training. Re-evaluate a finished run folder (loads
RUN_DIR/ckpt.pt, its tokenizer and the tokenizer's latent cache; rewrites RUN_DIR/summary.json and
the pictures; flags not given keep the run's own values):
    python agent_eval.py runs/agent
    python agent_eval.py runs/cpu/agent --no-reprompt --no-baselines
    python agent_eval.py runs/cpu/agent --compare runs/cpu/agent_scratch/summary.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np
import torch

import agent
import common
import environment
from dynamics import context_signal_level, corrupt, shift_actions
from tokenizer import LatentCache, load_tokenizer, pack
from tokenizer_eval import fmt


def report(model: agent.AgentModel, policy: agent.AgentPolicy, held: LatentCache, a: agent.Args,
           success: dict | None, out: str) -> dict:
    """The summary keys beyond agent.evaluate's success rates, and the pictures in `out`.

    Held-out BC NLL and move accuracy, the reward head's event detection on whole held-out
    episodes; when the policy played (`success`: {its name: per-task rates}), the random and
    contractor baselines on the same worlds (a.baselines), the column of the run in a.compare,
    success.png and reward_trace.png (one more episode of the same policy).
    """
    gen = torch.Generator(policy.device).manual_seed(a.seed + 999)  # evaluation noise
    extra = heldout_bc(model, held, a, gen)
    extra.update(reward_events(model, held, a.ctx_tau, gen))
    print(f"reward events: precision {extra['reward_precision']:.3f}, "
          f"recall {extra['reward_recall']:.3f} ({extra['reward_events']} events), "
          f"AUC {extra['reward_auc']}")
    print("  per task, AUC / recall / precision at r̂ > 0.5: " + "; ".join(
        f"{k} {fmt(extra['reward_auc_per_task'][k])} / {fmt(extra['reward_recall_per_task'][k])}"
        f" / {fmt(extra['reward_precision_per_task'][k])}" for k in held.meta["tasks"]))
    if success is None:
        return extra
    success, name = dict(success), next(iter(success))
    size, ep_len = held.meta["image_size"], held.meta.get("episode_len", 256)
    if a.baselines:
        for label, player in (("random", environment.RandomPolicy(a.seed)),
                              ("contractors", environment.ContractorPolicy(a.seed))):
            result = environment.evaluate(player, a.eval_episodes, a.seed, size, ep_len)
            success[label] = result["success"]
    other = os.path.abspath(os.path.dirname(a.compare)) if a.compare else None
    if other and other != os.path.abspath(out) and os.path.exists(a.compare):
        theirs = json.load(open(a.compare))
        if theirs.get("policy") != name:  # never replace this run's own column (another seed's)
            success[theirs["policy"]] = theirs["success"][theirs["policy"]]
            extra["compared_with"] = a.compare
    extra["success"] = success
    episode = play_episode(policy, environment.episode_seed(a.seed, "eval", 10 ** 6), size, ep_len)
    order = ["random", "contractors", "BC (scratch)", "WM+BC"]
    save_pictures({k: success[k] for k in sorted(success, key=order.index)}, episode, out,
                  f"real-environment success per task, {a.eval_episodes} evaluation worlds "
                  f"(± standard error)")
    for k in environment.TASKS:
        cells = [f"{n} {100 * s[k]['rate']:5.1f} ± {100 * s[k]['stderr']:.1f}"
                 for n, s in success.items()]
        print(f"  {k:<20s}" + " | ".join(cells))
    return extra


# ---- The heads on held-out data ------------------------------------------------------------------


@torch.no_grad()
def heldout_bc(model: agent.AgentModel, held: LatentCache, a: agent.Args,
               gen: torch.Generator) -> dict:
    """Held-out BC NLL and move accuracy at offset 0, on relevant windows (BC-masked as in training)
    with every frame at τ_ctx, as when acting. None where the held-out split has no reward event."""
    device = model.bins.device
    sampler = agent.MixtureSampler(held.latents, held.actions, held.rewards, held.episodes,
                                   a.seq_len)
    sampler.rng = np.random.default_rng([a.seed, 999])
    tau_c, d_min = context_signal_level(a.ctx_tau, model.k_max), 1.0 / model.k_max
    nll, acc = [], []
    for _ in range(a.eval_batches if sampler.events else 0):
        b = sampler.sample(0, a.batch)
        clean, acts = pack(b["latents"].to(device)), b["actions"].to(device)  # (B, T, N_z, C_z)
        noise = torch.randn(clean.shape, generator=gen, device=device)  # (B, T, N_z, C_z)
        tau = torch.full(acts.shape[:2], tau_c, device=device)  # (B, T)
        d = torch.full(acts.shape[:2], d_min, device=device)  # (B, T)
        with common.autocast(device):
            _, h = model(corrupt(noise, clean, tau_c), tau, d, *shift_actions(acts),
                         b["task"].to(device))  # (B, T, D)
            pol = model.policy(h, offset=0)  # A × (B, T, n_c)
        no_reward = torch.zeros(acts.shape[:2], device=device)  # (B, T)
        m = agent.mtp_targets(acts, no_reward, 1, b["event"].to(device))["bc"][..., 0]  # (B, T)
        nll.append(float((-agent.action_log_prob(pol, acts) * m).sum() / m.sum()))
        acc.append(float(((pol[0].argmax(-1) == acts[..., 0]).float() * m).sum() / m.sum()))
    out = {"heldout_bc_nll": float(np.mean(nll)) if nll else None,
           "heldout_move_acc": float(np.mean(acc)) if acc else None}
    print(f"held-out BC NLL {out['heldout_bc_nll']}, move accuracy {out['heldout_move_acc']}")
    return out


@torch.no_grad()
def predict_rewards(model: agent.AgentModel, clean: torch.Tensor, actions: torch.Tensor,
                    ctx_tau: float, gen: torch.Generator) -> torch.Tensor:
    """r̂_t (offset 0) of every task prompt along one whole episode, frames at τ_ctx as when acting.

    clean (T, N_z, C_z) packed latents, actions (T, A). One pass per episode: time attention is
    windowed to C, so this equals stepping with the KV cache. Returns (n_tasks, T).
    """
    K, T, dev = model.n_tasks, clean.shape[0], clean.device
    tau_c = context_signal_level(ctx_tau, model.k_max)
    noise = torch.randn(clean[None].shape, generator=gen, device=dev)  # (1, T, N_z, C_z)
    z = corrupt(noise, clean[None].float(), tau_c)  # (1, T, N_z, C_z)
    prev, valid = shift_actions(actions[None])  # (1, T, A), (1, T)
    tau = torch.full((K, T), tau_c, device=dev)
    d = torch.full((K, T), 1.0 / model.k_max, device=dev)
    with common.autocast(dev):  # one row per task prompt: the same frames and noise
        _, h = model(z.expand(K, -1, -1, -1), tau, d, prev.expand(K, -1, -1),
                     valid.expand(K, -1), torch.arange(K, device=dev))  # (K, T, D)
        return model.reward(h, 0).float()  # (K, T)


@torch.no_grad()
def reward_events(model: agent.AgentModel, held: LatentCache, ctx_tau: float,
                  gen: torch.Generator) -> dict:
    """The reward head's event detection on whole held-out episodes: every frame 1…n−1, every task
    prompt; r̂_t > 0.5 counts as a predicted event. Precision, recall, F1, AUC and means."""
    device = model.bins.device
    scores, trues = [], []
    for e in held.episodes:
        o, n = e["offset"], e["length"]
        lat = torch.from_numpy(np.array(held.latents[o:o + n], dtype=np.float32))  # (n, N_b, D_b)
        clean = pack(lat).to(device)  # (n, N_z, C_z)
        acts = torch.from_numpy(np.array(held.actions[o:o + n])).to(device)  # (n, A)
        trues.append(np.array(held.rewards[o + 1:o + n]).T > 0)  # (n_tasks, n − 1)
        r_hat = predict_rewards(model, clean, acts, ctx_tau, gen)  # (n_tasks, n)
        scores.append(r_hat[:, 1:].cpu().numpy())  # (n_tasks, n − 1)
    r_hat, true = np.concatenate(scores, 1), np.concatenate(trues, 1)  # (n_tasks, Σ(n − 1))
    pred = r_hat > 0.5
    tp, fp, fn = int((pred & true).sum()), int((pred & ~true).sum()), int((~pred & true).sum())
    prec, rec = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    tasks = list(enumerate(held.meta["tasks"]))
    per_task = {name: float(pred[k][true[k]].mean()) if true[k].any() else None
                for k, name in tasks}
    precision_per_task = {name: float(true[k][pred[k]].mean()) if pred[k].any() else None
                          for k, name in tasks}
    return {"reward_precision": prec, "reward_recall": rec,
            "reward_f1": 2 * prec * rec / max(prec + rec, 1e-9),
            "reward_events": tp + fn, "reward_predicted": tp + fp,
            "reward_auc": auc(r_hat.ravel(), true.ravel()),
            "reward_mean_at_events": float(r_hat[true].mean()) if true.any() else None,
            "reward_mean_elsewhere": float(r_hat[~true].mean()),
            "reward_recall_per_task": per_task,
            "reward_precision_per_task": precision_per_task,
            "reward_auc_per_task": {name: auc(r_hat[k], true[k]) for k, name in tasks}}


def auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve = P(score of an event > score of a non-event), ties counted half."""
    P, N = int(labels.sum()), int((~labels).sum())
    if not P or not N:
        return None
    _, inv, counts = np.unique(scores, return_inverse=True, return_counts=True)
    rank = (np.cumsum(counts) - (counts - 1) / 2)[inv]  # average 1-based rank of every score
    return float((rank[labels].sum() - P * (P + 1) / 2) / (P * N))


def play_episode(policy: agent.AgentPolicy, seed: int, image_size: int, episode_len: int) -> dict:
    """One real-environment episode of the policy: frames, actions, rewards, prompts, and
    afterwards the reward head's r̂_t for every task prompt along it (for reward_trace.png)."""
    env = environment.Env(image_size, episode_len)
    frame = env.reset(seed)
    policy.reset(1)
    rec = {"frames": [], "actions": [], "rewards": [np.zeros(len(environment.TASKS), np.float32)],
           "task": []}
    for t in range(episode_len):
        rec["frames"].append(frame)
        rec["actions"].append(policy.act(frame[None])[0])
        rec["task"].append(int(policy.task[0]))
        if t == episode_len - 1:
            break
        frame, r, _, _ = env.step(rec["actions"][-1])
        rec["rewards"].append(r)
    ep = {k: np.stack(v) for k, v in rec.items()}
    dev = policy.device
    frames = torch.from_numpy(ep["frames"]).to(dev)[None]  # (1, T, H, W, 3) uint8
    with torch.no_grad(), common.autocast(dev):
        clean = pack(policy.tok.encode(frames)).float()[0]  # (T, N_z, C_z)
    acts = torch.from_numpy(ep["actions"]).to(dev)  # (T, A)
    gen = torch.Generator(dev).manual_seed(seed)
    ep["pred"] = predict_rewards(policy.model, clean, acts, policy.ctx_tau, gen).cpu().numpy()
    return ep  # ep["pred"]: (n_tasks, T)


# ---- Pictures ------------------------------------------------------------------------------------


def save_pictures(success: dict, episode: dict | None, out: str, title: str) -> None:
    """success.png: success per task with standard errors for every policy evaluated;
    reward_trace.png: one real-environment episode of the policy, frames at its events and the
    reward head's prediction."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, tasks = list(success), list(next(iter(success.values())))
    fig, ax = plt.subplots(figsize=(10, 3.6))
    w = 0.8 / len(names)
    for i, name in enumerate(names):
        rate = [100 * success[name][k]["rate"] for k in tasks]
        err = [100 * success[name][k]["stderr"] for k in tasks]
        x = np.arange(len(tasks)) + (i - (len(names) - 1) / 2) * w
        ax.bar(x, rate, w, yerr=err, capsize=2, label=name)
    ax.set_xticks(range(len(tasks)), [k.replace("_", "\n") for k in tasks], fontsize=7)
    ax.set_ylabel("success (% of episodes)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "success.png"), dpi=100)
    plt.close(fig)
    if episode is None:
        return
    T = episode["pred"].shape[1]
    events = [int(t) for t in np.nonzero(episode["rewards"].max(1) > 0)[0]]
    spread = [int(t) for t in np.linspace(0, T - 1, 12 - min(len(events), 6))]
    shown = sorted(set(events[:6] + spread))[:12]
    fig = plt.figure(figsize=(12, 4.6))
    for i, t in enumerate(shown):
        ax = fig.add_subplot(2, len(shown), i + 1)
        ax.imshow(episode["frames"][t], interpolation="nearest")
        ax.axis("off")
        star = t in events
        ax.set_title(f"t={t}" + (" ★" if star else ""), fontsize=7, color="C3" if star else "k")
    ax = fig.add_subplot(2, 1, 2)
    # r̂_t per prompt (lines), true events (▼), one colour per task
    for k, name in enumerate(environment.TASKS):
        ax.plot(episode["pred"][k], lw=0.8, color=f"C{k}", label=name)
        hit = np.nonzero(episode["rewards"][:, k] > 0)[0]
        ax.plot(hit, np.ones(len(hit)) * 1.1, "v", color=f"C{k}", ms=7)
    ax.step(range(T), np.asarray(episode["task"]) / 10, "k", where="post", lw=0.6, alpha=0.4)
    ax.set_xlabel("time step")
    ax.set_ylabel("predicted reward r̂_t")
    ax.set_ylim(-0.1, 1.25)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))  # never hides an event
    fig.suptitle("one real-environment episode of the policy: the reward head's r̂_t for every "
                 "task prompt (lines), true reward events (▼), prompt ladder index / 10 (grey)",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "reward_trace.png"), dpi=100)
    plt.close(fig)


# ---- Re-evaluating a finished run: python agent_eval.py RUN_DIR [--flags] ------------------------

EVAL_FLAGS = ("eval_episodes", "eval_batches", "baselines", "reprompt", "compare", "device")


def reevaluate(run_dir: str, **changes) -> dict:
    """Evaluate RUN_DIR/ckpt.pt as train() does at its end, with the run's own arguments except
    `changes` (fields of EVAL_FLAGS); rewrite RUN_DIR/summary.json (training keys kept) and the
    pictures. Returns the summary."""
    assert set(changes) <= set(EVAL_FLAGS), f"only {EVAL_FLAGS} can change, got {sorted(changes)}"
    path = os.path.join(run_dir, "ckpt.pt")
    model, ckpt = agent.load_agent(path)
    known = {f.name for f in dataclasses.fields(agent.Args)}
    a = agent.Args(**{k: v for k, v in ckpt["args"].items() if k in known})  # older runs: more
    a = dataclasses.replace(a, **changes)
    common.seed_everything(a.seed)
    device = common.pick_device(a.device, a.dtype)  # the run's dtype
    model = model.to(device)
    tok, _ = load_tokenizer(ckpt["tokenizer"], device)
    held = LatentCache(os.path.dirname(ckpt["tokenizer"]), "heldout", seed=a.seed + 1)
    summary_path = os.path.join(run_dir, "summary.json")
    summary = json.load(open(summary_path)) if os.path.exists(summary_path) else {"stage": "agent"}
    for key in ("success", "compared_with"):  # this evaluation's columns replace the old ones
        summary.pop(key, None)
    summary.update(eval_episodes=a.eval_episodes, reprompt=a.reprompt)
    model.eval()
    t0 = time.time()
    policy = agent.AgentPolicy(model, tok, device, a.ctx_tau, a.seed, a.reprompt)
    summary.update(agent.evaluate(policy, held.meta, a))
    summary.update(report(model, policy, held, a, summary.get("success"), run_dir))
    if "success" not in summary:  # no episode played: the old pictures no longer apply
        for name in ("success.png", "reward_trace.png"):
            if os.path.exists(os.path.join(run_dir, name)):
                os.remove(os.path.join(run_dir, name))
    summary["eval_s"] = time.time() - t0
    common.write_json(summary_path, summary)
    print("summary:", json.dumps(summary))
    return summary


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description="Re-evaluate a finished agent.py run folder.")
    p.add_argument("run_dir", help="folder of an agent.py run (holds ckpt.pt)")
    p.add_argument("--eval-episodes", type=int, help="real-environment episodes per policy")
    p.add_argument("--eval-batches", type=int, help="held-out batches for the BC metrics")
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction,
                   help="also evaluate the random and contractor policies")
    p.add_argument("--reprompt", action=argparse.BooleanOptionalAction,
                   help="on a prompt switch, re-read the cached context under the new task")
    p.add_argument("--compare", help="summary.json of another agent run, drawn beside this one")
    p.add_argument("--device", help="auto | cpu | cuda | mps")
    given = vars(p.parse_args(argv))
    run_dir = given.pop("run_dir")
    reevaluate(run_dir, **{k: v for k, v in given.items() if v is not None})


if __name__ == "__main__":
    main()
