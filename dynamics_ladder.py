"""The ladder of controls (not in paper): when the world model copies, where is the signal lost?

A measuring instrument beside dynamics.py. Each rung learns the same thing, the next frame from
the past frames and the actions, on the same data and is scored on the same held-out windows as
dynamics.evaluate (same seed, same windows, same scoring), so the rungs can be read side by side:

    copy        repeat the last context frame                           (no training)
    pixel_cnn   a small convolutional next-frame predictor in pixels    (~0.2 M parameters)
    latent_det  the dynamics network itself (DynamicsModel) as a deterministic next-latent
                predictor: clean history in, ẑ_t out, plain MSE — no noise, no shortcut
    latent_routed  the same network and task, but frame t's tokens hold pure noise (τ = 0,
                d = 1: one sampling step, K = 1) and the past arrives as dynamics.py's history
                stream at τ_ctx through time attention: how the diffusion model must read it
    dynamics    dynamics.py (its run folder), at several steps × widths: the scaling curve

The first rung that beats copying says where the signal is lost: if the pixel CNN beats copying
and latent_det does not, the latents or the network are the limit; if latent_det does and
latent_routed does not, reading the last frame through time attention is; if both do and
dynamics.py does not, the diffusion objective at this budget is.

Figures per rung (held-out, open loop, true actions unless said): rollout PSNR over the horizon,
one-step PSNR (the first generated frame, whose history is real), the repeat-last baseline, the
action-shuffle gap (another window's actions), PSNR on the pixels that change, and for the
built-in world the share of frames with the agent on the right tile at the 1st and 8th frame.

Run (after tokenizer.py --preset cpu; same held-out windows as dynamics.py --preset cpu):
    python dynamics_ladder.py pixel_cnn --preset cpu           # ≈ 15 min on 2 cores
    python dynamics_ladder.py latent_det --preset cpu          # ≈ 10 min on 2 cores
    python dynamics_ladder.py latent_routed --preset cpu       # ≈ 10 min on 2 cores
    python dynamics_ladder.py table runs/cpu/ladder/pixel_cnn,runs/cpu/ladder/latent_det,\
runs/cpu/ladder/latent_routed,runs/cpu/dynamics
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import dynamics as dy
import dynamics_eval as de
from tokenizer import LatentCache, load_tokenizer, pack
from tokenizer_eval import changed_mask


@dataclass
class Args:
    preset: str = "cpu"  # smoke | cpu: the dynamics preset whose data, windows and budget are used
    tokenizer: str = ""  # tokenizer checkpoint (default: the dynamics preset's)
    out: str = ""  # run folder (default: runs/<preset>/ladder/<rung>)
    steps: int = 5000  # optimiser steps (each rung's preset sets its own)
    batch: int = 32  # windows per step (each rung's preset sets its own)
    width: int = 48  # pixel_cnn channels / latent_* model width (the preset's dynamics width)
    lr: float = 2e-3  # AdamW peak learning rate (each rung's preset sets its own)
    seed: int = 0  # model init and data streams; the held-out windows follow dynamics.py's seed 0
    eval_seqs: int = 64  # held-out windows: the first 64 of the 128 dynamics.py --preset cpu scores
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "auto"  # auto | fp32 | bf16 (the start-up probe of common.py)


# The budget of each rung at each preset: steps and batches sized so that a rung fits the
# dynamics stage's budget (≤ 15 min on 2 cores at cpu). Widths: ~0.2 M parameters for the CNN;
# the dynamics preset's own network for latent_det and latent_routed.
RUNGS = {
    "pixel_cnn": {"smoke": dict(steps=6, batch=4, width=8, lr=2e-3),
                  "cpu": dict(steps=5000, batch=32, width=48, lr=2e-3)},
    "latent_det": {"smoke": dict(steps=6, batch=4, width=32, lr=1e-3),
                   "cpu": dict(steps=6000, batch=8, width=128, lr=1e-3)},
    "latent_routed": {"smoke": dict(steps=6, batch=4, width=32, lr=1e-3),
                      "cpu": dict(steps=3000, batch=8, width=128, lr=1e-3)},
}


# ---- Rung: a small convolutional next-frame predictor in pixels ---------------------------------


class PixelCNN(nn.Module):
    """x̂_t = x_{t−1} + g(x_{t−1}, x_{t−2}, one-hot a_{t−1}): a residual next-frame predictor.

    Dilated 3×3 residual blocks (dilations 1, 2, 4, 1) see ±17 pixels, enough for the agent's
    one-tile move at 32 × 32 (4-pixel tiles). The actions enter as constant one-hot planes.
    """

    def __init__(self, action_classes: list[int], width: int = 48):
        super().__init__()
        self.action_classes = [max(n, 1) for n in action_classes]
        c_in = 6 + sum(self.action_classes)
        self.inp = nn.Conv2d(c_in, width, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.GroupNorm(8, width), nn.GELU(),
                          nn.Conv2d(width, width, 3, padding=r, dilation=r),
                          nn.GELU(), nn.Conv2d(width, width, 3, padding=1))
            for r in (1, 2, 4, 1))
        self.out = nn.Conv2d(width, 3, 1)
        nn.init.zeros_(self.out.weight)  # starts as "copy the last frame"
        nn.init.zeros_(self.out.bias)

    def forward(self, prev2: torch.Tensor, prev1: torch.Tensor, action) -> torch.Tensor:
        """prev2, prev1: x_{t−2}, x_{t−1} (B, H, W, 3) in 0…1; action a_{t−1} (B, A) → x̂_t."""
        B, H, W, _ = prev1.shape
        planes = [prev2.permute(0, 3, 1, 2), prev1.permute(0, 3, 1, 2)]  # 2 × (B, 3, H, W)
        for c, n in enumerate(self.action_classes):
            if action is None:  # unlabelled video: no action planes carry information
                onehot = torch.zeros(B, n, device=prev1.device)
            elif n > 1:
                onehot = F.one_hot(action[:, c].long().clamp(0, n - 1), n).float()  # (B, n)
            else:  # a continuous component: its value
                onehot = action[:, c:c + 1].float()  # (B, 1)
            planes.append(onehot[:, :, None, None].expand(-1, -1, H, W))  # (B, n, H, W)
        h = self.inp(torch.cat(planes, 1))  # (B, width, H, W)
        for block in self.blocks:
            h = h + block(h)
        return (prev1 + self.out(h).permute(0, 2, 3, 1)).float()  # (B, H, W, 3)


def pixel_rollout(model: PixelCNN, frames: torch.Tensor, actions, Tc: int, H: int) -> torch.Tensor:
    """Open loop: frames (B, T_c + H, H_px, W_px, 3) (only the context is read), actions (B, T, A)
    a_t taken at frame t → the H generated frames (B, H, H_px, W_px, 3)."""
    past = [frames[:, Tc - 2], frames[:, Tc - 1]]  # x_{t−2}, x_{t−1}: (B, H_px, W_px, 3) each
    out = []
    for t in range(Tc, Tc + H):
        act = None if actions is None else actions[:, t - 1]  # a_{t−1} leads into frame t
        with common.autocast(frames.device):
            x = model(past[-2], past[-1], act).clamp(0, 1)  # (B, H_px, W_px, 3)
        out.append(x)
        past.append(x)
    return torch.stack(out, 1)  # (B, H, H_px, W_px, 3)


# ---- Rung: the dynamics network as a deterministic next-latent predictor ------------------------


def previous_actions(actions, B: int, T: int, device) -> tuple:
    """a_{t−1} per frame (B, T, A) and its validity (B, T) (dynamics.shift_actions); without
    actions, None and nothing valid."""
    if actions is None:
        return None, torch.zeros(B, T, dtype=torch.bool, device=device)
    return dy.shift_actions(actions)


def det_inputs(clean: torch.Tensor) -> torch.Tensor:
    """Teacher forcing: the latent tokens of frame t hold z_{t−1} (zeros at t = 0), so that the
    network's output at frame t is a prediction of z_t. clean (B, T, N_z, C_z) → same shape."""
    return torch.cat([torch.zeros_like(clean[:, :1]), clean[:, :-1]], 1)  # (B, T, N_z, C_z)


