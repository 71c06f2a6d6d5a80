"""Measuring instrument for common.py's speed mechanism: training frames/s of the tokenizer and
the dynamics at a preset, fp32 against bf16 autocast and torch.compile, and the latent cache's
encoding speed. Figures are in docs/log.md.

Every variant runs the stage's own training step (model, loss, AdamW, clipping; the dynamics
also its EMA) on its own copy of one initialisation. The variants take turns, a few steps each,
round after round (A, B, C, A, B, C, …), so that the load of other jobs on shared cores hits
them alike: compare the ratios, not the absolute figures. The dynamics trains on random latents
of the cpu tokenizer's shape (its speed does not depend on their values).

Run:
    python speed_bench.py                        # cpu preset, 2 threads, all variants
    python speed_bench.py --stages tokenizer --variants fp32,bf16 --rounds 2 --steps 4
    python speed_bench.py --profile 6            # plus a torch.profiler table per dtype
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import asdict, replace

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import common
import data
import dynamics
import tokenizer


def tokenizer_step(a: tokenizer.Args):
    """A closure running one tokenizer training step of train() (without LPIPS), and its frames."""
    model = tokenizer.build_tokenizer(asdict(a))
    loader = data.SequenceDataset(data.ensure_dataset(a.data), "train", a.seq_len, seed=a.seed)
    gen = torch.Generator().manual_seed(a.seed)

    def make(compile_: bool, full: bool = False):  # full: a dynamics variant only
        net = copy.deepcopy(model)
        fwd = torch.compile(net) if compile_ else net
        opt = torch.optim.AdamW(net.parameters(), lr=a.lr, weight_decay=a.weight_decay)
        norms = {"mse": common.RunningRMS(), "lpips": common.RunningRMS()}

        def step(i: int) -> int:
            loader.rng = np.random.default_rng([a.seed, i])
            frames = loader.sample(a.batch_size)["frames"]  # (B, T, H, W, 3) uint8
            B, T = frames.shape[:2]
            mae = tokenizer.sample_mae_mask(B, T, net.n_patches, a.mae_max, gen)  # (B, T, N_p)
            with common.autocast("cpu"):
                recon = fwd(frames, mae).float()  # (B, T, H, W, 3)
            terms = tokenizer.tokenizer_loss(recon, frames.float() / 255, None, norms, 0.0)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), a.grad_clip)
            opt.step()
            return B * T
        return step
    return make


def dynamics_step(a: dynamics.Args, n_latents: int = 32, latent_dim: int = 16):
    """A closure running one dynamics training step of train() on random latents (B, T, N_b, D_b)
    of the cpu tokenizer's bottleneck, with the alternating short/long batches of batch_shape and
    the history stream of --ctx-stream (without the milestone rows, which need the dataset).
    full=True runs the history frames through every layer, as before `keep_last`."""
    classes = [5, 2, 2, 2]  # the built-in environment's action components
    model = dynamics.build_model(asdict(a), n_latents // 2, 2 * latent_dim, classes)
    gen = torch.Generator()

    def make(compile_: bool, full: bool = False):
        net = copy.deepcopy(model)
        ema = copy.deepcopy(net).requires_grad_(False)
        fwd = torch.compile(net) if compile_ else net
        opt = torch.optim.AdamW(net.parameters(), lr=a.lr, weight_decay=a.weight_decay)
        norm = common.RunningRMS()

        def step(i: int) -> int:
            gen.manual_seed(i)
            B, T = dynamics.batch_shape(i, a)
            lat = torch.rand(B, T, n_latents, latent_dim, generator=gen) * 2 - 1  # (B, T, N_b, D_b)
            acts = torch.stack([torch.randint(n, (B, T), generator=gen) for n in classes], -1)
            tau_ctx = dynamics.context_signal_level(a.ctx_tau, a.k_max)
            fb = dynamics.forcing_batch(lat, acts, a.k_max, a.start_frac, gen, a.k_min,
                                        a.flow_frac, tau_ctx if a.ctx_stream else None)

            def f(z, tau, d, rows=None):  # as in dynamics.train
                prev, valid, ind = dynamics.row_select(fb, rows)
                if not a.ctx_stream:
                    return fwd(z, tau, d, prev, valid, ind).float()
                hist = fb["history"] if rows is None else fb["history"][rows]
                *inputs, layout = dynamics.history_stream(z, tau, d, hist, prev, valid, ind,
                                                          tau_ctx, a.k_max, a.context,
                                                          net.n_tokens)
                T = z.shape[1]
                out = fwd(*inputs, ind, time_layout=layout, keep_last=None if full else T)
                return out[:, -T:].float()  # (R, T, N_z, C_z) the loss frames

            with common.autocast("cpu"):
                terms = dynamics.shortcut_forcing_loss(f, fb["clean"], fb["noise"], fb["tau"],
                                                       fb["d"], a.k_max, a.boot_clip)
            loss = norm(terms["loss"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), a.grad_clip)
            opt.step()
            dynamics.ema_update(ema, net, i + 1, a.ema)
            return B * T
        return step
    return make


def compiles() -> int:
    """Graphs compiled so far by torch.compile in this process (each recompile counts)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def race(make, variants: list[str], rounds: int, steps: int, warmup: int) -> dict:
    """Interleaved timing: every round runs `steps` steps of each variant in turn. A variant is
    a dtype, "fp32" or "bf16", then optionally "+compile" and (the dynamics) "+full": the history
    frames through every layer. Returns frames/s per variant (total frames
    over total time after warm-up) and, for compiled ones, the warm-up time and graph count."""
    out, runs = {}, {}
    with FlopCounterMode(display=False) as counter:  # FLOPs of one eager step, per frame
        frames = make(False)(0)
    flops_per_frame = counter.get_total_flops() / frames
    for v in variants:
        dtype, *extras = v.split("+")
        common._COMPUTE["dtype"] = dtype
        step = make("compile" in extras, full="full" in extras)
        g0, t0 = compiles(), time.perf_counter()
        for i in range(warmup):
            step(i)
        out[v] = {"warmup_s": time.perf_counter() - t0, "graphs_warmup": compiles() - g0,
                  "frames": 0, "seconds": 0.0, "graphs": compiles() - g0, "rates": []}
        runs[v] = (dtype, step)
    i = warmup
    for _ in range(rounds):
        for v, (dtype, step) in runs.items():
            common._COMPUTE["dtype"] = dtype
            g0, t0 = compiles(), time.perf_counter()
            frames = sum(step(i + k) for k in range(steps))
            dt = time.perf_counter() - t0
            out[v]["frames"] += frames
            out[v]["seconds"] += dt
            out[v]["rates"].append(frames / dt)
            out[v]["graphs"] += compiles() - g0
        i += steps
    base = np.array(out[variants[0]]["rates"])
    for v in variants:
        out[v]["frames_per_s"] = out[v]["frames"] / out[v]["seconds"]
        # the median over rounds of this round's ratio: robust to a busy neighbour in one round
        out[v]["ratio"] = float(np.median(np.array(out[v]["rates"]) / base))
        # MFU against the probe's measured peak of this variant's dtype
        peak = common._COMPUTE["peaks"][v.split("+")[0]]
        out[v]["mfu"] = flops_per_frame * out[v]["frames_per_s"] / peak
    return out


