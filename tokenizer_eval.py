"""Measuring instruments of the tokenizer (tokenizer.py): pictures, and re-evaluating a run.

tokenizer.py calls `report` at the end of training; it draws
    recon.png   true frames | reconstruction | |error|, at MAE p = 0 and at p = 0.5
    curves.png  training loss terms and held-out PSNR over the steps (from metrics.jsonl)

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
import tokenizer


@torch.no_grad()
def save_recon_picture(model: tokenizer.Tokenizer, frames: torch.Tensor, path: str,
                       gen: torch.Generator) -> None:
    """Rows: true | reconstruction | |error|, at MAE p = 0 and at p = 0.5 (masked patches grey)."""
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
    names = ["true (p=0)", "recon (p=0)", "|err|×4", "input (p=0.5)", "recon (p=0.5)", "|err|×4"]
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


def report(model: tokenizer.Tokenizer, held_loader, seed: int, device, out: str) -> None:
    """Draw the pictures of a finished run into `out`: recon.png and curves.png.

    The reconstructions show one fixed held-out window (its own sampler seed) and one fixed
    p = 0.5 mask, so two runs with the same seed draw the same picture.
    """
    held_loader.rng = np.random.default_rng([seed, 999])
    frames = held_loader.sample(1)["frames"].to(device)  # (1, T, H, W, 3) uint8
    gen = torch.Generator().manual_seed(seed)
    save_recon_picture(model, frames, os.path.join(out, "recon.png"), gen)
    save_curves(out)


def reevaluate(run_dir: str, device_name: str = "auto") -> dict:
    """Recompute the held-out PSNR/SSIM of RUN_DIR/ckpt.pt, update summary.json, redraw."""
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
    report(model, held_loader, a["seed"], device, run_dir)
    path = os.path.join(run_dir, "summary.json")
    summary = {"stage": "tokenizer"}
    if os.path.exists(path):
        with open(path) as f:
            summary = json.load(f)
    summary.update({"heldout_psnr_db": result["psnr"], "heldout_ssim": result["ssim"]})
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