def det_forward(model: dy.DynamicsModel, inputs: torch.Tensor, actions) -> torch.Tensor:
    """ẑ_t for every frame t of inputs (B, T, N_z, C_z) (see det_inputs); actions (B, T, A).
    The (τ, d) token is a constant (τ = 0, d = 1): a deterministic predictor has no noise."""
    B, T = inputs.shape[:2]
    tau = torch.zeros(B, T, device=inputs.device)  # (B, T)
    d = torch.ones(B, T, device=inputs.device)  # (B, T)
    prev, valid = previous_actions(actions, B, T, inputs.device)  # a_{t−1} at frame t
    return model(inputs, tau, d, prev, valid).float()  # (B, T, N_z, C_z)


@torch.no_grad()
def det_rollout(model, ctx: torch.Tensor, actions, H: int) -> torch.Tensor:
    """Open loop in latents: context (B, T_c, N_z, C_z), actions (B, T_c + H, A) → (B, H, N_z, C_z).
    Recomputes the history at each step (short horizons; no cache needed)."""
    z = ctx
    Tc = ctx.shape[1]
    for t in range(Tc, Tc + H):
        acts = None if actions is None else actions[:, :t + 1]
        inputs = det_inputs(torch.cat([z, torch.zeros_like(z[:, :1])], 1))  # (B, t + 1, N, C)
        with common.autocast(ctx.device):
            nxt = det_forward(model, inputs[:, -model.window:], acts if acts is None
                              else acts[:, -model.window:])[:, -1:]  # (B, 1, N_z, C_z)
        z = torch.cat([z, nxt.clamp(-1, 1)], 1)  # the tanh bottleneck's range
    return z[:, Tc:]