def profile(make, dtype: str, steps: int) -> None:
    """The top operators by self CPU time over `steps` eager training steps."""
    from torch.profiler import ProfilerActivity, profile as prof
    common._COMPUTE["dtype"] = dtype
    step = make(False)
    step(0)
    with prof(activities=[ProfilerActivity.CPU]) as p:
        for i in range(1, steps + 1):
            step(i)
    print(f"--- profile, {dtype}, {steps} steps")
    table = p.key_averages().table(sort_by="self_cpu_time_total", row_limit=14,
                                   max_name_column_width=40)
    print(table)


def cache_race(a: tokenizer.Args, episodes: int, rounds: int) -> dict:
    """Latent-cache encoding (tokenizer.encode_episode) frames/s, fp32 against bf16, interleaved;
    and the largest latent difference between the two."""
    model = tokenizer.build_tokenizer(asdict(a)).eval()
    eps = [ep["frames"] for _, ep in zip(range(episodes), data.iter_episodes(a.data, "train"))]
    out = {d: {"frames": 0, "seconds": 0.0} for d in ("fp32", "bf16")}
    z = {}
    for _ in range(rounds):
        for d in out:
            common._COMPUTE["dtype"] = d
            t0 = time.perf_counter()
            z[d] = [tokenizer.encode_episode(model, f, "cpu") for f in eps]
            out[d]["seconds"] += time.perf_counter() - t0
            out[d]["frames"] += sum(len(f) for f in eps)
    for d in out:
        out[d]["frames_per_s"] = out[d]["frames"] / out[d]["seconds"]
    out["max_abs_diff"] = max(float(np.abs(x - y).max()) for x, y in zip(z["fp32"], z["bf16"]))
    return out


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="cpu")
    p.add_argument("--stages", default="tokenizer,dynamics,cache")
    p.add_argument("--variants", default="fp32,bf16,bf16+compile")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4, help="turns of every variant")
    p.add_argument("--steps", type=int, default=8, help="steps per variant per turn")
    p.add_argument("--warmup", type=int, default=8, help="untimed steps first (compiles)")
    p.add_argument("--cache-episodes", type=int, default=4)
    p.add_argument("--profile", type=int, default=0, help="profile this many steps per dtype")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    common.set_compute_dtype(torch.device("cpu"))  # prints the probe's peaks and choice
    variants = args.variants.split(",")
    ta = replace(tokenizer.Args(), **tokenizer.PRESETS[args.preset])
    da = replace(dynamics.Args(), **dynamics.PRESETS[args.preset])
    makers = {"tokenizer": tokenizer_step(ta)} if "tokenizer" in args.stages else {}
    if "dynamics" in args.stages:
        makers["dynamics"] = dynamics_step(da)
    for name, make in makers.items():
        res = race(make, variants, args.rounds, args.steps, args.warmup)
        for v, r in res.items():
            print(f"{name:9s} {v:13s} {r['frames_per_s']:8.1f} frames/s  ×{r['ratio']:.2f} "
                  f"(median of rounds), MFU {100 * r['mfu']:.0f} % | warm-up "
                  f"{r['warmup_s']:.1f}s, graphs compiled: warm-up {r['graphs_warmup']}, "
                  f"timed {r['graphs'] - r['graphs_warmup']}")
        for dtype in ("fp32", "bf16") if args.profile else ():
            profile(make, dtype, args.profile)
    if "cache" in args.stages:
        res = cache_race(ta, args.cache_episodes, args.rounds)
        print(f"latent cache: fp32 {res['fp32']['frames_per_s']:.0f} frames/s, bf16 "
              f"{res['bf16']['frames_per_s']:.0f} frames/s  "
              f"×{res['bf16']['frames_per_s'] / res['fp32']['frames_per_s']:.2f}"
              f"  | max |z_bf16 − z_fp32| {res['max_abs_diff']:.3g}")


if __name__ == "__main__":
    main()
