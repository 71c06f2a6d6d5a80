"""GPU check: the default preset's speed and memory on this machine, in one JSON (≤ 8 min).

    python gpu_check.py                   # one GPU, default preset → runs/gpu_check.json
    python gpu_check.py --preset smoke    # tiny CPU mode (the test of this file)

Per training stage at the preset's model and batch (tokenizer; dynamics, its short and its long
batches apart; agent): steps/s, frames/s, MFU against this card's measured matmul peak in the
compute dtype (common.matmul_peaks on large square matmuls: what the card reaches, not a
datasheet figure), peak memory. Generation: frames/s of open-loop dynamics rollouts (K = 4 steps
per frame, KV cache) at batch 1 and at the largest batch that fits. The training wall time of
`python dynamics.py --steps 10000`: the measured short and long steps, weighted by that run's
schedule of them (batch_shape). The fused soft-capped attention against the explicit form
(outputs, and gradients where FlexAttention has a backward), and the dynamics' speed with the
explicit form. Last, the targets of the default preset on one GPU, met or not.

Each step is the stage's own training step (model, loss, RMS normalisers, AdamW, clipping; the
dynamics its EMA too) on random inputs of the right shapes: speed does not depend on the values,
so no dataset or checkpoint is needed (the stages' data sampling, from arrays in memory, is not
timed; nor is their final evaluation). A measurement stops after --steps steps or --seconds
seconds, whichever comes first, so that a slower card still finishes. imagine.py is not timed:
its step is mostly generating rollouts, which the generation figures measure. Not in paper.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass, replace

import torch

import agent as ag
import common
import dynamics as dy
import environment
import tokenizer as tk


@dataclass
class Args:
    preset: str = "default"  # default (one GPU) | smoke (a few seconds on a CPU)
    out: str = "runs/gpu_check.json"  # the JSON written
    steps: int = 30  # timed training steps per measurement (after warm-up)
    warmup: int = 5  # untimed steps first (kernel choice, compilation)
    seconds: float = 30.0  # a measurement stops after this long even before --steps
    gen_frames: int = 32  # frames generated per rollout, after gen_context context frames
    gen_context: int = 8  # context frames of the rollouts (as dynamics_eval's speed figure)
    max_gen_batch: int = 1024  # the batch search for generation stops here
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "auto"  # auto | fp32 | bf16


PRESETS = {"smoke": dict(out="runs/smoke/gpu_check.json", steps=2, warmup=1, gen_frames=2,
                         gen_context=2, max_gen_batch=4, device="cpu", dtype="fp32")}

# The default preset on one H100-class GPU (the project's targets; a check, not a claim).
TARGETS = {"dynamics_10k_wall_min": ("≤", 10.0), "peak_mem_gb": ("≤", 8.0),
           "gen_fps_batch1": ("≥", 200.0), "dynamics_mfu": ("≥", 0.25)}


def preset_args(module, preset: str):
    """A stage's Args at a preset, as its command line would build them."""
    return module.Args(**{**asdict(module.Args()), **module.PRESETS.get(preset, {})})


def timed_steps(step_fn, opt, a: Args, device) -> dict:
    """Warm-up, one FLOP-counted step, then up to `a.steps` timed steps of step_fn() (it returns
    its frames) → summary.json's speed keys: steps/s, frames/s, MFU, peak memory."""
    for _ in range(a.warmup):
        step_fn()
    meter = common.FlopMeter(opt)  # stops itself at the counted step's opt.step()
    step_fn()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    common.sync_device(device)
    t0, steps, frames = time.perf_counter(), 0, 0
    while steps < a.steps and (steps == 0 or time.perf_counter() - t0 < a.seconds):
        frames += step_fn()  # the RMS normaliser reads the loss: one sync per step
        steps += 1
    common.sync_device(device)
    return meter.speed(device, time.perf_counter() - t0, steps, frames)


def random_actions(classes: list[int], B: int, T: int, gen, device) -> torch.Tensor:
    """(B, T, A) int64 actions of the built-in environment's components."""
    return torch.stack([torch.randint(0, n, (B, T), device=device, generator=gen)
                        for n in classes], -1)