# ---- Rung: the same task read through time attention, as the diffusion model reads it ----------


def routed_forward(model: dy.DynamicsModel, clean: torch.Tensor, actions, tau_ctx: float,
                   gen: torch.Generator | None = None) -> torch.Tensor:
    """ẑ_t for every frame of clean (B, T, N_z, C_z): frame t's tokens hold pure noise with the
    (τ = 0, d = 1) token — one sampling step, K = 1 — and frames j < t enter as the history stream
    at τ_ctx (dynamics.history_stream, the KV cache's layout when sampling). Returns (B, T, N_z,
    C_z)."""
    B, T = clean.shape[:2]
    dev = clean.device
    history = dy.corrupt(torch.randn(clean.shape, generator=gen, device=dev), clean, tau_ctx)
    z = torch.randn(clean.shape, generator=gen, device=dev)  # τ = 0: pure noise
    tau, d = torch.zeros(B, T, device=dev), torch.ones(B, T, device=dev)  # (B, T) each
    prev, valid = previous_actions(actions, B, T, dev)  # (B, T, A) or None, (B, T)
    *inputs, layout = dy.history_stream(z, tau, d, history, prev, valid, None, tau_ctx,
                                        model.k_max, model.window, model.n_tokens)
    out = model(*inputs, time_layout=layout)  # (B, 2T, N_z, C_z)
    return out[:, T:].float()  # the frames being predicted


# ---- Scoring: the same held-out windows and figures for every rung ------------------------------


def held_out_windows(held: LatentCache, a_dyn: dy.Args, n: int, device) -> dict:
    """The held-out windows of dynamics.evaluate (its seed and generator), n of them."""
    Tc, H = a_dyn.eval_context, a_dyn.eval_horizon
    held.rng = np.random.default_rng([a_dyn.seed, 999])
    batch = held.sample(n, Tc + H, with_frames=True)
    acts = None if batch["actions"] is None else batch["actions"].to(device)  # (B, T, A)
    return {"batch": batch, "latents": batch["latents"].to(device), "actions": acts,
            "true": batch["frames"].to(device).float() / 255}  # (B, T, H_px, W_px, 3)


def shuffled_actions(actions: torch.Tensor, Tc: int) -> torch.Tensor:
    """Another window's actions from the one leading into the first generated frame on (as in
    dynamics.evaluate)."""
    out = actions.clone()
    out[:, Tc - 1:] = actions[torch.roll(torch.arange(len(actions)), 1), Tc - 1:]
    return out


