"""GPU check: the default preset's speed and memory on this machine, in one JSON (≤ 8 min).

    python gpu_check.py                   # one GPU, default preset → runs/gpu_check.json
    python gpu_check.py --preset smoke    # tiny CPU mode (the test of this file)

Per training stage (tokenizer, dynamics) at the preset's model and batch: steps/s, frames/s, MFU
against the measured bf16 (or fp32) matmul peak of this card (common.matmul_peaks on large
square matmuls: what the card reaches, not a datasheet figure), peak memory. Generation: frames/s
of open-loop dynamics rollouts (K = 4 steps per frame, KV cache) at batch 1 and at the largest
batch that fits. Then the wall time `python dynamics.py --steps 10000` would take for training
alone (the final evaluation is not included). Also: the fused soft-capped attention against the
explicit form, forward and gradients, on this device.

Measured on random inputs of the right shapes (speed does not depend on the values), so no
dataset or checkpoint is needed. Not in paper: a tool of this implementation.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import torch

import common
import dynamics as dy
import environment
import tokenizer as tk


@dataclass
class Args:
    preset: str = "default"  # default (one GPU) | smoke (a few seconds on a CPU)
    out: str = "runs/gpu_check.json"  # the JSON written
    steps: int = 30  # timed training steps per stage (after warm-up)
    warmup: int = 5  # untimed steps first (kernel choice, compilation)
    gen_frames: int = 16  # frames generated per rollout measurement
    max_gen_batch: int = 1024  # the batch search for generation stops here
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "auto"  # auto | fp32 | bf16


PRESETS = {"smoke": dict(out="runs/smoke/gpu_check.json", steps=2, warmup=1, gen_frames=2,
                         max_gen_batch=4, device="cpu", dtype="fp32")}


def timed_steps(step_fn, opt, a: Args, device) -> dict:
    """Warm-up, one FLOP-counted step, then `a.steps` timed steps of step_fn() → speed figures."""
    for _ in range(a.warmup):
        step_fn()
    meter = common.FlopMeter(opt)  # stops itself at the counted step's opt.step()
    frames = step_fn()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    common.sync_device(device)
    t0, frames = time.perf_counter(), 0
    for _ in range(a.steps):
        frames += step_fn()
    common.sync_device(device)
    return meter.speed(device, time.perf_counter() - t0, a.steps, frames)


def tokenizer_speed(a: Args, device) -> dict:
    """Tokenizer training steps at its preset: MAE-masked encode/decode, Eq 5 with LPIPS (random
    backbone weights: the same FLOPs as the pretrained ones, and no download)."""
    t = tk.Args(**{**asdict(tk.Args()), **tk.PRESETS.get(a.preset, {})})
    model = tk.build_tokenizer(asdict(t)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    lpips_fn = tk.make_lpips(t.lpips_net, device, pretrained_backbone=False)
    norms = {"mse": common.RunningRMS(), "lpips": common.RunningRMS()}
    gen = torch.Generator().manual_seed(0)
    shape = (t.batch_size, t.seq_len, t.image_size, t.image_size, 3)
    frames = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen).to(device)

    def step():
        mae = tk.sample_mae_mask(t.batch_size, t.seq_len, model.n_patches, t.mae_max, gen, device)
        with common.autocast(device):
            recon = model(frames, mae).float()
        terms = tk.tokenizer_loss(recon, frames.float() / 255, lpips_fn, norms, t.lpips_weight)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()
        return t.batch_size * t.seq_len

    return timed_steps(step, opt, a, device)


def dynamics_setup(a: Args, device):
    """The preset's dynamics model (random weights) and its latent and action shapes."""
    d = dy.Args(**{**asdict(dy.Args()), **dy.PRESETS.get(a.preset, {})})
    t = tk.Args(**{**asdict(tk.Args()), **tk.PRESETS.get(a.preset, {})})
    classes = [int(n) for _, n in environment.ACTION_COMPONENTS]
    latent = (t.n_latents // 2, 2 * t.latent_dim)  # packed (App A), as dynamics.py trains
    model = dy.build_model(asdict(d), *latent, classes).to(device)
    return d, t, model, classes


def dynamics_speed(a: Args, device) -> dict:
    """Dynamics training steps as dynamics.py takes them: short and long batches alternating
    (batch_shape), shortcut forcing with the half-step passes. Also the extrapolated wall time
    of the preset's full run."""
    d, t, model, classes = dynamics_setup(a, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator(device).manual_seed(0)
    norm, counter = common.RunningRMS(), [0]

    def step():
        B, T = dy.batch_shape(counter[0] % (d.long_every * 4), d)  # never the long-only tail
        counter[0] += 1
        latents = torch.randn(B, T, t.n_latents, t.latent_dim, device=device, generator=gen)
        acts = torch.stack([torch.randint(0, n, (B, T), device=device, generator=gen)
                            for n in classes], -1)  # (B, T, A)
        fb = dy.forcing_batch(latents, acts, d.k_max, d.start_frac, gen, d.k_min, d.flow_frac)

        def f(z, tau, dd, rows=None):
            return model(z, tau, dd, *dy.row_select(fb, rows)).float()

        with common.autocast(device):
            terms = dy.shortcut_forcing_loss(f, fb["clean"], fb["noise"], fb["tau"], fb["d"],
                                             d.k_max, d.boot_clip)
        opt.zero_grad(set_to_none=True)
        norm(terms["loss"]).backward()
        opt.step()
        return B * T

    # a whole number of short/long cycles, so that steps/s is the run's average
    a_cycle = Args(**{**asdict(a), "steps": max(a.steps // d.long_every, 1) * d.long_every})
    speed = timed_steps(step, opt, a_cycle, device)
    speed["extrapolated_wall_min_steps_10000"] = 10000 / speed["steps_per_s"] / 60
    return speed


def generation_speed(a: Args, device) -> dict:
    """Frames/s of KV-cached rollouts at K = 4: batch 1, then doubling the batch until memory
    runs out (CUDA) or max_gen_batch; the largest batch that ran is reported."""
    d, t, model, classes = dynamics_setup(a, device)
    model.eval()
    gen = torch.Generator(device).manual_seed(0)
    N, C = t.n_latents // 2, 2 * t.latent_dim
    ctx = min(4, d.context - 1)

    def fps(B: int) -> float:
        context = torch.randn(B, ctx, N, C, device=device, generator=gen)
        acts = torch.stack([torch.randint(0, n, (B, ctx + a.gen_frames), device=device,
                                          generator=gen) for n in classes], -1)
        with torch.no_grad(), common.autocast(device):
            dy.rollout(model, context, acts, 1, 4, d.ctx_tau, gen)  # warm-up
            common.sync_device(device)
            t0 = time.perf_counter()
            dy.rollout(model, context, acts, a.gen_frames, 4, d.ctx_tau, gen)
            common.sync_device(device)
        return B * a.gen_frames / (time.perf_counter() - t0)

    out = {"gen_k": 4, "gen_fps_batch1": fps(1)}
    B, best = 2, (1, out["gen_fps_batch1"])
    while B <= a.max_gen_batch:
        try:
            best = (B, fps(B))
        except torch.OutOfMemoryError:
            break
        B *= 2
    if device.type == "cuda":
        torch.cuda.empty_cache()
    out.update(gen_largest_batch=best[0], gen_fps_largest_batch=best[1])
    return out


def fused_attention_check(device) -> dict:
    """Largest difference between FlexAttention and the explicit soft-capped form (outputs and
    the gradient of q), at a dynamics-like shape with GQA and a causal mask."""
    g = torch.Generator(device).manual_seed(0)
    q = torch.randn(4, 8, 32, 64, device=device, generator=g) * 4
    k, v = (torch.randn(4, 2, 32, 64, device=device, generator=g) for _ in range(2))
    mask = common.time_mask(32, 32, 16, device=device)
    res, saved = {}, common.FUSED_ATTENTION["on"]
    for fused in (False, True):
        common.FUSED_ATTENTION["on"] = fused
        qq = q.clone().requires_grad_(device.type != "cpu")  # no FlexAttention backward on CPU
        out = common.attend(qq, k, v, mask, 50.0)
        if qq.requires_grad:
            out.square().sum().backward()
        res[fused] = (out.detach(), qq.grad)
    common.FUSED_ATTENTION["on"] = saved
    check = {"fused_attention_max_abs_diff": float((res[True][0] - res[False][0]).abs().max())}
    if res[True][1] is not None:
        check["fused_attention_grad_max_abs_diff"] = float(
            (res[True][1] - res[False][1]).abs().max())
    return check


def main(argv: list[str] | None = None) -> dict:
    a = common.parse_args(Args, PRESETS, argv)
    t_start = time.time()
    device = common.pick_device(a.device, a.dtype)
    torch.manual_seed(0)
    dtype = common.compute_dtype(device)
    # The MFU reference: the card's measured peak on large square matmuls (the stage probe's small
    # shapes are sized for a CPU and would understate a GPU's peak).
    big = ((4096, 4096, 4096),) if device.type == "cuda" else common.PROBE_SHAPES
    peaks = common.matmul_peaks(device, big)
    common._COMPUTE["peaks"] = peaks
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    report = {"preset": a.preset, "device": str(device), "device_name": name,
              "compute_dtype": dtype, "torch": torch.__version__, "peak_flops": peaks,
              "fused_attention_on": common.FUSED_ATTENTION["on"] is not False
              and device.type == "cuda"}
    for stage, fn in (("tokenizer", tokenizer_speed), ("dynamics", dynamics_speed)):
        t0 = time.time()
        report[stage] = {**fn(a, device), "check_s": time.time() - t0}
        print(f"{stage}: {json.dumps(report[stage])}", flush=True)
    report["generation"] = generation_speed(a, device)
    report.update(fused_attention_check(device))
    report["check_wall_s"] = time.time() - t_start
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    common.write_json(a.out, report)
    print("gpu check:", json.dumps(report))
    return report


if __name__ == "__main__":
    main()
