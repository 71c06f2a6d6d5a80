"""The trained models in the repository: play and evaluate before training anything.

models/cpu/ holds the cpu preset's tokenizer, world model and agent, exported from their run
folders: the weights the later stages use (the EMA weights where a run kept them) in float16,
the arguments that rebuild each model, and the paths between them relative to models/cpu/.
figures.json records, for each, a figure computed on a few real episodes of unseen worlds, from
the float32 run and from the float16 export (how much half precision costs), with the commit and
the commands that made them. `check` loads the models again and recomputes those figures.

Run:
    python models.py export      # runs/cpu/{tokenizer,dynamics,imagine} → models/cpu/
    python models.py check       # load models/cpu/ and reproduce figures.json
    python play.py --dynamics models/cpu/dynamics.pt --real       # play in the shipped dream
    python play.py --agent models/cpu/agent.pt --keys "agent*64"  # watch the shipped agent
"""

from __future__ import annotations

import argparse
import os
import subprocess

import numpy as np
import torch

import agent as ag
import common
import dynamics as dy
import environment as env
import imagine
import tokenizer
from tokenizer import load_tokenizer, pack, psnr_of_mean_mse, unpack

FILES = ("tokenizer.pt", "dynamics.pt", "agent.pt")
EPISODES, FRAMES, CONTEXT = 4, 16, 8  # the real episodes the figures are computed on
TOLERANCE = 2e-3  # dB and nats: float32 on another CPU moves them by ~1e-5


def half(state: dict) -> dict:
    """float32 tensors of a state dict → float16 (others as they are)."""
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def export(runs: str, out: str, agent_run: str = "imagine", commits: str = "") -> dict:
    """Write out/{tokenizer,dynamics,agent}.pt from the run folders runs/tokenizer,
    runs/dynamics and runs/<agent_run> (imagine: the Dreamer 4 policy; agent: WM+BC), stripped
    of the optimiser, in float16, and out/figures.json. commits: "stage=commit,…", the commits
    the runs were trained at, recorded beside the commands. Returns the figures."""
    os.makedirs(out, exist_ok=True)
    paths = {"tokenizer": os.path.join(runs, "tokenizer", "ckpt.pt"),
             "dynamics": os.path.join(runs, "dynamics", "ckpt.pt"),
             "agent": os.path.join(runs, agent_run, "ckpt.pt")}
    load = {k: torch.load(p, map_location="cpu", weights_only=True) for k, p in paths.items()}
    tok, dyn, agt = load["tokenizer"], load["dynamics"], load["agent"]
    agent_args = agt["agent_args"] if agt["stage"] == "imagine" else agt["args"]
    common.save_checkpoint(os.path.join(out, "tokenizer.pt"), {
        "stage": "tokenizer", "args": tok["args"], "step": tok["step"],
        "model": half(tok["model"])})
    common.save_checkpoint(os.path.join(out, "dynamics.pt"), {
        "stage": "dynamics", "args": dyn["args"], "step": dyn["step"], "shapes": dyn["shapes"],
        "model": half(dyn.get("ema") or dyn["model"]),
        "parent": {"stage": "tokenizer", "path": "tokenizer.pt", "step": tok["step"]}})
    common.save_checkpoint(os.path.join(out, "agent.pt"), {
        "stage": "agent", "args": agent_args, "step": agt["step"], "shapes": agt["shapes"],
        "dynamics_args": agt["dynamics_args"], "model": half(agt["model"]),
        "tokenizer": "tokenizer.pt",
        "parent": {"stage": "dynamics", "path": "dynamics.pt", "step": dyn["step"]},
        "trained_by": agt["stage"]})
    here = os.path.dirname(os.path.abspath(__file__))  # the repository, wherever we run from
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=here).stdout.strip()
    figures = {"float32_run": measure(paths["tokenizer"], paths["dynamics"], paths["agent"]),
               "float16_export": measure(*(os.path.join(out, f) for f in FILES))}
    sizes = {f: os.path.getsize(os.path.join(out, f)) for f in FILES}
    modules = {"tokenizer": tokenizer, "dynamics": dy, "agent": ag, "imagine": imagine}
    made_by = {name: common.command_for(f"{name}.py", modules[name].Args, modules[name].PRESETS,
                                        os.path.join(runs, name))
               for name in dict.fromkeys(("tokenizer", "dynamics", "agent", agent_run))}
    trained_at = dict(kv.split("=", 1) for kv in commits.split(",") if kv)
    record = {"runs": runs, "agent_run": agent_run, "exported_at_commit": commit,
              "made_by": made_by, "trained_at_commit": trained_at,
              "steps": {"tokenizer": tok["step"], "dynamics": dyn["step"],
                        agent_run: agt["step"]},
              "bytes": sizes, **figures}
    common.write_json(os.path.join(out, "figures.json"), record)
    print(f"exported {', '.join(f'{f} ({sizes[f] / 1e6:.1f} MB)' for f in FILES)} to {out}")
    return record