def score(generate, win: dict, Tc: int, H: int, builtin: bool) -> dict:
    """generate(actions) → pixels (B, H, H_px, W_px, 3): the rung's open-loop rollout. Returns
    the rung's figures (see the module docstring)."""
    true = win["true"]
    target = true[:, Tc:]  # (B, H, H_px, W_px, 3)
    px = generate(win["actions"])
    repeat = true[:, Tc - 1:Tc].expand_as(target)  # (B, H, H_px, W_px, 3)
    out = {**dy.psnr_scores("model", px, target), **dy.psnr_scores("repeat_last", repeat, target)}
    out["one_step_psnr"] = out["psnr_model_per_horizon"][0]
    out["one_step_psnr_repeat_last"] = out["psnr_repeat_last_per_horizon"][0]
    out["gain_over_repeat_last_db"] = out["psnr_model"] - out["psnr_repeat_last"]
    if win["actions"] is not None:
        shuffled = generate(shuffled_actions(win["actions"], Tc))
        out.update(dy.psnr_scores("shuffled", shuffled, target))
        out["action_shuffle_gap_db"] = out["psnr_model"] - out["psnr_shuffled"]
        out["one_step_shuffle_gap_db"] = (out["psnr_model_per_horizon"][0]
                                          - out["psnr_shuffled_per_horizon"][0])
    changed = changed_mask(true[:, Tc - 1:-1], target)  # (B, H, H_px, W_px)
    out.update(de.split_scores("model", px, target, changed))
    out.update(de.split_scores("repeat_last", repeat, target, changed))
    if builtin:  # the recorded frames are the real environment's under the true actions
        real = (target * 255).round().byte().cpu().numpy()
        for name, x in (("model", px), ("repeat_last", repeat)):
            hits = de.follow_hits(x.cpu().numpy() * 255, real)["tile"].mean(0)  # (H,)
            out[f"tile_acc_{name}_first"] = float(hits[0])
            out[f"tile_acc_{name}_8th"] = float(hits[min(7, len(hits) - 1)])
    return out


# ---- Training the rungs -------------------------------------------------------------------------


