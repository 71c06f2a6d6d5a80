"""Measuring instruments of stage 1b (dynamics.py): baselines, probes, speed, pictures.

dynamics.evaluate gives the stage's headline figures (held-out rollout PSNR for K = 4 and
K = K_max, the repeat-last baseline, the action-shuffle gap); this module adds what tells them
apart and draws them:
    rollout_baselines   latent-space errors, the repeat-last baseline through the decoder, the
                        tokenizer's own reconstruction (a ceiling), the environment itself replayed
    moving_pixel_scores PSNR on the pixels that change and on the static rest, and the collapse
                        alarm (the generated frames do not move where the real ones do)
    loss_by_tau_d       held-out Eq 7 loss per step size d and per signal level τ
    action_probe        action use without sampling noise (one teacher-forced step)
    generation_speed    frames/s at batch 1 with the KV cache; cached vs uncached
    save_pictures       rollout.png, rollout.gif, rollout_psnr.png, loss_tau_d.png
    action_following    generated frames read back into the agent's tile, facing and inventory
                        against the real environment, beside baselines; actions shifted ±1 frame
                        (built-in datasets only; follow.png)
    event_strength      how much of each kind of action effect (a move, the first crack on a
                        tree, a tree felled, a table placed) the model's next frame holds, one
                        step after a real history (built-in datasets only)
dynamics.train calls `report` at its end. Re-evaluate a finished run folder (its checkpoint's
model and data; the flags given here override its evaluation settings) and rewrite its
summary.json and pictures:
    python dynamics_eval.py runs/cpu/dynamics --eval-seqs 128
The world model that stage 2 finetuned (agent.py, phase 2: the same transformer trained on with the
BC and reward terms beside the video loss) and that imagine.py trains the policy in, with the same
figures, written to its own folder:
    python dynamics_eval.py runs/cpu/dynamics --weights runs/cpu/agent/ckpt.pt
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

import common
import data
import dynamics
import environment
from dynamics import (Args, context_signal_level, corrupt, decode_after, forcing_batch,
                      psnr_scores, rollout, row_select, shift_actions, shortcut_forcing_loss)
from tokenizer import LatentCache, load_tokenizer, pack
from tokenizer_eval import (COLLAPSE_RECALL, changed_mask, changed_overlay, collapse_warning,
                            finite_or_none, fmt, masked_psnr, motion_figures)


def report(model, tok, held: LatentCache, a: Args, device, figures: dict, rollouts: dict) -> dict:
    """The summary keys beyond the headline figures (each instrument seeds its own generators);
    writes the pictures into a.out. figures, rollouts: what dynamics.evaluate returned."""
    n_actions = 0 if held.actions is None else len(model.action_classes)
    out, recon = rollout_baselines(tok, held, rollouts, a, device)
    out.update(moving_pixel_scores(rollouts, recon, a))
    probe = loss_by_tau_d(model, held, a, device)
    out.update(probe)
    out.update(action_probe(model, held, a, device))
    Tc, k = a.eval_context, a.sample_k
    generated = torch.cat([recon[:, :Tc], rollouts["pixels"][f"k{k}"]], 1)  # (B, T, H, W, 3)
    save_pictures({**figures, **out}, rollouts["true"], generated, probe, a)
    out.update(generation_speed(model, device, k, a.ctx_tau, a.fps_frames, n_actions))
    # A figure that does not apply to this dataset is named as such, never printed as "nan".
    probe = (f"one-step probe {out['probe_mse_true']:.4f} vs shuffled "
             f"{out['probe_mse_shuffled']:.4f} (copy {out['probe_mse_copy']:.4f})"
             if "probe_mse_true" in out else
             "one-step probe: does not apply (no actions, or no held-out window to shuffle)")
    replay = (f"the environment itself {out['psnr_simulator']:.2f} dB, shuffle gap "
              f"{out['action_shuffle_gap_simulator_db']:.2f} dB" if "psnr_simulator" in out else
              "environment replay: does not apply (not a labelled built-in dataset)")
    print(f"eval: repeat-last decoded {out['psnr_repeat_last_decoded']:.2f} dB, tokenizer "
          f"ceiling {out['psnr_tokenizer_ceiling']:.2f} dB | {probe} | {replay} | latent MSE "
          f"K={k} {out[f'latent_mse_k{k}']:.4f} vs repeat-last "
          f"{out['latent_mse_repeat_last']:.4f} | {out['gen_fps']:.0f} frames/s (batch 1, K={k}, "
          f"cache) | cache speed-up ×{out['cache_speedup_ctx32']:.1f} at 32 context frames")
    out.update(action_following(model, tok, held, a, device, rollouts, recon))  # built-in data
    out.update(event_strength(model, tok, held, a, device))  # built-in data
    return out


@torch.no_grad()
def rollout_baselines(tok, held: LatentCache, ro: dict, a: Args,
                      device) -> tuple[dict, torch.Tensor]:
    """Baselines beside the held-out rollouts of dynamics.evaluate (same windows, same scoring).

    Latent MSE of each rollout and of repeating the last context latent (independent of the
    decoder); that repeat decoded (the same decoder error as a rollout); the tokenizer's own
    reconstruction of the true frames (the ceiling the dynamics cannot beat); and, for built-in
    datasets (data.simulate_future), the environment itself replayed to the last context frame and
    stepped with the true or the shuffled actions, fresh draws for what nobody controls: what a
    perfect world model would score. Returns (figures, the tokenizer's reconstruction
    (B, T, H_px, W_px, 3) for the pictures).
    """
    Tc, H = a.eval_context, a.eval_horizon
    lat, true = ro["latents"], ro["true"]  # (B, T, N_b, D_b), (B, T, H_px, W_px, 3)
    ctx, target = pack(lat[:, :Tc]), pack(lat[:, Tc:])  # (B, T_c, N_z, C_z), (B, H, N_z, C_z)
    out = {}
    for name, z in ro["z"].items():  # k4, k64 (on the first len(z) windows), shuffled
        key = f"latent_mse_k{a.sample_k}_shuffled" if name == "shuffled" else f"latent_mse_{name}"
        out[key] = float((z - target[:len(z)]).pow(2).mean())
    out["latent_mse_repeat_last"] = float((ctx[:, -1:] - target).pow(2).mean())
    repeat = decode_after(tok, lat[:, :Tc], ctx[:, -1:].expand(-1, H, -1, -1), device)
    out.update(psnr_scores("repeat_last_decoded", repeat, true[:, Tc:]))
    with common.autocast(device):
        recon = tok.decode(lat).float().clamp(0, 1)  # (B, T, H_px, W_px, 3)
    out.update(psnr_scores("tokenizer_ceiling", recon[:, Tc:], true[:, Tc:]))
    if ro["shuffled"] is not None:
        batch, sim = ro["batch"], []
        windows = zip(batch["episode_ids"], batch["episode_starts"], ro["actions"], ro["shuffled"])
        for j, (episode, start, *plans) in enumerate(windows):
            plans = [p[Tc - 1:Tc - 1 + H].cpu().numpy() for p in plans]  # [true, shuffled] (H, A)
            sim.append(data.simulate_future(held.data_root, episode, start + Tc - 1, plans,
                                            rng_seed=(a.seed, j), meta=held.meta))
        if all(x is not None for x in sim):  # None: not a built-in dataset
            for n, name in enumerate(("simulator", "simulator_shuffled")):
                x = torch.from_numpy(np.stack([s[n] for s in sim]))  # (B, H, H_px, W_px, 3) uint8
                out.update(psnr_scores(name, x.to(device).float() / 255, true[:, Tc:]))
            gap = out["psnr_simulator"] - out["psnr_simulator_shuffled"]
            out["action_shuffle_gap_simulator_db"] = gap
    return out, recon


# ---- Moving pixels: rollout PSNR where the frames change, and the collapse alarm ----------------


def split_scores(name: str, x: torch.Tensor, true: torch.Tensor, changed: torch.Tensor) -> dict:
    """Rollout PSNR of x against true (B, H, H_px, W_px, 3) on the changed pixels (B, H, H_px, W_px)
    and on the static rest, per horizon (pooled over the windows) and averaged over the horizons
    as psnr_scores does; None where a horizon has no such pixel."""
    out = {}
    for part, mask in (("changed", changed), ("static", ~changed)):
        per_horizon = masked_psnr(x, true, mask, dims=(0, 2, 3))  # (H,)
        scored = per_horizon[~per_horizon.isnan()]
        out[f"psnr_{part}_{name}_per_horizon"] = [finite_or_none(v) for v in per_horizon]
        out[f"psnr_{part}_{name}"] = float(scored.mean()) if len(scored) else None
    return out


@torch.no_grad()
def moving_pixel_scores(ro: dict, recon: torch.Tensor, a: Args) -> dict:
    """Changed- and static-pixel PSNR of the K = sample_k rollouts, the repeat-last baseline and
    the tokenizer ceiling, on the windows of dynamics.evaluate; how much the generated frames and
    the reconstructions move where the real frames move; the collapse alarm (printed when it
    fires). A pixel of generated frame h changes when the real frame h differs from frame h − 1
    (the last context frame for h = 1). recon: the tokenizer's reconstruction (B, T, H_px, W_px, 3).
    """
    Tc, k = a.eval_context, f"k{a.sample_k}"
    true = ro["true"]  # (B, T, H_px, W_px, 3)
    changed = changed_mask(true[:, Tc - 1:-1], true[:, Tc:])  # (B, H, H_px, W_px)
    out = {"changed_pixel_frac": float(changed.float().mean()),
           "changed_pixel_frac_per_horizon": changed.float().mean((0, 2, 3)).tolist()}
    repeat = true[:, Tc - 1:Tc].expand_as(true[:, Tc:])  # (B, H, H_px, W_px, 3)
    for name, x in ((k, ro["pixels"][k]), ("repeat_last", repeat),
                    ("tokenizer_ceiling", recon[:, Tc:])):
        out.update(split_scores(name, x, true[:, Tc:], changed))
    # The model's frames move from its own picture of the last context frame (the reconstruction).
    generated = torch.cat([recon[:, Tc - 1:Tc], ro["pixels"][k]], 1)  # (B, H + 1, H_px, W_px, 3)
    for name, x in ((k, generated), ("tokenizer_ceiling", recon[:, Tc - 1:])):
        motion = motion_figures(true[:, Tc - 1:-1], true[:, Tc:], x[:, :-1], x[:, 1:])
        out[f"motion_recall_{name}"] = motion["recall"]
        out[f"motion_ratio_{name}"] = motion["ratio"]
    recalls = {name: out[f"motion_recall_{name}"] for name in ("tokenizer_ceiling", k)}
    collapsed = [n for n, r in recalls.items() if r is not None and r < COLLAPSE_RECALL]
    out["collapse_alarm"] = bool(collapsed)
    print(f"moving pixels ({out['changed_pixel_frac']:.2%} change): PSNR on them K={a.sample_k} "
          f"{fmt(out[f'psnr_changed_{k}'])} dB, repeat-last {fmt(out['psnr_changed_repeat_last'])}"
          f" dB, tokenizer ceiling {fmt(out['psnr_changed_tokenizer_ceiling'])} dB | motion "
          f"recall K={a.sample_k} {fmt(recalls[k])}, ceiling {fmt(recalls['tokenizer_ceiling'])}")
    if "tokenizer_ceiling" in collapsed:
        collapse_warning(
            "tokenizer, seen from the dynamics", recalls["tokenizer_ceiling"],
            out["motion_ratio_tokenizer_ceiling"],
            "The tokenizer's own reconstructions of the true frames drop what moves: the latents "
            "the dynamics\n!! learns from hold no motion, so every rollout figure here looks fine "
            "and means nothing.",
            "fix the tokenizer first (its summary.json: collapse_alarm, recon_psnr_changed_db);\n"
            "!! train it longer or with LPIPS, then re-encode the latent cache.")
    elif collapsed:
        collapse_warning(
            f"dynamics, K = {a.sample_k}", recalls[k], out[f"motion_ratio_{k}"],
            "The tokenizer keeps the motion but the generated frames barely move: the model "
            "repeats the\n!! context (compare psnr_changed with the repeat-last baseline).",
            "train longer; check the action figures (action_shuffle_gap_db, probe_action_cost);\n"
            "!! look at rollout.png (changed pixels in magenta).")
    return out


def next_frame_levels(B: int, T: int, a: Args, d_last: float, device) -> tuple:
    """(τ, d), each (B, T), of one step after a history: the T − 1 history frames at τ_ctx tagged
    d_min, the last frame from pure noise (τ = 0; τ = 1 is clean) at step size d_last."""
    tau = torch.full((B, T), context_signal_level(a.ctx_tau, a.k_max), device=device)  # (B, T)
    tau[:, -1] = 0.0
    d = torch.full((B, T), 1.0 / a.k_max, device=device)  # (B, T)
    d[:, -1] = d_last
    return tau, d


@torch.no_grad()
def action_probe(model, held: LatentCache, a: Args, device, T: int = 8) -> dict:
    """Action use without sampling noise (not in paper): T − 1 held-out history frames at τ_ctx,
    the last from pure noise in one pass (τ = 0, d = d_min: the regression mean). Latent MSE with
    the true vs a shuffled last action where they differ, beside copying the last history frame.
    """
    held.rng = np.random.default_rng([a.seed, 997])
    n = 8 * a.eval_seqs  # 256 windows at the cpu preset
    batch = held.sample(n, T)
    if batch["actions"] is None:
        return {}
    clean = pack(batch["latents"].to(device))  # (B, T, N_z, C_z)
    acts = batch["actions"].to(device)  # (B, T, A)
    shuffled = acts.clone()
    shuffled[:, T - 2] = acts[torch.roll(torch.arange(n), 1), T - 2]  # a_{T−2} leads to the last
    differs = (shuffled[:, T - 2] != acts[:, T - 2]).any(-1)  # (B,)
    if not differs.any():  # (tiny held-out splits)
        return {}
    tau, d = next_frame_levels(n, T, a, 1.0 / a.k_max, device)  # (B, T) each
    gen = torch.Generator(device).manual_seed(a.seed + 997)
    noise = torch.randn(clean.shape, generator=gen, device=device)
    z_tilde = corrupt(noise, clean, tau)  # Eq 6, τ = 1 clean
    out = {}
    for name, ac in (("true", acts), ("shuffled", shuffled)):
        with common.autocast(device):
            z1_hat = model(z_tilde, tau, d, *shift_actions(ac)).float()[:, -1]  # (B, N_z, C_z)
        mse = (z1_hat - clean[:, -1]).pow(2).mean((-2, -1))  # (B,)
        out[f"probe_mse_{name}"] = float(mse[differs].mean())
    copy_mse = (clean[:, -2] - clean[:, -1]).pow(2).mean((-2, -1))  # (B,)
    out["probe_mse_copy"] = float(copy_mse[differs].mean())
    out["probe_action_cost"] = out["probe_mse_shuffled"] / out["probe_mse_true"] - 1  # 0: blind
    return out


@torch.no_grad()
def loss_by_tau_d(model, held: LatentCache, a: Args, device, repeats: int = 4) -> dict:
    """Unweighted Eq 7 per-frame loss on held-out data, grouped by d and by τ (8 bins), with
    (τ, d) drawn as in training (Eq 4 with the run's --flow-frac and --k-min)."""
    held.rng = np.random.default_rng([a.seed, 998])
    gen = torch.Generator(device).manual_seed(a.seed + 998)
    taus, ds, losses = [], [], []
    for _ in range(repeats):
        batch = held.sample(max(2, a.eval_seqs // 2), a.seq_len)
        acts = None if batch["actions"] is None else batch["actions"].to(device)
        fb = forcing_batch(batch["latents"].to(device), acts, a.k_max, 0.0, gen, a.k_min,
                           a.flow_frac)

        def f(z, tau, d, rows=None):
            return model(z, tau, d, *row_select(fb, rows)).float()

        with common.autocast(device):
            terms = shortcut_forcing_loss(f, fb["clean"], fb["noise"], fb["tau"], fb["d"],
                                          a.k_max, a.boot_clip)
        taus.append(fb["tau"].flatten())
        ds.append(fb["d"].flatten())
        losses.append(terms["per_frame"].flatten())
    tau, d, loss = torch.cat(taus).cpu(), torch.cat(ds).cpu(), torch.cat(losses).float().cpu()
    by_d = {f"1/{round(1 / v)}": float(loss[d == v].mean())
            for v in sorted(d.unique().tolist(), reverse=True)}
    bins = (tau * 8).floor().clamp(max=7)
    by_tau = {"flow": [], "boot": []}
    for name, sel in (("flow", d == 1.0 / a.k_max), ("boot", d > 1.0 / a.k_max)):
        for b in range(8):
            m = sel & (bins == b)
            by_tau[name].append(float(loss[m].mean()) if m.any() else None)
    return {"loss_by_d": by_d, "loss_by_tau_bin": by_tau}


@torch.no_grad()
def generation_speed(model, device, k: int, ctx_tau: float, n_frames: int,
                     n_actions: int) -> dict:
    """Frames/s at batch 1 with the KV cache (K = k), and cached vs uncached at 32 context frames.

    Speed does not depend on content, so random latents and actions are used.
    """
    gen = torch.Generator(device).manual_seed(0)

    def latents(T):  # (1, T, N_z, C_z) random latents in the tanh range
        shape = (1, T, model.latent_tokens, model.latent_dim)
        return torch.tanh(torch.randn(*shape, device=device))

    def actions(T):  # (1, T, A) or None
        if not n_actions:
            return None
        return torch.zeros(1, T, n_actions, dtype=torch.long, device=device)

    def timed(Tc, n, use_cache):
        common.sync_device(device)
        t0 = time.time()
        with common.autocast(device):
            rollout(model, latents(Tc), actions(Tc + n), n, k, ctx_tau, gen, use_cache)
        common.sync_device(device)
        return time.time() - t0

    timed(8, 2, True)  # warm-up
    fps = n_frames / timed(8, n_frames, True)
    n = max(2, min(8, n_frames))
    t_cached, t_uncached = timed(32, n, True), timed(32, n, False)
    return {"gen_fps": fps, "gen_fps_ctx32_uncached": n / t_uncached,
            "gen_fps_ctx32_cached": n / t_cached, "cache_speedup_ctx32": t_uncached / t_cached}


def save_pictures(ev: dict, true: torch.Tensor, generated: torch.Tensor, probe: dict | None,
                  a: Args) -> None:
    """rollout.png (rows: true | generated | |error|×4 | the true frames' changed pixels in
    magenta; context framed green, generated red),
    rollout.gif, rollout_psnr.png (PSNR per horizon against the baselines), loss_tau_d.png (loss
    per τ and per d). true, generated: (B, T, H_px, W_px, 3), the context of `generated` being the
    tokenizer's reconstruction."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    n_ctx, out = a.eval_context, a.out
    true, gen = true[:4].cpu().numpy(), generated[:4].cpu().numpy()  # (S, T, H, W, 3) each
    S, T, Hp, Wp, _ = true.shape
    p = 2  # border width
    green, red, grey = np.array([0.1, 0.8, 0.1]), np.array([0.9, 0.1, 0.1]), np.array([0.5] * 3)

    def tile(img, color):
        framed = np.ones((Hp + 2 * p, Wp + 2 * p, 3)) * color
        framed[p:-p, p:-p] = img
        return framed

    def context_color(t, after):
        return green if t < n_ctx else after

    rows = []
    for s in range(S):
        err = np.abs(gen[s] - true[s]).mean(-1, keepdims=True).repeat(3, -1) * 4  # (T, H, W, 3)
        rows.append(np.concatenate([tile(true[s, t], context_color(t, grey)) for t in range(T)], 1))
        rows.append(np.concatenate([tile(gen[s, t], context_color(t, red)) for t in range(T)], 1))
        rows.append(np.concatenate([tile(np.clip(err[t], 0, 1), grey) for t in range(T)], 1))
        moved = changed_overlay(true[s])  # (T, H, W, 3) the real frames' changed pixels, magenta
        rows.append(np.concatenate([tile(moved[t], grey) for t in range(T)], 1))
    canvas = np.concatenate(rows, 0)  # (4·S·(H+2p), T·(W+2p), 3)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * T), max(3, 2.4 * S)))
    ax.imshow(canvas, interpolation="nearest")
    h, w = Hp + 2 * p, Wp + 2 * p
    labels = ["true", f"decoded, K={a.sample_k}", "|err|×4", "changed"] * S
    ax.set_yticks([h * (i + 0.5) for i in range(4 * S)], labels, fontsize=7)
    ax.set_xticks([w * (t + 0.5) for t in range(T)], [str(t - n_ctx + 1) for t in range(T)],
                  fontsize=6)
    ax.set_title(f"held-out open-loop rollouts, true actions: {n_ctx} context frames (green; "
                 f"second row: tokenizer reconstruction), generated (red)", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "rollout.png"), dpi=100)
    plt.close(fig)

    # GIF: true | generated side by side per sequence, one GIF frame per time step
    scale = max(1, 128 // Hp)
    gif = []
    for t in range(T):
        pairs = [np.concatenate([tile(true[s, t], context_color(t, grey)),
                                 tile(gen[s, t], context_color(t, red))], 1) for s in range(S)]
        img = Image.fromarray((np.clip(np.concatenate(pairs, 1), 0, 1) * 255).astype(np.uint8))
        gif.append(img.resize((img.width * scale, img.height * scale), Image.NEAREST))
    gif[0].save(os.path.join(out, "rollout.gif"), save_all=True, append_images=gif[1:],
                duration=200, loop=0)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    hz = np.arange(1, len(ev["psnr_repeat_last_per_horizon"]) + 1)
    for key, label in ((f"psnr_k{a.sample_k}_per_horizon", f"K = {a.sample_k}"),
                       (f"psnr_k{a.k_max}_per_horizon",
                        f"K = {a.k_max} (first {ev.get('eval_seqs_kmax')} windows)"),
                       (f"psnr_k{a.sample_k}_kmax_windows_per_horizon",
                        f"K = {a.sample_k} on those windows"),
                       ("psnr_shuffled_per_horizon", f"K = {a.sample_k}, shuffled actions"),
                       ("psnr_repeat_last_per_horizon", "repeat last context frame"),
                       ("psnr_repeat_last_decoded_per_horizon",
                        "repeat last context latent, decoded")):
        if key in ev:
            ax.plot(hz, ev[key], "o-", ms=3, label=label)
    ax.axhline(ev["psnr_tokenizer_ceiling"], color="k", ls=":", label="tokenizer reconstruction")
    ax.set_xlabel("frames after the context")
    ax.set_ylabel("PSNR of the mean squared error (dB)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "rollout_psnr.png"), dpi=100)
    plt.close(fig)

    if probe is not None:
        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
        centres = (np.arange(8) + 0.5) / 8
        for name, vals in probe["loss_by_tau_bin"].items():
            vals = [np.nan if v is None else v for v in vals]
            left.plot(centres, vals, "o-", label=f"{name} frames")
        left.set_yscale("log")
        left.set_xlabel("signal level τ (0 = noise, 1 = clean)")
        left.set_ylabel("Eq 7 loss")
        left.legend(fontsize=7)
        right.bar(list(probe["loss_by_d"]), list(probe["loss_by_d"].values()))
        right.set_yscale("log")
        right.set_xlabel("step size d")
        right.set_title("unweighted loss per d", fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "loss_tau_d.png"), dpi=100)
        plt.close(fig)


# ==== Action following: generated frames read back into a state (built-in environment only) ====
# The built-in frames are sprites on an 8 × 8 grid of tiles, so a frame can be parsed back into the
# agent's tile, its facing and the inventory. environment.decode_frames needs the exact pixels of
# Env's sprites, which a tokenizer decoder never reproduces: generated frames are read tile by
# tile as the nearest sprite instead (`environment.read_frames`), and a frame in which not
# exactly one tile reads as the agent counts as wrong.
FOLLOW_WHAT = ("tile", "facing", "inventory")


def agent_of(app: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The agent's tile (flat index r·COLS + c) and facing (0 up, 1 down, 2 left, 3 right) in
    appearance ids app (B, ROWS, COLS); both −1 where not exactly one tile shows the agent."""
    flat = app.reshape(len(app), -1)  # (B, 56)
    is_agent = (flat >= environment.AGENT_APP) & (flat < environment.CREATURE_APP)  # (B, 56)
    one = is_agent.sum(-1) == 1  # (B,)
    cell = is_agent.argmax(-1)  # (B,)
    facing = (flat[np.arange(len(flat)), cell] - environment.AGENT_APP) % 4  # (B,)
    return np.where(one, cell, -1), np.where(one, facing, -1)


def follow_hits(frames, real: np.ndarray) -> dict:
    """Per window and horizon step, is the state read from frames (B, H, H_px, W_px, 3) in
    0…255 that of the real environment's frames real (B, H, H_px, W_px, 3) uint8? Returns tile
    (agent on the right tile), facing (right tile and facing), inventory (all 7 counts), each a
    (B, H) bool array."""
    B, H = real.shape[:2]
    got = environment.read_frames(np.asarray(frames).reshape(B * H, *real.shape[2:]))
    want = environment.decode_frames(real.reshape(B * H, *real.shape[2:]))  # exact: Env's pixels
    (cell, facing), (cell_r, facing_r) = agent_of(got["app"]), agent_of(want["app"])
    tile = (cell == cell_r) & (cell >= 0)  # (B·H,)
    hits = {"tile": tile, "facing": tile & (facing == facing_r),
            "inventory": (got["inv"] == want["inv"]).all(-1)}
    return {k: v.reshape(B, H) for k, v in hits.items()}


def exact_parse_share(frames) -> float:
    """Share of frames (N, H_px, W_px, 3) in 0…1 that environment.decode_frames reads exactly
    (every tile a sprite pixel for pixel, after rounding to 8 bits)."""
    ok = 0
    for f in np.asarray(frames):
        try:
            environment.decode_frames(np.round(f[None] * 255).astype(np.uint8))
            ok += 1
        except ValueError:
            pass
    return ok / len(frames)


def shift_window(actions: torch.Tensor, by: int) -> torch.Tensor:
    """The window's actions (B, T, A) shifted in time by `by` frames, a′_t = a_{t−by}: +1
    arrives a frame late, −1 a frame early; no-ops (all classes 0) where it leaves the window."""
    out = torch.zeros_like(actions)  # (B, T, A) no-ops
    if by > 0:
        out[:, by:] = actions[:, :-by]
    elif by < 0:
        out[:, :by] = actions[:, -by:]
    else:
        out[:] = actions
    return out


def follow_figures(prefix: str, hits: dict) -> dict:
    """Summary keys of follow_hits: share per horizon step, at the first and the 8th generated
    frame (when generated), and the mean over the horizon."""
    out = {}
    for what in FOLLOW_WHAT:
        per = hits[what].mean(0).tolist()  # (H,) share of windows
        key = f"{prefix}_{what}_acc"
        out.update({f"{key}_per_horizon": per, f"{key}_first": per[0], key: float(np.mean(per))})
        if len(per) >= 8:
            out[f"{key}_8th"] = per[7]
    return out


def step_figures(tile: np.ndarray, copy_tile: np.ndarray) -> dict:
    """Is the loss of the agent over a rollout one step's error compounding, or a model that
    gets worse on its own frames (not in paper)? tile, copy_tile (B, H) bool: the rollout's and
    copying's agent-tile hits (follow_hits). Returns
      follow_tile_acc_given_prev: P(right at h | right at h − 1), pooled over h ≥ 2: the per-step
        accuracy after a generated frame that was right. Close to the first frame's accuracy
        means one step's error compounds (an error is rarely undone: the agent is then off);
        far below it means the model's own frames hurt it;
      follow_tile_acc_first_moved / _first_stayed: the first frame's accuracy where the real
        agent left its tile (copying is wrong) / stayed (copying is right);
    each None (null in summary.json) where no window qualifies."""
    before, after = tile[:, :-1], tile[:, 1:]  # (B, H − 1) each
    moved = ~copy_tile[:, 0]  # (B,) the real agent left its tile at the first step

    def share(hit, where):  # share of hits among the windows where `where` holds, None if none
        return float(hit[where].mean()) if where.any() else None

    return {"follow_tile_acc_given_prev": share(after, before),
            "follow_tile_acc_first_moved": share(tile[:, 0], moved),
            "follow_tile_acc_first_stayed": share(tile[:, 0], ~moved)}


@torch.no_grad()
def action_following(model, tok, held: LatentCache, a: Args, device, ro: dict,
                     recon: torch.Tensor) -> dict:
    """Does the generated agent go where the real one goes under the same actions (not in paper)?

    The held-out windows of dynamics.evaluate, read back into a state (environment.read_frames)
    per horizon step: the K = sample_k rollout under the true actions and under the shuffled
    ones (reused, not regenerated), copying the last context frame, and the tokenizer's
    reconstruction recon (B, T, H_px, W_px, 3) of the real frames (a ceiling: a perfect dynamics
    model seen through this decoder). The truth: the episode replayed in environment.Env under
    the same actions (data.simulate_future with the episode's own draws). The timing check
    generates two more rollouts (evaluate's noise) under the window's actions shifted by ±1 frame
    (an off-by-one the shuffle test misses), and steps the real environment under them, where
    they must differ."""
    meta, Tc, H = held.meta, a.eval_context, a.eval_horizon
    if ro["actions"] is None or meta.get("generator") != data.GENERATOR \
            or meta.get("tasks") != environment.TASKS:
        print("eval: action following skipped: the frames are not the built-in environment's "
              "(meta.json generator and tasks), so they cannot be read back into a state")
        return {}
    acts = {"true": ro["actions"], "plus1": shift_window(ro["actions"], 1),
            "minus1": shift_window(ro["actions"], -1)}  # (B, T, A) each
    batch, real = ro["batch"], {name: [] for name in acts}
    for j, (episode, start) in enumerate(zip(batch["episode_ids"], batch["episode_starts"])):
        plans = [x[j, Tc - 1:Tc - 1 + H].cpu().numpy() for x in acts.values()]  # (H, A) each
        futures = data.simulate_future(held.data_root, episode, start + Tc - 1, plans, meta=meta)
        if futures is None:
            print(f"eval: action following skipped: episode {episode} cannot be replayed")
            return {}
        for name, f in zip(acts, futures):
            real[name].append(f)
    real = {name: np.stack(f) for name, f in real.items()}  # (B, H, H_px, W_px, 3) uint8 each
    recorded = (ro["true"][:, Tc:] * 255).round().byte().cpu().numpy()
    assert np.array_equal(real["true"], recorded), "the replay must give the recorded frames"

    k = a.sample_k
    last = (ro["true"][:, Tc - 1:Tc] * 255).round().byte().cpu().numpy()  # (B, 1, H_px, W_px, 3)
    copy = last.repeat(H, 1)  # (B, H, H_px, W_px, 3) the last context frame, H times
    candidates = {"follow": ro["pixels"][f"k{k}"], "follow_copy": copy,
                  "follow_tokenizer": recon[:, Tc:]}
    if ro["shuffled"] is not None:
        candidates["follow_shuffled"] = ro["pixels"]["shuffled"]
    gen = ro["pixels"][f"k{k}"]  # (B, H, H_px, W_px, 3) in 0…1
    flat = gen.flatten(0, 1).cpu().numpy()  # (B·H, H_px, W_px, 3) in 0…1
    # Whether the agent is drawn at all tells "not drawn" from "drawn on the wrong tile".
    found = agent_of(environment.read_frames(flat * 255)["app"])[0] >= 0  # (B·H,)
    out = {"follow_exact_parse_share": exact_parse_share(flat),
           "follow_agent_found_share": float(found.mean())}
    tiles = {}
    for prefix, frames in candidates.items():
        pixels = frames if isinstance(frames, np.ndarray) else frames.cpu().numpy() * 255
        hits = follow_hits(pixels, real["true"])
        tiles[prefix] = hits["tile"]  # (B, H)
        out.update(follow_figures(prefix, hits))
    out.update(step_figures(tiles["follow"], tiles["follow_copy"]))

    # The timing check: the model and the environment under the actions shifted by ±1 frame.
    ctx = pack(ro["latents"][:, :Tc])  # (B, T_c, N_z, C_z)
    true_px = ro["true"][:, Tc:]  # (B, H, H_px, W_px, 3)
    out["shift_true_tile_acc"] = out["follow_tile_acc"]
    out["shift_true_psnr"] = psnr_scores("true", gen, true_px)["psnr_true"]  # = psnr_k{K}
    for name in ("plus1", "minus1"):
        g = torch.Generator(device).manual_seed(a.seed)  # evaluate's noise: only the actions differ
        with common.autocast(device):
            z = rollout(model, ctx, acts[name], H, k, a.ctx_tau, g).float()  # (B, H, N_z, C_z)
        px = decode_after(tok, ro["latents"][:, :Tc], z, device)  # (B, H, H_px, W_px, 3)
        hits = follow_hits(px.cpu().numpy() * 255, real["true"])
        out[f"shift_{name}_tile_acc_per_horizon"] = hits["tile"].mean(0).tolist()
        out[f"shift_{name}_tile_acc"] = float(hits["tile"].mean())
        scores = psnr_scores(name, px, true_px)
        out[f"shift_{name}_psnr"] = scores[f"psnr_{name}"]
        out[f"shift_{name}_psnr_per_horizon"] = scores[f"psnr_{name}_per_horizon"]
        env_hits = follow_hits(real[name], real["true"])  # a perfect model fed shifted actions
        out[f"shift_{name}_env_tile_acc"] = float(env_hits["tile"].mean())
        differs = (real[name] != real["true"]).reshape(len(recorded), -1).any(-1)  # (B,)
        out[f"shift_{name}_env_frames_differ"] = float(differs.mean())
    out["shift_true_beats_both"] = all(
        out["shift_true_tile_acc"] > out[f"shift_{n}_tile_acc"]
        and out["shift_true_psnr"] > out[f"shift_{n}_psnr"] for n in ("plus1", "minus1"))
    print_following(out, k)
    save_following_picture(out, a.out)
    return out


# ---- Event strength: which action effects has the model learned? (built-in world) --------------

EVENTS = ("move", "crack", "fell", "table", "wood")  # the kinds event_strength measures


def find_events(frames: np.ndarray, first: int) -> list:
    """The events in one built-in episode's frames (T, H_px, W_px, 3) uint8, for each step
    t → t + 1 with t ≥ first (action t caused what frame t + 1 shows), as (kind, t, (row, col)):
        move   the agent stands on a new tile                      its new tile
        crack  a tree shows a crack it did not show before         that tree (the first `use`)
        fell   a tree is gone and the wood count rose              where it stood (the third)
        table  a table stands where none did                       the table
        wood   the wood count rose (a felling, drawn in the strip)  the inventory's wood slot
    """
    s = environment.decode_frames(frames)
    app, wood = s["app"], s["inv"][:, environment.WOOD]  # (T, ROWS, COLS), (T,)
    first_crack = environment.CRACK_APP + 4 * environment.MINABLE.index(environment.TREE)
    cracked = (app >= first_crack) & (app < first_crack + 4)  # (T, ROWS, COLS) trees being mined
    tree = (app == environment.TREE) | cracked
    table = app == environment.TABLE
    cell = agent_of(app)[0]  # (T,) flat tile index, −1 where not exactly one agent
    events = []
    for t in range(first, len(frames) - 1):
        if cell[t] >= 0 and cell[t + 1] >= 0 and cell[t + 1] != cell[t]:
            events.append(("move", t, divmod(int(cell[t + 1]), environment.COLS)))
        for kind, where in (("crack", cracked[t + 1] & ~cracked[t]),
                            ("fell", tree[t] & ~tree[t + 1] if wood[t + 1] > wood[t] else None),
                            ("table", table[t + 1] & ~table[t])):
            if where is not None and where.sum() == 1:
                events.append((kind, t, tuple(int(i) for i in np.argwhere(where)[0])))
        if wood[t + 1] > wood[t]:  # the strip is tile row ROWS of the frame
            events.append(("wood", t, (environment.ROWS, environment.WOOD)))
    return events


def change_share(got: np.ndarray, before: np.ndarray, after: np.ndarray) -> float:
    """How much of a tile's real change before → after a picture of it holds: the projection
    ⟨got − before, after − before⟩ / ‖after − before‖² (1: drawn as it happens, 0: unchanged).
    Tiles (s, s, 3) in 0…255; after must differ from before."""
    change = after.astype(np.float64) - before
    return float(((got - before) * change).sum() / (change * change).sum())


@torch.no_grad()
def event_strength(model, tok, held: LatentCache, a: Args, device, per_kind: int = 64,
                   draws: int = 8) -> dict:
    """Which action effects has the world model learned (not in paper)? One step after a real
    history, the sampler's first estimate of the next frame (history at τ_ctx, the new frame from
    pure noise at τ = 0, d = 1/K), averaged over `draws` noises: its mean over what the model thinks
    may happen, decoded and projected on the real change of the event's tile (change_share),
    per kind of event (find_events; up to per_kind of each from the held-out episodes). A move
    learned for sure reads 1; an event the model gives even odds, 0.5; one it ignores, 0. Beside
    it, the tokenizer's reconstruction of the real next frame: a ceiling. Built-in datasets only."""
    meta, Tc = held.meta, a.eval_context
    if held.actions is None or meta.get("generator") != data.GENERATOR:
        return {}
    found = {kind: [] for kind in EVENTS}  # kind → [(cache index of frame t, tile, x_t, x_t+1)]
    for ep in held.episodes:
        frames = np.load(os.path.join(held.data_root, f"{ep['id']}.npz"))["frames"]
        for kind, t, tile in find_events(frames, Tc - 1):
            if len(found[kind]) < per_kind:
                found[kind].append((ep["offset"] + t, tile, frames[t], frames[t + 1]))
        if all(len(v) == per_kind for v in found.values()):
            break
    s = meta["image_size"] // 8  # tile size in pixels
    gen = torch.Generator(device).manual_seed(a.seed + 991)
    out = {}
    for kind, events in found.items():
        out[f"event_n_{kind}"] = len(events)
        if not events:
            continue
        idx = np.array([e[0] for e in events])[:, None] + np.arange(-Tc + 1, 2)  # (B, T_c + 1)
        latents = torch.from_numpy(np.asarray(held.latents[idx], np.float32)).to(device)
        clean = pack(latents)  # (B, T_c + 1, N_z, C_z): the history, then the real next frame
        acts = torch.from_numpy(np.asarray(held.actions[idx])).to(device)  # (B, T_c + 1, A)
        tau, d = next_frame_levels(*clean.shape[:2], a, 1.0 / a.sample_k, device)  # (B, T) each
        mean = 0
        for _ in range(draws):
            noise = torch.randn(clean.shape, generator=gen, device=device)
            with common.autocast(device):
                z1 = model(corrupt(noise, clean, tau), tau, d, *shift_actions(acts)).float()
            mean = mean + z1[:, -1:] / draws  # (B, 1, N_z, C_z)
        pictures = {"event": decode_after(tok, latents[:, :Tc], mean, device),
                    "event_tokenizer": decode_after(tok, latents[:, :Tc], clean[:, -1:], device)}
        for prefix, px in pictures.items():
            px = px[:, 0].cpu().numpy() * 255  # (B, H_px, W_px, 3)
            shares = [change_share(px[j, r * s:(r + 1) * s, c * s:(c + 1) * s],
                                   before[r * s:(r + 1) * s, c * s:(c + 1) * s],
                                   after[r * s:(r + 1) * s, c * s:(c + 1) * s])
                      for j, (_, (r, c), before, after) in enumerate(events)]
            out[f"{prefix}_strength_{kind}"] = float(np.mean(shares))
    print("eval: event strength, one step after a real history (1 = drawn as it happens; "
          "tokenizer ceiling): " + ", ".join(
              f"{k} {out[f'event_strength_{k}']:.2f} ({out[f'event_tokenizer_strength_{k}']:.2f},"
              f" n = {out[f'event_n_{k}']})" for k in EVENTS if f"event_strength_{k}" in out))
    return out


def print_following(out: dict, k: int) -> None:
    """The one-line summary of action_following: at the first and the 8th (else the last)
    generated frame."""
    at = "8th" if "follow_tile_acc_8th" in out else "last"
    h = 7 if at == "8th" else -1  # index of that frame in the per-horizon lists

    def pair(key):  # "first/8th" shares of a follow_* key
        return f"{out[key + '_first']:.2f}/{out[key + '_per_horizon'][h]:.2f}"

    def share(key):  # a step_figures share, "n/a" where no window qualified
        return "n/a" if out[key] is None else f"{out[key]:.2f}"

    shuffled = (f", shuffled actions {pair('follow_shuffled_tile_acc')}"
                if "follow_shuffled_tile_acc_first" in out else "")
    print(f"eval: action following (K={k}; share right at generated frame 1/{at}): agent tile "
          f"{pair('follow_tile_acc')} vs copy {pair('follow_copy_tile_acc')}{shuffled}; the first "
          f"where the real agent moves {share('follow_tile_acc_first_moved')}, stays "
          f"{share('follow_tile_acc_first_stayed')}; after a right frame "
          f"{share('follow_tile_acc_given_prev')} | "
          f"tile+facing {pair('follow_facing_acc')} | inventory {pair('follow_inventory_acc')} "
          f"(copy {pair('follow_copy_inventory_acc')}) | tokenizer reconstruction (ceiling): "
          f"tile {pair('follow_tokenizer_tile_acc')} | actions shifted +1/−1: tile "
          f"{out['shift_plus1_tile_acc']:.2f}/{out['shift_minus1_tile_acc']:.2f} vs true "
          f"{out['shift_true_tile_acc']:.2f}, PSNR {out['shift_plus1_psnr']:.2f}/"
          f"{out['shift_minus1_psnr']:.2f} vs {out['shift_true_psnr']:.2f} dB, true best: "
          f"{'yes' if out['shift_true_beats_both'] else 'NO'}; the environment: frames differ in "
          f"{100 * out['shift_plus1_env_frames_differ']:.0f}/"
          f"{100 * out['shift_minus1_env_frames_differ']:.0f} % of windows | one agent drawn in "
          f"{100 * out['follow_agent_found_share']:.0f} % of generated frames; decode_frames "
          f"reads {100 * out['follow_exact_parse_share']:.0f} % exactly (the rest: nearest sprite)")


def save_following_picture(out: dict, run_dir: str) -> None:
    """follow.png: per horizon step, the share of held-out rollouts whose agent tile, facing and
    inventory match the real environment, the model beside its baselines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2), sharey=True)
    lines = (("follow", "model, true actions"), ("follow_shuffled", "model, shuffled actions"),
             ("follow_copy", "copy the last context frame"),
             ("follow_tokenizer", "tokenizer reconstruction (ceiling)"))
    for ax, what in zip(axes, FOLLOW_WHAT):
        for prefix, label in lines:
            key = f"{prefix}_{what}_acc_per_horizon"
            if key in out:
                ax.plot(range(1, len(out[key]) + 1), out[key], "o-", ms=3, label=label)
        if what == "tile":
            for name, label in (("plus1", "actions +1 frame late"),
                                ("minus1", "actions 1 frame early")):
                per = out[f"shift_{name}_tile_acc_per_horizon"]
                ax.plot(range(1, len(per) + 1), per, "--", label=f"model, {label}")
        ax.set_title({"tile": "agent tile", "facing": "agent tile and facing",
                      "inventory": "inventory (all 7 slots)"}[what], fontsize=9)
        ax.set_xlabel("frames after the context")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("share of held-out rollouts right")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "follow.png"), dpi=100)
    plt.close(fig)


# What the command line may change; the rest comes from the checkpoint's args.
EVAL_FLAGS = {
    "eval_seqs": (int, "held-out sequences for the rollouts"),
    "eval_seqs_kmax": (int, "the first n of them for the K = k_max rollout (0: all)"),
    "eval_context": (int, "context frames of the held-out rollouts"),
    "eval_horizon": (int, "generated frames of the held-out rollouts"),
    "sample_k": (int, "K sampling steps per generated frame"),
    "ctx_tau": (float, "signal level of context frames (τ_ctx; 1 → 1 − 1/K_max)"),
    "fps_frames": (int, "frames generated at batch 1 to time generation"),
    "seed": (int, "seed of the held-out windows and the noise"),
    "device": (str, "auto | cpu | cuda | mps"),
}


def phase2_weights(model, weights: str, ckpt_path: str) -> dict:
    """Load into `model` the world model of an agent checkpoint (its `dyn.` weights: the phase-2
    transformer without the agent token, which the world tokens never attend to, so the frames it
    predicts are the agent model's). Returns the summary keys that say whose weights these are."""
    how = f"python agent.py --dynamics {ckpt_path} --out {os.path.dirname(weights)}"
    ckpt = common.load_checkpoint(weights, "agent", how)
    parent = ckpt["parent"]["path"]
    if os.path.abspath(parent) != os.path.abspath(ckpt_path):
        print(f"!! {weights} was finetuned from {parent}, not from {ckpt_path}: the figures "
              f"compare it with the held-out windows and tokenizer of {ckpt_path}")
    dyn = {k[len("dyn."):]: v for k, v in ckpt["model"].items() if k.startswith("dyn.")}
    model.load_state_dict(dyn)
    return {"weights": os.path.abspath(weights), "weights_stage": "agent (phase 2)",
            "weights_step": ckpt["step"], "weights_from_scratch": ckpt["args"]["from_scratch"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Re-evaluate a finished dynamics run folder: "
                                     "rewrites its summary.json and pictures.")
    parser.add_argument("run_dir", help="run folder holding ckpt.pt, e.g. runs/cpu/dynamics")
    for name, (kind, text) in EVAL_FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                            help=text + " (default: the run's own)")
    parser.add_argument("--weights", default="", help="an agent checkpoint (agent.py) finetuned "
                        "from this run: measure its world model (phase 2) in place of the run's")
    parser.add_argument("--out", default="", help="folder for summary.json and the pictures "
                        "(default: the run folder; with --weights: <its folder>/world_model)")
    given = vars(parser.parse_args(argv))
    run_dir, weights, out = given.pop("run_dir"), given.pop("weights"), given.pop("out")
    out = out or (os.path.join(os.path.dirname(weights), "world_model") if weights else run_dir)
    ckpt_path = os.path.join(run_dir, "ckpt.pt")
    preset = "default"
    if os.path.exists(os.path.join(run_dir, "args.json")):
        with open(os.path.join(run_dir, "args.json")) as fh:
            preset = json.load(fh).get("preset", preset)
    how = f"python dynamics.py --preset {preset} --out {run_dir}"
    ckpt = common.load_checkpoint(ckpt_path, "dynamics", how)
    fields = {k: v for k, v in ckpt["args"].items() if k in Args.__dataclass_fields__}
    typed = {k: v for k, v in given.items() if v is not None}
    a = Args(**{**fields, **typed, "out": out})  # pictures go to `out` (the run folder by default)
    os.makedirs(out, exist_ok=True)

    common.seed_everything(a.seed)
    device = common.pick_device(a.device, a.dtype)  # the run's dtype
    tok, _ = load_tokenizer(a.tokenizer, device)
    held = LatentCache(os.path.dirname(os.path.abspath(a.tokenizer)), "heldout", seed=a.seed + 1)
    model, _ = dynamics.load_dynamics(ckpt_path, device)  # the EMA weights when the run kept them
    summary_path = os.path.join(out, "summary.json")
    summary = {"stage": "dynamics", "steps": ckpt["step"]}
    if weights:
        summary.update(phase2_weights(model, weights, ckpt_path))
    model.eval()
    if os.path.exists(summary_path) and not weights:  # keep the training figures
        with open(summary_path) as fh:
            summary = json.load(fh)
    summary.update({"eval_only": True, "sample_k": a.sample_k,
                    "ctx_tau_used": context_signal_level(a.ctx_tau, a.k_max),
                    "eval_context": a.eval_context, "eval_horizon": a.eval_horizon,
                    "eval_seqs": a.eval_seqs})
    t0 = time.time()
    figures, rollouts = dynamics.evaluate(model, tok, held, a, device)
    summary.update(figures)
    summary.update(report(model, tok, held, a, device, figures, rollouts))
    summary["eval_s"] = time.time() - t0
    common.write_json(summary_path, summary)
    print("summary:", json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