def real_episodes(size: int) -> dict:
    """EPISODES contractor episodes of FRAMES frames in unseen worlds (the evaluation stream):
    frames (E, T, H, W, 3) uint8 of size × size pixels and the actions taken at them (E, T, A)."""
    seeds = [env.episode_seed(0, "eval", i) for i in range(EPISODES)]
    ep = env.rollout(env.ContractorPolicy(seed=0), seeds, image_size=size, episode_len=FRAMES)
    return {"frames": ep["frames"], "actions": ep["actions"]}


@torch.no_grad()
def measure(tok_path: str, dyn_path: str, agent_path: str) -> dict:
    """One figure per model, in float32 on the CPU, on real_episodes(): the tokenizer's
    reconstruction PSNR; the world model's PSNR on the frame after CONTEXT real ones (K = 4, a
    fixed noise seed); the agent's negative log-likelihood of the contractors' actions."""
    tok, _ = load_tokenizer(tok_path)
    ep = real_episodes(tok.image_size)
    frames = torch.from_numpy(ep["frames"])  # (E, T, H, W, 3)
    actions = torch.from_numpy(ep["actions"])  # (E, T, A)
    true = frames.float() / 255
    z = tok.encode(frames)  # (E, T, N_b, D_b)
    recon = tok.decode(z).clamp(0, 1)  # (E, T, H, W, 3)
    out = {"tokenizer_psnr": float(psnr_of_mean_mse(recon, true).mean())}
    dyn, ck = dy.load_dynamics(dyn_path)
    clean = pack(z)  # (E, T, N_z, C_z)
    gen = torch.Generator().manual_seed(0)
    z1 = dy.rollout(dyn.eval(), clean[:, :CONTEXT], actions, 1, 4, ck["args"]["ctx_tau"], gen)
    x1 = tok.decode(torch.cat([z[:, :CONTEXT], unpack(z1)], 1))  # (E, CONTEXT + 1, H, W, 3)
    x1 = x1[:, CONTEXT:].clamp(0, 1)  # (E, 1, H, W, 3): the decoder reads the context first
    out["dynamics_next_frame_psnr"] = float(psnr_of_mean_mse(x1, true[:, CONTEXT:CONTEXT + 1])
                                            .mean())
    model, agent_args = load_acting_agent(agent_path)
    tau_c = dy.context_signal_level(agent_args["ctx_tau"], model.k_max)
    z_ctx = dy.corrupt(torch.randn(clean.shape, generator=gen), clean, tau_c)  # Eq 6 at τ_ctx
    prev, valid = dy.shift_actions(actions)  # (E, T, A), (E, T)
    E, T = valid.shape
    level = np.full(E, -1)
    task = torch.from_numpy(np.stack([ag.ladder_prompt(ep["frames"][:, t], level)
                                      for t in range(T)], 1))  # (E, T)
    _, h = model(z_ctx, torch.full((E, T), tau_c), torch.full((E, T), 1 / model.k_max), prev,
                 valid, task)  # h (E, T, D)
    logits = model.policy(h, offset=0)  # A × (E, T, n_c)
    out["agent_action_nll"] = float(-ag.action_log_prob(logits, actions).mean())
    return {k: round(v, 4) for k, v in out.items()}


def load_acting_agent(path: str) -> tuple:
    """The agent model of an agent.py, imagine.py or shipped checkpoint, and its arguments."""
    if torch.load(path, map_location="cpu", weights_only=True)["stage"] == "imagine":
        model, _, ckpt = imagine.load_imagine(path)
        return model.eval(), ckpt["agent_args"]
    model, ckpt = ag.load_agent(path)
    return model.eval(), ckpt["args"]


def check(out: str) -> dict:
    """Load out/*.pt as the later stages do (weights_only=True) and recompute the figures of
    out/figures.json. Returns {figure: (recorded, now)}; raises if one moved."""
    import json
    recorded = json.load(open(os.path.join(out, "figures.json")))["float16_export"]
    now = measure(*(os.path.join(out, f) for f in FILES))
    result = {k: (recorded[k], now[k]) for k in recorded}
    for k, (want, got) in result.items():
        print(f"{k:28s} recorded {want:.4f}  now {got:.4f}")
        if abs(want - got) > TOLERANCE:
            raise SystemExit(f"{k}: {got:.4f} differs from the recorded {want:.4f}; the models "
                             f"in {out} no longer reproduce their figures")
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Export or check the models shipped in models/.")
    p.add_argument("command", choices=["export", "check"])
    p.add_argument("--runs", default="runs/cpu", help="export: the folder of the run folders")
    p.add_argument("--agent-run", default="imagine", choices=["imagine", "agent"],
                   help="export: the agent's run folder (imagine: Dreamer 4; agent: WM+BC)")
    p.add_argument("--out", default="models/cpu", help="the folder of the shipped models")
    p.add_argument("--commits", default="", help="export: the commits the runs were trained at, "
                   "e.g. tokenizer=97ff1ec,dynamics=1b9e6cf")
    a = p.parse_args(argv)
    export(a.runs, a.out, a.agent_run, a.commits) if a.command == "export" else check(a.out)


if __name__ == "__main__":
    main()
