"""Measuring instruments of stage 1b (dynamics.py): baselines, probes, speed, pictures.

dynamics.evaluate gives the stage's headline figures (held-out rollout PSNR for K = 4 and
K = K_max, the repeat-last baseline, the action-shuffle gap); this module adds what tells them
apart and draws them:
    rollout_baselines   latent-space errors, the repeat-last baseline through the decoder, the
                        tokenizer's own reconstruction (a ceiling), the environment itself replayed
    loss_by_tau_d       held-out Eq 7 loss per step size d and per signal level τ
    action_probe        action use without sampling noise (one teacher-forced step)
    generation_speed    frames/s at batch 1 with the KV cache; cached vs uncached
    save_pictures       rollout.png, rollout.gif, rollout_psnr.png, loss_tau_d.png
dynamics.train calls `report` at its end. Re-evaluate a finished run folder (its checkpoint's
model and data; the flags given here override its evaluation settings) and rewrite its
summary.json and pictures:
    python dynamics_eval.py runs/cpu/dynamics --eval-seqs 128
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
from dynamics import (Args, context_signal_level, corrupt, decode_after, forcing_batch,
                      psnr_scores, rollout, row_select, shift_actions, shortcut_forcing_loss)
from tokenizer import LatentCache, load_tokenizer, pack


def report(model, tok, held: LatentCache, a: Args, device, figures: dict, rollouts: dict) -> dict:
    """The summary keys beyond the headline figures (each instrument seeds its own generators);
    writes the pictures into a.out. figures, rollouts: what dynamics.evaluate returned."""
    n_actions = 0 if held.actions is None else len(model.action_classes)
    out, recon = rollout_baselines(tok, held, rollouts, a, device)
    probe = loss_by_tau_d(model, held, a, device)
    out.update(probe)
    out.update(action_probe(model, held, a, device))
    Tc, k = a.eval_context, a.sample_k
    generated = torch.cat([recon[:, :Tc], rollouts["pixels"][f"k{k}"]], 1)  # (B, T, H, W, 3)
    save_pictures({**figures, **out}, rollouts["true"], generated, probe, a)
    out.update(generation_speed(model, device, k, a.ctx_tau, a.fps_frames, n_actions))
    nan = float("nan")
    print(f"eval: repeat-last decoded {out['psnr_repeat_last_decoded']:.2f} dB, tokenizer "
          f"ceiling {out['psnr_tokenizer_ceiling']:.2f} dB | one-step probe "
          f"{out.get('probe_mse_true', nan):.4f} vs shuffled "
          f"{out.get('probe_mse_shuffled', nan):.4f} (copy {out.get('probe_mse_copy', nan):.4f})"
          f" | the environment itself "
          f"{out.get('psnr_simulator', nan):.2f} dB, shuffle gap "
          f"{out.get('action_shuffle_gap_simulator_db', nan):.2f} dB | latent MSE K={k} "
          f"{out[f'latent_mse_k{k}']:.4f} vs repeat-last {out['latent_mse_repeat_last']:.4f} | "
          f"{out['gen_fps']:.0f} frames/s (batch 1, K={k}, cache) | "
          f"cache speed-up ×{out['cache_speedup_ctx32']:.1f} at 32 context frames")
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
    for name, z in ro["z"].items():  # k4, k64, shuffled
        key = f"latent_mse_k{a.sample_k}_shuffled" if name == "shuffled" else f"latent_mse_{name}"
        out[key] = float((z - target).pow(2).mean())
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
    # history at τ_ctx, the frame to predict from pure noise
    tau = torch.full((n, T), context_signal_level(a.ctx_tau, a.k_max), device=device)  # (B, T)
    tau[:, -1] = 0.0
    d = torch.full((n, T), 1.0 / a.k_max, device=device)  # (B, T)
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


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


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
        _sync(device)
        t0 = time.time()
        with common.autocast(device):
            rollout(model, latents(Tc), actions(Tc + n), n, k, ctx_tau, gen, use_cache)
        _sync(device)
        return time.time() - t0

    timed(8, 2, True)  # warm-up
    fps = n_frames / timed(8, n_frames, True)
    n = max(2, min(8, n_frames))
    t_cached, t_uncached = timed(32, n, True), timed(32, n, False)
    return {"gen_fps": fps, "gen_fps_ctx32_uncached": n / t_uncached,
            "gen_fps_ctx32_cached": n / t_cached, "cache_speedup_ctx32": t_uncached / t_cached}


def save_pictures(ev: dict, true: torch.Tensor, generated: torch.Tensor, probe: dict | None,
                  a: Args) -> None:
    """rollout.png (rows: true | generated | |error|×4; context framed green, generated red),
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
    canvas = np.concatenate(rows, 0)  # (3·S·(H+2p), T·(W+2p), 3)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * T), max(3, 1.8 * S)))
    ax.imshow(canvas, interpolation="nearest")
    h, w = Hp + 2 * p, Wp + 2 * p
    labels = ["true", f"decoded, K={a.sample_k}", "|err|×4"] * S
    ax.set_yticks([h * (i + 0.5) for i in range(3 * S)], labels, fontsize=7)
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
                       (f"psnr_k{a.k_max}_per_horizon", f"K = {a.k_max}"),
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


# What the command line may change; the rest comes from the checkpoint's args.
EVAL_FLAGS = {
    "eval_seqs": (int, "held-out sequences for the rollouts"),
    "eval_context": (int, "context frames of the held-out rollouts"),
    "eval_horizon": (int, "generated frames of the held-out rollouts"),
    "sample_k": (int, "K sampling steps per generated frame"),
    "ctx_tau": (float, "signal level of context frames (τ_ctx; 1 = clean)"),
    "fps_frames": (int, "frames generated at batch 1 to time generation"),
    "seed": (int, "seed of the held-out windows and the noise"),
    "device": (str, "auto | cpu | cuda | mps"),
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Re-evaluate a finished dynamics run folder: "
                                     "rewrites its summary.json and pictures.")
    parser.add_argument("run_dir", help="run folder holding ckpt.pt, e.g. runs/cpu/dynamics")
    for name, (kind, text) in EVAL_FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                            help=text + " (default: the run's own)")
    given = vars(parser.parse_args(argv))
    run_dir = given.pop("run_dir")
    ckpt_path = os.path.join(run_dir, "ckpt.pt")
    preset = "default"
    if os.path.exists(os.path.join(run_dir, "args.json")):
        with open(os.path.join(run_dir, "args.json")) as fh:
            preset = json.load(fh).get("preset", preset)
    how = f"python dynamics.py --preset {preset} --out {run_dir}"
    ckpt = common.load_checkpoint(ckpt_path, "dynamics", how)
    fields = {k: v for k, v in ckpt["args"].items() if k in Args.__dataclass_fields__}
    typed = {k: v for k, v in given.items() if v is not None}
    a = Args(**{**fields, **typed, "out": run_dir})  # written where the folder is now

    common.seed_everything(a.seed)
    device = common.pick_device(a.device, a.dtype)  # the run's dtype
    tok, _ = load_tokenizer(a.tokenizer, device)
    held = LatentCache(os.path.dirname(os.path.abspath(a.tokenizer)), "heldout", seed=a.seed + 1)
    model, _ = dynamics.load_dynamics(ckpt_path, device)  # the EMA weights when the run kept them
    model.eval()

    summary_path = os.path.join(run_dir, "summary.json")
    summary = {"stage": "dynamics", "steps": ckpt["step"]}
    if os.path.exists(summary_path):  # keep the training figures
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