def train_rung(rung: str, a: Args) -> dict:
    common.seed_everything(a.seed)
    a_dyn = dy.Args(**{**asdict(dy.Args()), **dy.PRESETS[a.preset], "preset": a.preset})
    steps, batch, width, lr = a.steps, a.batch, a.width, a.lr
    out = a.out or os.path.join(os.path.dirname(a_dyn.out), "ladder", rung)
    a.dtype = a.dtype if a.dtype != "auto" else dy.PRESETS[a.preset].get("dtype", "auto")
    device = common.pick_device(a.device, a.dtype)
    a.dtype = common.compute_dtype(device)
    os.makedirs(out, exist_ok=True)
    tok_path = a.tokenizer or a_dyn.tokenizer
    tok, _ = load_tokenizer(tok_path, device)
    tok_dir = os.path.dirname(os.path.abspath(tok_path))
    train_data = LatentCache(tok_dir, "train", seed=a.seed)
    held = LatentCache(tok_dir, "heldout", seed=a.seed + 1)
    classes = [int(n) for _, n in train_data.meta.get("action_components", [])]
    Tc, H = a_dyn.eval_context, a_dyn.eval_horizon
    if rung == "pixel_cnn":
        model = PixelCNN(classes, width).to(device)
        T = 3  # x_{t−2}, x_{t−1} → x_t
    else:  # the dynamics preset's network
        n_b, d_b = train_data.latents.shape[-2:]
        model = dy.build_model({**asdict(a_dyn), "dim": width}, n_b // 2, 2 * d_b,
                               classes).to(device)
        T = a_dyn.seq_len
    tau_ctx = dy.context_signal_level(a_dyn.ctx_tau, a_dyn.k_max)
    gen = torch.Generator(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"ladder rung {rung}: {n_params / 1e6:.3f}M parameters, {steps} steps × {batch} "
          f"windows of {T} frames, lr {lr}, out {out}")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = min(200, steps // 10)
    t0, losses = time.time(), []
    for step in range(steps):
        train_data.rng = np.random.default_rng([a.seed, step])
        b = train_data.sample(batch, T, with_frames=(rung == "pixel_cnn"))
        acts = None if b["actions"] is None else b["actions"].to(device)  # (B, T, A)
        for g in opt.param_groups:
            g["lr"] = common.lr_at(step, lr, warmup, steps)  # warm-up, cosine decay to 10 %
        with common.autocast(device):
            if rung == "pixel_cnn":
                x = b["frames"].to(device).float() / 255  # (B, 3, H_px, W_px, 3)
                pred = model(x[:, 0], x[:, 1], None if acts is None else acts[:, 1])
                loss = (pred - x[:, 2]).pow(2).mean()
            elif rung == "latent_det":
                clean = pack(b["latents"].to(device))  # (B, T, N_z, C_z)
                loss = (det_forward(model, det_inputs(clean), acts) - clean).pow(2).mean()
            else:
                gen.manual_seed(a.seed * 1_000_003 + step)
                clean = pack(b["latents"].to(device))  # (B, T, N_z, C_z)
                loss = (routed_forward(model, clean, acts, tau_ctx, gen) - clean).pow(2).mean()
        common.check_finite(step, loss=loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 500 == 0 or step + 1 == steps:
            print(f"step {step + 1}/{steps} | loss {np.mean(losses[-500:]):.6f} | "
                  f"{(step + 1) / (time.time() - t0):.1f} steps/s", flush=True)
    wall = time.time() - t0

    model.eval()
    win = held_out_windows(held, a_dyn, a.eval_seqs, device)
    builtin = win["actions"] is not None and held.meta.get("generator") == de.data.GENERATOR

    @torch.no_grad()
    def generate(actions):
        if rung == "pixel_cnn":
            return pixel_rollout(model, win["true"], actions, Tc, H)
        ctx = pack(win["latents"][:, :Tc])  # (B, T_c, N_z, C_z)
        if rung == "latent_det":
            z = det_rollout(model, ctx, actions, H)  # (B, H, N_z, C_z)
        else:  # dynamics.py's own sampler with the KV cache, K = 1
            with common.autocast(device):
                z = dy.rollout(model, ctx, actions, H, 1, a_dyn.ctx_tau,
                               torch.Generator(device).manual_seed(a.seed)).float()
        return dy.decode_after(tok, win["latents"][:, :Tc], z, device)

    summary = {"rung": rung, "preset": a.preset, "params_m": n_params / 1e6, "steps": steps,
               "batch": batch, "frames_per_step": batch * T, "width": width, "lr": lr,
               "train_s": wall, "steps_per_s": steps / wall, "dtype": a.dtype,
               "eval_context": Tc, "eval_horizon": H, "eval_seqs": a.eval_seqs,
               **score(generate, win, Tc, H, builtin)}
    common.write_json(os.path.join(out, "summary.json"), summary)
    print_row(out, summary)
    return summary


# ---- The table ----------------------------------------------------------------------------------


def row_of(run: str) -> dict:
    """A ladder rung's or a dynamics run's figures, in the ladder's names."""
    s = json.load(open(os.path.join(run, "summary.json")))
    if s.get("stage") != "dynamics":
        return s
    k = s["sample_k"]
    return {"psnr_model": s[f"psnr_k{k}"], "psnr_repeat_last": s["psnr_repeat_last"],
            "one_step_psnr": s[f"psnr_k{k}_per_horizon"][0],
            "one_step_psnr_repeat_last": s["psnr_repeat_last_per_horizon"][0],
            "action_shuffle_gap_db": s.get("action_shuffle_gap_db"),
            "psnr_changed_model": s.get(f"psnr_changed_k{k}"),
            "psnr_changed_repeat_last": s.get("psnr_changed_repeat_last"),
            "tile_acc_model_first": s.get("follow_tile_acc_first"),
            "tile_acc_model_8th": s.get("follow_tile_acc_8th"),
            "params_m": s["params_m"], "steps": s["steps"], "train_s": s.get("wall_s")}


def print_row(run: str, r: dict) -> None:
    def f(key, spec=".2f"):
        return "—" if r.get(key) is None else format(r[key], spec)
    print(f"{run:38s} | rollout {f('psnr_model')} (copy {f('psnr_repeat_last')}) | one-step "
          f"{f('one_step_psnr')} (copy {f('one_step_psnr_repeat_last')}) | shuffle gap "
          f"{f('action_shuffle_gap_db')} | changed px {f('psnr_changed_model')} (copy "
          f"{f('psnr_changed_repeat_last')}) | tile 1st/8th {f('tile_acc_model_first')}/"
          f"{f('tile_acc_model_8th')} | {f('params_m', '.3f')}M, {r.get('steps')} steps")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in (*RUNGS, "table"):
        sys.exit("usage: python dynamics_ladder.py {pixel_cnn,latent_det,latent_routed} "
                 "[--preset cpu …] | "
                 "python dynamics_ladder.py table RUN_DIR,RUN_DIR,…")
    if argv[0] == "table":
        for run in argv[1].split(","):
            print_row(run, row_of(run))
        return
    train_rung(argv[0], common.parse_args(Args, RUNGS[argv[0]], argv[1:]))


if __name__ == "__main__":
    main()