def tokenizer_speed(a: Args, device) -> dict:
    """Tokenizer training steps at its preset: MAE-masked encode/decode, Eq 5 with LPIPS (random
    backbone weights: the same FLOPs as the pretrained ones, and no download)."""
    t = preset_args(tk, a.preset)
    model = tk.build_tokenizer(asdict(t)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay,
                            betas=(0.9, 0.95))
    lpips_fn = tk.make_lpips(t.lpips_net, device, pretrained_backbone=False)
    norms = {"mse": common.RunningRMS(), "lpips": common.RunningRMS()}
    gen = torch.Generator().manual_seed(0)  # sample_mae_mask draws on the CPU, as in train()
    shape = (t.batch_size, t.seq_len, t.image_size, t.image_size, 3)
    frames = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen).to(device)

    def step():
        mae = tk.sample_mae_mask(t.batch_size, t.seq_len, model.n_patches, t.mae_max, gen, device)
        with common.autocast(device):
            recon = model(frames, mae).float()  # (B, T, H, W, 3)
        terms = tk.tokenizer_loss(recon, frames.float() / 255, lpips_fn, norms, t.lpips_weight)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        return t.batch_size * t.seq_len

    return timed_steps(step, opt, a, device)


def dynamics_setup(a: Args, device):
    """The preset's dynamics Args, tokenizer Args, model (random weights) and action classes."""
    d, t = preset_args(dy, a.preset), preset_args(tk, a.preset)
    classes = [int(n) for _, n in environment.ACTION_COMPONENTS]
    latent = (t.n_latents // 2, 2 * t.latent_dim)  # packed (App A), as dynamics.py trains
    model = dy.build_model(asdict(d), *latent, classes).to(device)
    return d, t, model, classes


def dynamics_trainer(a: Args, device):
    """step(B, T): one dynamics training step as dynamics.py takes it (shortcut forcing with the
    half-step passes, RMS normaliser, AdamW, clipping, EMA) on random latents. Returns (d, opt,
    step)."""
    d, t, model, classes = dynamics_setup(a, device)
    opt = torch.optim.AdamW(model.parameters(), lr=d.lr, weight_decay=d.weight_decay,
                            betas=(0.9, 0.95))
    ema = copy.deepcopy(model).requires_grad_(False)
    gen = torch.Generator(device).manual_seed(0)
    norm, done = common.RunningRMS(), [0]

    def step(B: int, T: int) -> int:
        latents = torch.randn(B, T, t.n_latents, t.latent_dim, device=device, generator=gen)
        acts = random_actions(classes, B, T, gen, device)  # (B, T, A)
        fb = dy.forcing_batch(latents, acts, d.k_max, d.start_frac, gen, d.k_min, d.flow_frac)

        def f(z, tau, dd, rows=None):
            return model(z, tau, dd, *dy.row_select(fb, rows)).float()

        with common.autocast(device):
            terms = dy.shortcut_forcing_loss(f, fb["clean"], fb["noise"], fb["tau"], fb["d"],
                                             d.k_max, d.boot_clip)
        opt.zero_grad(set_to_none=True)
        norm(terms["loss"]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), d.grad_clip)
        opt.step()
        done[0] += 1
        dy.ema_update(ema, model, done[0], d.ema)
        return B * T

    return d, opt, step


def dynamics_speed(a: Args, device) -> dict:
    """The short (B₁ × T₁) and long (B₂ × T₂) training steps, timed apart; the stage's figures
    over the schedule of `python dynamics.py --steps 10000`, whose training wall time follows."""
    d, opt, step = dynamics_trainer(a, device)
    short = timed_steps(lambda: step(d.batch, d.seq_len), opt, a, device)
    long = timed_steps(lambda: step(d.batch_long, d.seq_len_long), opt, a, device)
    run = replace(d, steps=10000)
    n_long = sum(dy.batch_shape(s, run) == (d.batch_long, d.seq_len_long) for s in range(10000))
    n_short = 10000 - n_long
    wall = n_short / short["steps_per_s"] + n_long / long["steps_per_s"]  # seconds
    frames = n_short * d.batch * d.seq_len + n_long * d.batch_long * d.seq_len_long
    flops = n_short * short["flops_per_step"] + n_long * long["flops_per_step"]
    return {"steps_per_s": 10000 / wall, "frames_per_s": frames / wall,
            "mfu": flops / wall / short["peak_flops"], "flops_per_step": flops / 10000,
            "peak_mem_gb": max(short["peak_mem_gb"], long["peak_mem_gb"]),
            "long_steps_of_10000": n_long, "extrapolated_wall_min_steps_10000": wall / 60,
            "short": short, "long": long}


