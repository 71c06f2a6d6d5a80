"""Measuring instruments of the tokenizer (tokenizer.py): pictures, and re-evaluating a run.

tokenizer.py calls `report` at the end of training; it draws
    recon.png   true frames | the pixels that change (magenta) | reconstruction | |error|, at
                MAE p = 0 and at p = 0.5
    curves.png  training loss terms and held-out PSNR over the steps (from metrics.jsonl)
and returns the moving-pixel figures for summary.json (moving_pixel_figures): PSNR on the pixels
that change between consecutive frames and on the static rest, for the reconstruction and the copy
baseline, and the collapse alarm. dynamics_eval.py uses the same helpers for its rollouts.

Run on a finished run folder (its ckpt.pt, args and data) to recompute the held-out figures of
tokenizer.evaluate, rewrite them in summary.json and redraw the pictures:
    python tokenizer_eval.py runs/tokenizer
    python tokenizer_eval.py runs/cpu/tokenizer
    python tokenizer_eval.py runs/smoke/tokenizer
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

import common
import data
import environment
import tokenizer


# ---- Moving pixels: PSNR where the frames change, and the collapse alarm ----------------------
# Full-frame PSNR and SSIM are dominated by the static pixels: a tokenizer that keeps the background
# and drops the small moving objects still scores well. These figures look only at what moves.

# A pixel changes at frame t when a channel of the real frame differs from frame t − 1 by more than
# 8/255 (3 % of the range): above the few levels of rounding and compression noise of recorded
# video, below the contrast of any object worth keeping. The built-in worlds change exactly.
CHANGE_THRESHOLD = 8 / 255
# The alarm fires when a model moves at fewer than a quarter of the pixels that move in its input.
# Following the motion scores near 1 (an exact copy: 1, a blur that still tracks an object: well
# above 0.5); dropping the moving objects scores near 0, only chance flicker landing on them.
COLLAPSE_RECALL = 0.25


def changed_mask(prev: torch.Tensor, cur: torch.Tensor,
                 threshold: float = CHANGE_THRESHOLD) -> torch.Tensor:
    """Pixels of cur that differ from prev by more than threshold in some channel.

    prev, cur (…, H, W, 3) in [0, 1] → (…, H, W) bool.
    """
    return ((cur - prev).abs() > threshold).any(-1)


def masked_psnr(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, dims=None) -> torch.Tensor:
    """PSNR of the mean squared error over the pixels where mask holds: 10·log10(1 / MSE_mask).

    x, y (…, H, W, 3) in [0, 1]; mask (…, H, W) bool; the mean runs over `dims` of the mask (all
    by default), pooling pixels across images. NaN where the mask selects no pixel.
    """
    se = (x.clamp(0, 1) - y).pow(2).mean(-1)  # (…, H, W) squared error, mean over channels
    m = mask.float()  # (…, H, W)
    dims = tuple(range(m.dim())) if dims is None else dims
    n = m.sum(dims)
    mse = (se * m).sum(dims) / n.clamp_min(1)  # masked mean
    db = 10 * torch.log10(1 / mse.clamp_min(1e-10))  # capped at 100 dB, as psnr_of_mean_mse
    return torch.where(n > 0, db, torch.full_like(db, float("nan")))


def finite_or_none(v) -> float | None:
    """A float for summary.json; None for NaN (no pixel to score), which JSON cannot hold."""
    v = float(v)
    return None if np.isnan(v) else v


def fmt(v: float | None) -> str:
    """Two decimals for a console line, "n/a" for a figure that could not be measured."""
    return "n/a" if v is None else f"{v:.2f}"


def motion_figures(prev_in: torch.Tensor, cur_in: torch.Tensor, prev_out: torch.Tensor,
                   cur_out: torch.Tensor) -> dict:
    """How much a model's frames move where the real frames move, all (…, H, W, 3) in [0, 1].

    recall: the share of the real frames' changed pixels where the model's frames change too;
    ratio: mean |Δ model| / mean |Δ real| over those pixels. None when no real pixel changes.
    """
    moving = changed_mask(prev_in, cur_in)  # (…, H, W)
    if not moving.any():
        return {"recall": None, "ratio": None}
    follows = changed_mask(prev_out, cur_out) & moving  # (…, H, W)
    d_out = (cur_out - prev_out).abs().mean(-1)[moving]  # (n_moving,)
    d_in = (cur_in - prev_in).abs().mean(-1)[moving]  # (n_moving,)
    return {"recall": float(follows.sum() / moving.sum()),
            "ratio": float(d_out.mean() / d_in.mean())}


def latent_motion_ratio(z: torch.Tensor, frames: torch.Tensor) -> float | None:
    """How much the latents move in time, against how much the frames do; scale-free.

    For z (M, T, N_b, D_b) and frames (M, T, H, W, 3): the mean |x_t − x_{t−1}| over the mean
    |x − the same frame of another window| (how far one step moves, in units of how far apart two
    videos are), latents ÷ frames. 0: the latents never move. None with a single window.
    """
    if z.shape[0] < 2:
        return None

    def step_over_spread(x):
        step = (x[:, 1:] - x[:, :-1]).abs().mean()
        spread = (x - x.roll(1, 0)).abs().mean()  # (window m against window m − 1)
        return step / spread.clamp_min(1e-12)

    pixels = step_over_spread(frames)
    if pixels == 0:
        return None
    return float(step_over_spread(z) / pixels)


def collapse_warning(who: str, recall: float, ratio: float, means: str, advice: str) -> None:
    """The loud multi-line message of the collapse alarm."""
    bar = "!" * 100
    print(f"\n{bar}\n!! COLLAPSE ALARM ({who})\n!! Its frames move at only {recall:.0%} of the "
          f"pixels that move in the real frames (motion recall\n!! {recall:.2f} < "
          f"{COLLAPSE_RECALL}; mean |Δ| ratio {ratio:.2f}; summary.json: collapse_alarm true)."
          f"\n!! {means}\n"
          f"!! Full-frame PSNR and SSIM cannot show this: they are dominated by the static pixels."
          f"\n!! Try: {advice}\n{bar}")


# The kinds of tile of the built-in world (environment.py's appearance ids, [lo, hi)).
SPRITE_KINDS = {"terrain": (0, environment.TABLE),
                "table": (environment.TABLE, environment.TABLE + 1),
                "agent": (environment.AGENT_APP, environment.CREATURE_APP),
                "creature": (environment.CREATURE_APP, environment.CRACK_APP),
                "crack": (environment.CRACK_APP, 1 << 30)}


def sprite_recall(true: np.ndarray, recon: np.ndarray) -> dict:
    """What the reconstruction keeps of the built-in world (not in paper): for each kind of tile
    (terrain, table, agent, creature, a tile being mined with its crack), the share of the real
    frames' tiles of that kind drawn as the same sprite (nearest sprite,
    environment.read_frames), the share of non-empty inventory slots read back with the right
    count, and of those that hold more than one (the count itself, not only that the slot holds
    something: a table costs 2 wood). A tokenizer that drops a rare sprite leaves the world model
    nothing to learn it from. true, recon: (M, H, W, 3) in 0…255. Empty for frames Env did not
    render."""
    H, W = true.shape[1:3]
    if H != W or H % 8 or H < environment.MIN_IMAGE_SIZE:
        return {}  # not a size Env renders
    try:
        want = environment.decode_frames(np.round(true).astype(np.uint8))
    except ValueError:  # not Env's pixels: another dataset
        return {}
    got = environment.read_frames(recon)
    same = got["app"] == want["app"]  # (M, ROWS, COLS)
    out = {}
    for name, (lo, hi) in SPRITE_KINDS.items():
        kind = (want["app"] >= lo) & (want["app"] < hi)  # (M, ROWS, COLS)
        out[f"sprite_recall_{name}"] = float(same[kind].mean()) if kind.any() else None
    held = want["inv"] > 0  # (M, 7) slots with something in them
    right = got["inv"] == want["inv"]
    out["sprite_recall_inventory"] = float(right[held].mean()) if held.any() else None
    many = want["inv"] > 1  # (M, 7) slots whose count is more than one
    out["sprite_recall_inventory_over_one"] = float(right[many].mean()) if many.any() else None
    return out


@torch.no_grad()
def moving_pixel_figures(model: tokenizer.Tokenizer, loader, batches: int, batch_size: int,
                         device, seed: int) -> dict:
    """The summary keys of the moving pixels, on tokenizer.evaluate's held-out windows (MAE p = 0).

    Changed- and static-pixel PSNR of the reconstruction and of the copy baseline (frame t − 1 as
    the prediction of frame t), scored on frames t ≥ 1 (frame 0 has no predecessor); how much the
    reconstructions and the latents move; the collapse alarm (printed loudly when it fires).
    """
    was_training = model.training
    model.eval()
    loader.rng = np.random.default_rng([seed, 12345])  # tokenizer.evaluate's windows
    xs, rs, zs = [], [], []
    for _ in range(batches):
        frames = loader.sample(batch_size)["frames"].to(device)  # (B, T, H, W, 3) uint8
        with common.autocast(device):
            z = model.encode(frames)  # (B, T, N_b, D_b)
            recon = model.decode(z).float()  # (B, T, H, W, 3)
        xs.append(frames.float() / 255)
        rs.append(recon.clamp(0, 1))
        zs.append(z.float())
    model.train(was_training)
    x, r, z = torch.cat(xs), torch.cat(rs), torch.cat(zs)  # (M, T, H, W, 3) ×2, (M, T, N_b, D_b)
    changed = changed_mask(x[:, :-1], x[:, 1:])  # (M, T − 1, H, W)
    out = {"changed_pixel_frac": float(changed.float().mean())}
    for name, pred in (("recon", r[:, 1:]), ("copy", x[:, :-1])):
        for part, mask in (("changed", changed), ("static", ~changed)):
            out[f"{name}_psnr_{part}_db"] = finite_or_none(masked_psnr(pred, x[:, 1:], mask))
    motion = motion_figures(x[:, :-1], x[:, 1:], r[:, :-1], r[:, 1:])
    out["motion_recall_recon"], out["motion_ratio_recon"] = motion["recall"], motion["ratio"]
    out["motion_ratio_latent"] = latent_motion_ratio(z, x)
    out["collapse_alarm"] = motion["recall"] is not None and motion["recall"] < COLLAPSE_RECALL
    flat = x.shape[0] * x.shape[1]
    out.update(sprite_recall(x.reshape(flat, *x.shape[2:]).numpy() * 255,
                             r.reshape(flat, *r.shape[2:]).numpy() * 255))
    if "sprite_recall_crack" in out:
        print("sprites drawn back: " + ", ".join(
            f"{k[len('sprite_recall_'):]} {fmt(v)}" for k, v in out.items()
            if k.startswith("sprite_recall_")))
    print(f"moving pixels ({out['changed_pixel_frac']:.2%} change): PSNR on them recon "
          f"{fmt(out['recon_psnr_changed_db'])} dB vs copy of the previous frame "
          f"{fmt(out['copy_psnr_changed_db'])} dB | static recon "
          f"{fmt(out['recon_psnr_static_db'])} dB | motion recall {fmt(motion['recall'])}, "
          f"latent motion ratio {fmt(out['motion_ratio_latent'])}")
    if out["collapse_alarm"]:
        collapse_warning(
            "tokenizer", motion["recall"], motion["ratio"],
            "The reconstructions keep the static background and drop what moves: a world model "
            "trained on\n!! these latents sees no motion, and its rollout figures will look fine "
            "while nothing is learned.",
            "train longer; train with LPIPS (its backbone weights need one online run); smaller\n"
            "!! patches or more latents; look at recon.png (changed pixels in magenta).")
    return out


def changed_overlay(frames: np.ndarray) -> np.ndarray:
    """Frames (T, H, W, 3) in [0, 1] drawn dim grey, the pixels that changed since the previous
    frame in magenta (frame 0, without a predecessor, has none). Returns (T, H, W, 3)."""
    grey = frames.mean(-1, keepdims=True).repeat(3, -1) * 0.5 + 0.25  # (T, H, W, 3) dimmed
    moving = np.zeros(frames.shape[:-1], bool)  # (T, H, W)
    moving[1:] = (np.abs(frames[1:] - frames[:-1]) > CHANGE_THRESHOLD).any(-1)
    grey[moving] = np.array([1.0, 0.0, 1.0])
    return grey


@torch.no_grad()
def save_recon_picture(model: tokenizer.Tokenizer, frames: torch.Tensor, path: str,
                       gen: torch.Generator) -> None:
    """Rows: true | changed pixels (magenta) | reconstruction | |error| at MAE p = 0, then input |
    reconstruction | |error| at p = 0.5 (masked patches grey)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    was_training = model.training
    model.eval()
    x = frames[:1, :8]  # (1, T, H, W, 3) uint8, one sequence
    T = x.shape[1]
    target = x.float() / 255
    m = torch.rand(1, T, model.n_patches, generator=gen) < 0.5  # p = 0.5 mask (1, T, N_p)
    size, P = model.image_size, model.patch
    rows = []
    for mask in (None, m.to(x.device)):
        recon = model(x, mask).float().clamp(0, 1)  # (1, T, H, W, 3)
        shown = target
        if mask is not None:  # show dropped patches in grey
            grey = mask[..., None].float().expand(-1, -1, -1, P * P * 3)  # (1, T, N_p, P·P·3)
            grey = tokenizer.unpatchify(grey, P, size, size)  # (1, T, H, W, 3)
            shown = target * (1 - grey) + 0.5 * grey
        err = (recon - target).abs().mean(-1, keepdim=True).expand_as(recon) * 4  # ×4: visible
        rows += [shown[0], recon[0], err.clamp(0, 1)[0]]
    rows.insert(1, torch.from_numpy(changed_overlay(target[0].cpu().numpy())))  # (T, H, W, 3)
    names = ["true (p=0)", "changed", "recon (p=0)", "|err|×4", "input (p=0.5)", "recon (p=0.5)",
             "|err|×4"]
    fig, axes = plt.subplots(len(rows), T, figsize=(1.3 * T, 1.4 * len(rows)), squeeze=False)
    for r, (row, name) in enumerate(zip(rows, names)):
        for t in range(T):
            axes[r, t].imshow(row[t].cpu().numpy(), interpolation="nearest")
            axes[r, t].set_xticks([])
            axes[r, t].set_yticks([])
        axes[r, 0].set_ylabel(name, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    model.train(was_training)


def save_curves(out: str) -> None:
    """Loss and held-out PSNR over training steps, read back from metrics.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3))
    tr = [r for r in rows if "mse" in r]
    a.semilogy([r["step"] for r in tr], [r["mse"] for r in tr], label="MSE")
    lp = [r for r in tr if "lpips" in r]
    if lp:
        a.semilogy([r["step"] for r in lp], [r["lpips"] for r in lp], label="LPIPS")
    a.set_xlabel("step")
    a.legend()
    a.set_title("training loss terms (raw)")
    ev = [r for r in rows if "eval_psnr" in r]
    b.plot([r["step"] for r in ev], [r["eval_psnr"] for r in ev], "o-")
    b.set_xlabel("step")
    b.set_ylabel("dB")
    b.set_title("held-out PSNR (p = 0)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=80)
    plt.close(fig)


def report(model: tokenizer.Tokenizer, held_loader, seed: int, device, out: str,
           batches: int = 8, batch_size: int = 16) -> dict:
    """Draw the pictures of a finished run into `out`: recon.png and curves.png; return the
    moving-pixel summary keys (on `batches` × `batch_size` held-out windows, as evaluate's).

    The reconstructions show one fixed held-out window (its own sampler seed) and one fixed
    p = 0.5 mask, so two runs with the same seed draw the same picture.
    """
    held_loader.rng = np.random.default_rng([seed, 999])
    frames = held_loader.sample(1)["frames"].to(device)  # (1, T, H, W, 3) uint8
    gen = torch.Generator().manual_seed(seed)
    save_recon_picture(model, frames, os.path.join(out, "recon.png"), gen)
    save_curves(out)
    return moving_pixel_figures(model, held_loader, batches, batch_size, device, seed)


def reevaluate(run_dir: str, device_name: str = "auto") -> dict:
    """Recompute the held-out PSNR/SSIM and moving-pixel figures of RUN_DIR/ckpt.pt, update
    summary.json, redraw."""
    model, ckpt = tokenizer.load_tokenizer(os.path.join(run_dir, "ckpt.pt"))
    a = ckpt["args"]
    device = common.pick_device(device_name, a.get("dtype", "auto"))  # the run's compute dtype
    model = model.to(device)
    # The held-out sampler as in training: its own seed, reset inside evaluate and report.
    held_loader = data.SequenceDataset(a["data"], "heldout", a["seq_len"], seed=a["seed"] + 1)
    result = tokenizer.evaluate(model, held_loader, a["eval_batches"], a["batch_size"], device,
                                a["seed"])
    print(f"held-out PSNR {result['psnr']:.2f} dB | SSIM {result['ssim']:.4f} (MAE p = 0), "
          f"step {ckpt['step']}")
    moving = report(model, held_loader, a["seed"], device, run_dir, a["eval_batches"],
                    a["batch_size"])
    path = os.path.join(run_dir, "summary.json")
    summary = {"stage": "tokenizer"}
    if os.path.exists(path):
        with open(path) as f:
            summary = json.load(f)
    summary.update({"heldout_psnr_db": result["psnr"], "heldout_ssim": result["ssim"]})
    summary.update(moving)
    common.write_json(path, summary)
    print(f"updated {path}; pictures: recon.png, curves.png")
    return summary


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="a tokenizer run folder holding ckpt.pt and metrics.jsonl")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    args = parser.parse_args(argv)
    reevaluate(args.run_dir, args.device)


if __name__ == "__main__":
    main()