def agent_speed(a: Args, device) -> dict:
    """Agent finetuning steps at its preset, as agent.py takes them from a dynamics checkpoint:
    the Eq 7 video loss on the uniform rows, the agent pass at τ_ctx, Eq 9 (BC on the relevant
    rows, reward on all), three RMS normalisers, AdamW, clipping."""
    d, t, dyn, classes = dynamics_setup(a, device)
    g = preset_args(ag, a.preset)
    n_tasks = len(environment.TASKS)
    model = ag.AgentModel(dyn, n_tasks, g.head_hidden, g.mtp, g.bins).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=g.lr, weight_decay=g.weight_decay,
                            betas=(0.9, 0.95))
    norms = {k: common.RunningRMS() for k in ("video", "bc", "reward")}
    gen = torch.Generator(device).manual_seed(0)
    B, T = g.batch, g.seq_len
    n_uni = B - int(round(B * g.relevant_frac))
    tau_c, d_min = dy.context_signal_level(g.ctx_tau, model.k_max), 1 / model.k_max

    def step():
        lat = torch.randn(B, T, t.n_latents, t.latent_dim, device=device, generator=gen)
        acts = random_actions(classes, B, T, gen, device)  # (B, T, A)
        task = torch.randint(0, n_tasks, (B,), device=device, generator=gen)  # (B,)
        rewards = (torch.rand(B, T, device=device, generator=gen) < 0.05).float()  # (B, T)
        event = torch.full((B,), T // 2, device=device)  # (B,) the relevant rows' reward
        relevant = torch.arange(B, device=device) >= n_uni  # (B,)
        with common.autocast(device):
            fb = dy.forcing_batch(lat[:n_uni], acts[:n_uni], model.k_max, g.start_frac, gen,
                                  d.k_min, d.flow_frac)

            def f(z, tau, dd, rows=None):
                prev, valid, indep = dy.row_select(fb, rows)
                row_task = task[:n_uni] if rows is None else task[:n_uni][rows]
                return model(z, tau, dd, prev, valid, row_task, indep)[0].float()

            video = dy.shortcut_forcing_loss(f, fb["clean"], fb["noise"], fb["tau"], fb["d"],
                                             model.k_max, d.boot_clip)["loss"]
            clean = tk.pack(lat)  # (B, T, N_z, C_z)
            z_ctx = dy.corrupt(torch.randn(clean.shape, generator=gen, device=device), clean,
                               tau_c)
            full = torch.full((B, T), tau_c, device=device)
            _, h = model(z_ctx, full, torch.full_like(full, d_min), *dy.shift_actions(acts), task)
            tgt = ag.mtp_targets(acts, rewards, g.mtp, event)
            eq9 = ag.agent_loss(model.policy(h), model.reward_logits(h), tgt["actions"],
                                tgt["rewards"], tgt["bc"] & relevant[:, None, None],
                                tgt["reward"], model.bins)
        loss = norms["video"](video) + norms["bc"](eq9["bc"]) + norms["reward"](eq9["reward"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), g.grad_clip)
        opt.step()
        return B * T

    return timed_steps(step, opt, a, device)


def generation_speed(a: Args, device) -> dict:
    """Frames/s of KV-cached rollouts at K = 4: batch 1, then doubling the batch until memory
    runs out, max_gen_batch, or --seconds of searching; the largest batch that ran, and why the
    search stopped."""
    d, t, model, classes = dynamics_setup(a, device)
    model.eval()
    gen = torch.Generator(device).manual_seed(0)
    N, C = t.n_latents // 2, 2 * t.latent_dim
    ctx = min(a.gen_context, d.context - 1)

    def fps(B: int) -> float:
        context = torch.randn(B, ctx, N, C, device=device, generator=gen)
        acts = random_actions(classes, B, ctx + a.gen_frames, gen, device)
        with torch.no_grad(), common.autocast(device):
            # warm-up on the same shapes: kernel choice (and compilation) is not throughput
            dy.rollout(model, context, acts, a.gen_frames, 4, d.ctx_tau, gen)
            common.sync_device(device)
            t0 = time.perf_counter()
            dy.rollout(model, context, acts, a.gen_frames, 4, d.ctx_tau, gen)
            common.sync_device(device)
        return B * a.gen_frames / (time.perf_counter() - t0)

    out = {"gen_k": 4, "gen_context": ctx, "gen_frames": a.gen_frames, "gen_fps_batch1": fps(1)}
    best, B, t_search, stop = (1, out["gen_fps_batch1"]), 2, time.time(), "max_gen_batch"
    while B <= a.max_gen_batch:
        if time.time() - t_search > a.seconds:
            stop = "seconds"
            break
        try:
            best = (B, fps(B))
        except torch.cuda.OutOfMemoryError:
            stop = "memory"
            break
        B *= 2
    if device.type == "cuda":
        torch.cuda.empty_cache()
    out.update(gen_largest_batch=best[0], gen_fps_largest_batch=best[1], gen_search_stop=stop)
    return out


def fused_attention_check(a: Args, device) -> dict:
    """FlexAttention against the explicit soft-capped form at a dynamics-like shape (GQA, the
    causal windowed time mask): the largest differences of the outputs and of q's gradient
    (FlexAttention has no backward on a CPU); then the dynamics' short step with the explicit
    form, to compare with dynamics.short (the fused one where it is on)."""
    g = torch.Generator(device).manual_seed(0)
    q = torch.randn(4, 8, 32, 64, device=device, generator=g) * 4
    k, v = (torch.randn(4, 2, 32, 64, device=device, generator=g) for _ in range(2))
    mask = common.time_mask(32, 32, 16, device=device)
    res, saved, check = {}, common.FUSED_ATTENTION["on"], {}
    try:
        for fused in (False, True):
            common.FUSED_ATTENTION["on"] = fused  # forced: a failing kernel raises here
            qq = q.clone().requires_grad_(device.type != "cpu")
            out = common.attend(qq, k, v, mask, 50.0)
            if qq.requires_grad:
                out.square().sum().backward()
            res[fused] = (out.detach(), qq.grad)
        check["fused_max_abs_diff"] = float((res[True][0] - res[False][0]).abs().max())
        if res[True][1] is not None:
            check["fused_grad_max_abs_diff"] = float((res[True][1] - res[False][1]).abs().max())
    except Exception as e:  # the kernel does not run here: that is the finding, in the JSON
        check["fused_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    try:
        common.FUSED_ATTENTION["on"] = False
        d, opt, step = dynamics_trainer(a, device)
        explicit = timed_steps(lambda: step(d.batch, d.seq_len), opt, a, device)
        check["dynamics_short_steps_per_s_explicit"] = explicit["steps_per_s"]
    finally:
        common.FUSED_ATTENTION["on"] = saved
    return check


def targets(report: dict) -> dict:
    """Each target of TARGETS: the measured value and whether it is met."""
    dyn, gen = report["dynamics"], report["generation"]
    measured = {"dynamics_10k_wall_min": dyn["extrapolated_wall_min_steps_10000"],
                "peak_mem_gb": max(report[s]["peak_mem_gb"]
                                   for s in ("tokenizer", "dynamics", "agent")),
                "gen_fps_batch1": gen["gen_fps_batch1"], "dynamics_mfu": dyn["mfu"]}
    out = {}
    for key, (rel, bound) in TARGETS.items():
        met = measured[key] <= bound if rel == "≤" else measured[key] >= bound
        out[key] = {"measured": measured[key], "target": f"{rel} {bound:g}", "met": met}
    return out


def main(argv: list[str] | None = None) -> dict:
    a = common.parse_args(Args, PRESETS, argv)
    t_start = time.time()
    device = common.pick_device(a.device, a.dtype)
    torch.manual_seed(0)
    dtype = common.compute_dtype(device)
    # The MFU reference: the card's measured peak on large square matmuls (the stage probe's small
    # shapes are sized for a CPU and would understate a GPU's peak).
    big = ((4096, 4096, 4096),) if device.type in ("cuda", "mps") else common.PROBE_SHAPES
    peaks = common.matmul_peaks(device, big)
    common._COMPUTE["peaks"] = peaks  # what mfu_figures divides by, for every stage below
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    fused = common.FUSED_ATTENTION["on"]
    report = {"preset": a.preset, "device": str(device), "device_name": name,
              "compute_dtype": dtype, "torch": torch.__version__, "peak_flops": peaks,
              "fused_attention_on": bool(fused or (fused is None and device.type
                                                   in common.FUSED_ATTENTION["auto_on"]))}
    for part, fn in (("tokenizer", tokenizer_speed), ("dynamics", dynamics_speed),
                     ("agent", agent_speed), ("generation", generation_speed),
                     ("attention", fused_attention_check)):
        t0 = time.time()
        report[part] = {**fn(a, device), "check_s": time.time() - t0}
        print(f"{part}: {json.dumps(report[part])}", flush=True)
    # the automatic kernel may have fallen back to the explicit form during the run (a message)
    report["fused_attention_on"] &= common.FUSED_ATTENTION["on"] is not False
    report["targets"] = targets(report)
    report["check_wall_s"] = time.time() - t_start
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    common.write_json(a.out, report)
    print("gpu check:", json.dumps(report))
    return report


if __name__ == "__main__":
    main()
