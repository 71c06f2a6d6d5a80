"""Play inside the dream (§4.2): the trained world model as a game, in real time on a laptop CPU.

The paper lets people play inside its Minecraft world model in real time with mouse and
keyboard, and checks it with an interaction test: tasks played inside the model. This file does
both for the built-in world. The keyboard drives the world model frame by frame: each frame is
K = 4 shortcut steps from pure noise with the KV cache (§3.2), decoded by the tokenizer. The real
environment can run beside it under the same keys. A trained agent can act in the dream until a
key takes over. What was played goes to a GIF. The interaction test plans short scripts on a real
frame (chop a tree, place a table), plays them in the dream and in the real environment, and
reads the outcome off the frames; then a player who acts on each frame it is shown plays the same
tasks in both, as the paper's people do.

Reads:  a dynamics checkpoint (`python dynamics.py`, or the shipped models/cpu/dynamics.pt) or
        an agent checkpoint (`python agent.py`, models/cpu/agent.pt), and its tokenizer.
Writes: the GIF (--gif); with --interaction, <out>/interaction.json.

Run:
    python play.py                                # the shipped model (models/cpu), a window
    python play.py --preset cpu                   # your runs/cpu/dynamics, one frame per key
    python play.py --preset cpu --fps 20          # real time: the world goes on at 20 frames/s
    python play.py --preset cpu --real            # the real environment beside the dream
    python play.py --preset cpu --agent runs/cpu/agent/ckpt.pt   # watch the agent; a key takes over
    python play.py --preset cpu --keys "right*2 use*3 agent*20"  # no display needed: a script
    python play.py --preset cpu --interaction     # the interaction test in miniature

Keys: arrows or W A S D move (a blocked move turns the agent), space or E use (mining takes
consecutive presses: 3 for a tree), P place a table (costs 2 wood), C craft (face the table),
N or . do nothing, Tab hands control to the agent and back, R a new world, Esc quit.
Scripts (--keys): key names up, down, left, right, use, place, craft, noop, joined by + for
keys pressed together and repeated by *n; agent*n lets the agent act n frames.

Paper map (no equations in this file; the steps are those of dynamics.py and agent.py):
    §4.2 interactive inference, real time                 -> Dream, play_window, play_script
    §4.2 interaction test (tasks played in the model)     -> plan_script, interaction_test
         ... by a player who sees the frames               -> player_action, closed_loop_test

How a session starts, the keys and the interaction test are our choices (the paper describes
people playing Minecraft): docs/deviations.md, section play.py.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

import agent as ag
import common
import dynamics as dy
import dynamics_eval as de
import environment as env
from tokenizer import load_tokenizer, pack, unpack


@dataclass
class Args:
    preset: str = "default"  # smoke | cpu: runs/<preset>/dynamics; default: the shipped model
    dynamics: str = "models/cpu/dynamics.pt"  # the world model: the shipped one, or a run's
    agent: str = ""  # an agent checkpoint (`python agent.py`): its world model, and it can act
    tokenizer: str = ""  # tokenizer checkpoint; empty = the world model's own
    out: str = "runs/play"  # where the GIF and interaction.json go
    seed: int = 0  # the first world (evaluation worlds: no dataset contains them) and the noise
    context: int = 4  # real frames the dream starts from, the player idle (not in paper)
    sample_k: int = 4  # K shortcut steps per generated frame (§3.2: K = 4)
    fps: float = 0.0  # frames per second in the window; 0 = one frame per key press
    real: bool = False  # the real environment beside the dream, under the same keys
    keys: str = ""  # a scripted key sequence instead of the keyboard; writes the GIF
    gif: str = ""  # the GIF of what was played; empty = <out>/play.gif
    scale: int = 8  # screen pixels per frame pixel (window and GIF)
    interaction: bool = False  # run the interaction test and write <out>/interaction.json
    worlds: int = 100  # worlds per task in the interaction test
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "auto"  # auto | fp32 | bf16 (the start-up probe of common.py)


PRESETS = {
    "smoke": dict(dynamics="runs/smoke/dynamics/ckpt.pt", out="runs/smoke/play", context=2,
                  worlds=4, scale=4, dtype="fp32"),
    "cpu": dict(dynamics="runs/cpu/dynamics/ckpt.pt", out="runs/cpu/play"),
}

# (move, use, place, craft) of each key name; move classes 0 noop, 1 up, 2 down, 3 left, 4 right
KEYS = {"noop": (0, 0, 0, 0), "up": (1, 0, 0, 0), "down": (2, 0, 0, 0), "left": (3, 0, 0, 0),
        "right": (4, 0, 0, 0), "use": (0, 1, 0, 0), "place": (0, 0, 1, 0), "craft": (0, 0, 0, 1)}
# matplotlib's key names → key names
KEYBOARD = {"up": "up", "w": "up", "down": "down", "s": "down", "left": "left", "a": "left",
            "right": "right", "d": "right", " ": "use", "e": "use", "p": "place", "c": "craft",
            "n": "noop", ".": "noop"}
NOOP = np.zeros(len(KEYS["noop"]), np.int64)


def parse_keys(script: str) -> list:
    """--keys → one entry per frame: an action (A,) int64, or None where the agent acts.
    Tokens are separated by spaces or commas: name[+name…][*n], e.g. "right*2 up+use agent*5"."""
    out = []
    for token in script.replace(",", " ").split():
        names, _, times = token.partition("*")
        if times and not (times.isdigit() and int(times) > 0):
            raise SystemExit(f"--keys: '{token}' repeats {times!r} times; write name*n with "
                             f"n ≥ 1, e.g. --keys \"right*2 use*3\"")
        n = int(times) if times else 1
        if names == "agent":
            out += [None] * n
            continue
        a = NOOP.copy()
        for name in names.split("+"):
            if name not in KEYS:
                raise SystemExit(f"--keys: unknown key '{name}'; use {', '.join(KEYS)} or agent, "
                                 f"e.g. --keys \"right*2 use*3 up+use agent*5\"")
            if a[0] and KEYS[name][0]:
                raise SystemExit(f"--keys: '{token}' presses two moves at once; one move a frame, "
                                 f"other buttons may join it, e.g. --keys \"up+use right*2\"")
            a = np.maximum(a, KEYS[name])  # each component is a separate button
        out += [a] * n
    return out


# ---- The world model as a game engine -----------------------------------------------------------


class Dream:
    """The world model stepped one frame at a time (§4.2), for B worlds at once.

    start(frames, actions): the real context frames are encoded with the encoder's cache, written
    into the world model's KV cache at τ_ctx (Eq 6: 10 % noise, as when sampling) and decoded with
    the decoder's cache, so the player sees the model's own picture of them.
    step(a_t): frame t + 1 from the cached history and a_t: K shortcut steps of d = 1/K from pure
    noise (dynamics.sample_frame), then written into the history at τ_ctx and decoded.
    With an agent checkpoint the same passes carry the agent token (its output h_t drives
    act()); the world tokens never see it, so the dream is the same with or without an agent.
    """

    def __init__(self, model, tok, k: int, ctx_tau: float, seed: int, device):
        self.model, self.tok, self.k, self.device = model.eval(), tok.eval(), k, device
        self.is_agent = isinstance(model, ag.AgentModel)
        self.dyn = model.dyn if self.is_agent else model
        self.ctx_tau = ctx_tau
        self.tau_c = dy.context_signal_level(ctx_tau, model.k_max)  # e.g. 58/64
        self.d_min = 1.0 / model.k_max
        self.gen = torch.Generator(device).manual_seed(seed)

    def _pass(self, z, tau: float, d: float, prev, valid, commit: bool):
        """One cached pass over the new frame z (B, 1, N_z, C_z) at (τ, d); prev (B, 1, A) and
        valid (B, 1) from agent.step_inputs. Returns ẑ₁ (B, 1, N_z, C_z) and the agent output
        h_t (B, D), None without an agent (whose commit passes return no ẑ₁: (B, 0, N_z, C_z))."""
        B = z.shape[0]
        tau_t = torch.full((B, 1), tau, device=self.device)  # (B, 1)
        d_t = torch.full((B, 1), d, device=self.device)  # (B, 1)
        with common.autocast(self.device):
            if not self.is_agent:  # a commit's prediction is not read: it writes the cache only
                z1 = self.model(z, tau_t, d_t, prev, valid, cache=self.cache, commit=commit,
                                keep_last=0 if commit else None)  # (B, 1 or 0, N_z, C_z)
                return z1.float(), None
            z1, h = self.model(z, tau_t, d_t, prev, valid, self.task, cache=self.cache,
                               commit=commit)
        return z1.float(), h[:, 0].float()

    def _observe(self, z, prev_action, frames: np.ndarray) -> None:
        """Write frame t (B, 1, N_z, C_z), reached by a_{t−1} (B, A) or None, into the history at
        τ_ctx. For an agent, first its prompt, read off the frames (B, H, W, 3) as they look."""
        B = z.shape[0]
        if self.is_agent:  # Table 6's prompt ladder, read off the dream's own frames
            prompt = ag.ladder_prompt(frames, self.level, read=env.read_frames)  # (B,)
            task = torch.from_numpy(prompt).to(self.device)  # (B,)
            if self.task is not None:  # a new prompt: re-read the cached context (agent.py)
                ag.reprompt(self.model, self.cache, self.record, task, task != self.task,
                            self.ctx_tau)
            self.task = task
        prev, valid = ag.step_inputs(self.model, prev_action, B, self.device)  # (B, 1, A), (B, 1)
        noise = torch.randn(z.shape, generator=self.gen, device=self.device)  # (B, 1, N_z, C_z)
        z_ctx = dy.corrupt(noise, z, self.tau_c)  # Eq 6 at τ_ctx
        _, self.h = self._pass(z_ctx, self.tau_c, self.d_min, prev, valid, commit=True)
        if self.is_agent:  # the inputs of the frames a next frame still sees, for reprompt
            self.record.append((z_ctx, prev, valid))
            del self.record[:max(0, len(self.record) - (self.model.window - 1))]

    def _decode(self, z) -> np.ndarray:
        """Packed latents (B, 1, N_z, C_z) → frames (B, H, W, 3) uint8, with the decoder's cache."""
        with common.autocast(self.device):
            x = self.tok.decode(unpack(z), cache=self.dec_cache)  # (B, 1, H, W, 3)
        return (x[:, 0].float().clamp(0, 1) * 255).round().byte().cpu().numpy()

    @torch.no_grad()
    def start(self, frames: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """Real context frames (B, T_c, H, W, 3) uint8 with the actions taken at them (B, T_c, A).
        Returns the dream's picture of the last one (B, H, W, 3) uint8."""
        self.cache = common.KVCache(self.model.window)
        self.enc_cache = common.KVCache(self.tok.encoder.window)
        self.dec_cache = common.KVCache(self.tok.decoder.window)
        self.level = np.full(len(frames), -1)  # the agent's prompt ladder (agent.ladder_prompt)
        self.task, self.record, self.prev = None, [], None
        x = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device)  # (B, T_c, H, W, 3)
        for t in range(x.shape[1]):
            with common.autocast(self.device):
                z = pack(self.tok.encode(x[:, t:t + 1], cache=self.enc_cache)).float()
            self.z = z  # (B, 1, N_z, C_z)
            shown = self._decode(z)  # (B, H, W, 3)
            self._observe(z, self.prev, shown)  # z: (B, 1, N_z, C_z)
            self.prev = torch.from_numpy(actions[:, t]).to(self.device)  # (B, A): a_t
        return shown

    @torch.no_grad()
    def step(self, action: np.ndarray) -> np.ndarray:
        """a_t (B, A) int, taken at the latest frame t → frame t + 1 (B, H, W, 3) uint8, imagined.
        At the first step, t is the last context frame: the player's key replaces the action
        start() was given for it."""
        self.prev = torch.from_numpy(np.asarray(action, np.int64)).to(self.device)  # (B, A)
        B = self.prev.shape[0]
        shape = (B, 1, self.dyn.latent_tokens, self.dyn.latent_dim)
        noise = torch.randn(shape, generator=self.gen, device=self.device)  # z at τ = 0
        prev, valid = ag.step_inputs(self.model, self.prev, B, self.device)  # (B, 1, A), (B, 1)

        def f(z, tau, d):  # ẑ₁ of the new frame at (τ, d), reading the cached history
            return self._pass(z, tau, d, prev, valid, commit=False)[0]

        z = dy.sample_frame(f, noise, self.k)  # (B, 1, N_z, C_z): K steps of d = 1/K
        self.z = z  # the latest frame's packed latents
        shown = self._decode(z)
        self._observe(z, self.prev, shown)
        return shown

    @torch.no_grad()
    def act(self) -> np.ndarray:
        """The agent's a_t ~ π(· | h_t) at the last frame (B, A) int64 (agent checkpoints only)."""
        assert self.is_agent, "act() needs an agent checkpoint (--agent)"
        return ag.sample_action(self.model.policy(self.h, offset=0), self.gen).cpu().numpy()


def load_world(a: Args, device):
    """The world model (a DynamicsModel, or an AgentModel with --agent), its tokenizer and τ_ctx.
    Stops with a clear message if it is not a model of the built-in world."""
    if a.agent:
        model, ckpt = ag.load_agent(a.agent, device)
        tok_path = a.tokenizer or common.parent_path(a.agent, ckpt["tokenizer"])
    else:
        model, ckpt = dy.load_dynamics(a.dynamics, device)
        tok_path = a.tokenizer or common.parent_path(a.dynamics, ckpt["parent"]["path"])
    ctx_tau = ckpt["args"]["ctx_tau"]  # the history's signal level the model was trained with
    tok, _ = load_tokenizer(tok_path, device)
    classes = [n for _, n in env.ACTION_COMPONENTS]
    if list(model.action_classes) != classes:
        raise SystemExit(f"play.py plays the built-in world (actions {env.ACTION_COMPONENTS}); "
                         f"this world model has action classes {list(model.action_classes)}. "
                         f"Train one on it: python tokenizer.py --preset cpu && python "
                         f"dynamics.py --preset cpu, then python play.py --preset cpu.")
    if not (a.sample_k & (a.sample_k - 1) == 0 and a.sample_k <= model.k_max):
        raise SystemExit(f"--sample-k must be a power of two ≤ {model.k_max}, got {a.sample_k}")
    return model, tok, ctx_tau


def real_start(seeds: list[int], size: int, context: int):
    """Real environments on `seeds`, stepped `context` − 1 times with no action. Returns the envs,
    the context frames (B, T_c, H, W, 3) uint8 and the actions taken at them (B, T_c, A)."""
    envs = [env.Env(size, episode_len=1 << 30) for _ in seeds]  # no episode end while playing
    frames = [[e.reset(s)] for e, s in zip(envs, seeds)]
    for _ in range(context - 1):
        for e, f in zip(envs, frames):
            f.append(e.step(NOOP)[0])
    actions = np.zeros((len(seeds), context, len(NOOP)), np.int64)  # the player idles
    return envs, np.stack([np.stack(f) for f in frames]), actions


def world_seed(seed: int, i: int = 0) -> int:
    """Evaluation worlds: no dataset contains them (environment.episode_seed)."""
    return env.episode_seed(seed, "eval", i)


# ---- Pictures: the GIF ---------------------------------------------------------------------------


def side_by_side(dream: np.ndarray, real: np.ndarray | None, scale: int) -> np.ndarray:
    """(H, W, 3) dream frame, optionally | real frame, scaled up by `scale` (nearest)."""
    x = dream if real is None else np.concatenate(
        [dream, np.full((dream.shape[0], 1, 3), 255, np.uint8), real], axis=1)  # white gap
    return x.repeat(scale, 0).repeat(scale, 1)


def write_gif(path: str, pictures: list, fps: float) -> None:
    """Frames (H, W, 3) uint8 → an animated GIF at `fps` (10 when fps = 0), written atomically."""
    from PIL import Image
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    images = [Image.fromarray(p) for p in pictures]
    tmp = path + ".tmp"
    images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], loop=0,
                   duration=int(1000 / (fps or 10)))
    os.replace(tmp, path)


# ---- Playing: a script (no display needed) or the keyboard --------------------------------------


def play_script(a: Args, dream: Dream, script: list, size: int) -> dict:
    """Play --keys in world `a.seed`; the real environment beside it with --real. Writes the GIF
    and returns the figures: frames, frames/s of the dream, the state read off the last frames."""
    if any(x is None for x in script) and not dream.is_agent:
        raise SystemExit("--keys: agent*n needs an agent checkpoint: add --agent "
                         "runs/<preset>/agent/ckpt.pt (written by `python agent.py`)")
    envs, frames, acts = real_start([world_seed(a.seed)], size, a.context)
    shown = dream.start(frames, acts)[0]  # (H, W, 3)
    real = frames[0, -1] if a.real else None
    pictures = [side_by_side(shown, real, a.scale)]
    t0 = time.time()
    for entry in script:
        action = dream.act()[0] if entry is None else entry  # (A,)
        shown = dream.step(action[None])[0]
        if a.real:
            real = envs[0].step(action)[0]
        pictures.append(side_by_side(shown, real, a.scale))
    wall = time.time() - t0
    gif = a.gif or os.path.join(a.out, "play.gif")
    write_gif(gif, pictures, a.fps)
    state = env.read_frames(np.stack([shown] + ([real] if a.real else [])))
    out = {"frames": len(script), "frames_per_s": len(script) / max(wall, 1e-9), "gif": gif,
           "dream_inventory": dict(zip(env.INVENTORY, state["inv"][0].tolist()))}
    if a.real:
        out["real_inventory"] = dict(zip(env.INVENTORY, state["inv"][1].tolist()))
    print(f"played {out['frames']} frames in the dream at {out['frames_per_s']:.1f} frames/s "
          f"(K = {dream.k}, batch 1) -> {gif}")
    print(f"inventory read off the last dream frame: {out['dream_inventory']}")
    if a.real:
        print(f"inventory in the real environment:      {out['real_inventory']}")
    return out


def display_available() -> bool:
    """Can matplotlib open a window here? (No on a headless machine or a non-interactive
    backend.)"""
    import matplotlib
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY")
                                                 or os.environ.get("WAYLAND_DISPLAY")):
        return False
    backend = matplotlib.get_backend().lower()
    return not any(b in backend for b in ("agg", "pdf", "svg", "ps", "cairo", "template",
                                          "inline"))


def play_window(a: Args, dream: Dream, size: int) -> None:
    """The interactive window: the dream (and the real environment with --real) under the
    keyboard. A timer ticks at --fps (5 frames/s while the agent plays in key-press mode); a
    key pressed or held since the last tick is the action, and takes control from the agent."""
    import matplotlib.pyplot as plt
    for name in list(plt.rcParams):  # the keys are the game's, not matplotlib's shortcuts
        if name.startswith("keymap."):
            plt.rcParams[name] = []
    st = {"seed": a.seed, "held": set(), "tapped": set(), "agent": False, "t": 0, "fps": 0.0,
          "pictures": []}

    def reset():
        envs, frames, acts = real_start([world_seed(st["seed"])], size, a.context)
        st["env"], st["t"] = envs[0], 0
        show(dream.start(frames, acts)[0], frames[0, -1])

    n_panels = 2 if a.real else 1
    fig, axes = plt.subplots(1, n_panels, figsize=(4 * n_panels, 4.4), squeeze=False)
    images = []
    for ax, title in zip(axes[0], ("dream (world model)", "real environment")):
        images.append(ax.imshow(np.zeros((size, size, 3), np.uint8), interpolation="nearest"))
        ax.set_title(title)
        ax.axis("off")

    def show(shown, real):
        images[0].set_data(shown)
        if a.real:
            images[1].set_data(real)
        who = "agent" if st["agent"] else "you"
        fig.suptitle(f"world {st['seed']} · frame {st['t']} · {who} · {st['fps']:.0f} frames/s "
                     f"(model) · Tab: agent · R: new world · Esc: quit", fontsize=9)
        st["pictures"].append(side_by_side(shown, real if a.real else None, a.scale))
        fig.canvas.draw_idle()

    def tick():
        keys = st["held"] | st["tapped"]
        st["tapped"] = set()
        if keys:
            st["agent"] = False  # any key takes over from the agent
            action = NOOP.copy()
            for k in sorted(keys):  # several keys: several buttons; the last move wins
                action = np.where(np.array(KEYS[k]) > 0, KEYS[k], action)
        elif st["agent"]:
            action = dream.act()[0]
        elif a.fps > 0:
            action = NOOP  # real time: the world goes on without you
        else:
            return  # one frame per key press: wait
        t0 = time.time()
        shown = dream.step(action[None])[0]
        rate = 1 / max(time.time() - t0, 1e-6)  # what the model can do, not the timer
        st["fps"] = rate if st["t"] == 0 else 0.8 * st["fps"] + 0.2 * rate
        st["t"] += 1
        show(shown, st["env"].step(action)[0] if a.real else None)

    def press(event):
        if event.key == "escape":
            plt.close(fig)
        elif event.key == "tab" and dream.is_agent:
            st["agent"] = not st["agent"]
        elif event.key == "r":
            st["seed"] += 1
            reset()
        elif event.key in KEYBOARD:
            st["held"].add(KEYBOARD[event.key])
            st["tapped"].add(KEYBOARD[event.key])
            if a.fps == 0 and not st["agent"]:
                tick()  # key-press mode: the frame comes now

    def release(event):
        st["held"].discard(KEYBOARD.get(event.key))

    fig.canvas.mpl_connect("key_press_event", press)
    fig.canvas.mpl_connect("key_release_event", release)
    timer = fig.canvas.new_timer(interval=int(1000 / (a.fps or 5)))
    timer.add_callback(lambda: tick() if (a.fps > 0 or st["agent"]) else None)
    reset()
    timer.start()
    plt.show()
    if a.gif:
        write_gif(a.gif, st["pictures"], a.fps)
        print(f"wrote {len(st['pictures'])} frames to {a.gif}")


# ---- The interaction test in miniature (§4.2) ---------------------------------------------------


TASKS = {"chop_tree": 1, "place_table": 2}  # trees to chop first
# The closed-loop player's frames per world: this many times the open-loop script's length
# (our choice: room for a dream that draws an event a few frames late, not for wandering).
CLOSED_SLACK = 2


def terrain_of(app: np.ndarray) -> tuple:
    """Appearance ids (ROWS, COLS) → the terrain under them (the agent and the creature stand on
    grass or path; a cracked tile is still its terrain) and the creature's cell (None if none)."""
    grid = app.copy()
    agent = (app >= env.AGENT_APP) & (app < env.CREATURE_APP)
    grid[agent] = np.where(app[agent] - env.AGENT_APP >= 4, env.PATH, env.GRASS)
    creature = (app >= env.CREATURE_APP) & (app < env.CRACK_APP)
    grid[creature] = np.where(app[creature] == env.CREATURE_APP + 1, env.PATH, env.GRASS)
    crack = app >= env.CRACK_APP
    grid[crack] = np.array(env.MINABLE)[(app[crack] - env.CRACK_APP) // 4]
    cells = np.argwhere(creature)
    return grid, (tuple(int(v) for v in cells[0]) if len(cells) else None)


def route_to_tree(grid: np.ndarray, agent: tuple, creature) -> tuple | None:
    """The shortest walk (breadth-first over walkable tiles; the creature's tile counts as
    blocked) from the agent's tile to a tile beside the nearest tree, and the move that faces the
    tree from there. grid (ROWS, COLS) terrain ids. Returns (path of tiles from the agent's to the
    one to stand on, face move 1…4), or None if no tree can be reached."""
    passable = np.isin(grid, env.WALKABLE)
    if creature is not None:
        passable[creature] = False
    parent = env._bfs(passable, agent)  # {cell: parent} of every reachable cell
    goals = [(c, m) for c in parent for m in range(1, 5)
             if env._inside(env._next(c, m)) and grid[env._next(c, m)] == env.TREE]
    if not goals:
        return None
    depth = {}
    for c in parent:  # path length of every reachable cell (parents come first)
        depth[c] = 0 if parent[c] is None else depth[parent[c]] + 1
    stand, face = min(goals, key=lambda g: (depth[g[0]], g[1]))
    path = [stand]
    while parent[path[-1]] is not None:
        path.append(parent[path[-1]])
    return path[::-1], face


def plan_script(frame: np.ndarray, task: str) -> list | None:
    """An open-loop action list for `task`, planned on one real frame (H, W, 3): walk the shortest
    path to a tile beside the nearest tree (route_to_tree), turn to it, press use until it falls;
    for place_table do this twice and place the table where the second tree stood. None if no
    tree can be reached. The creature moves and may steal wood, so a script can fail in the real
    world too."""
    app = env.decode_frames(frame[None])["app"][0]  # (ROWS, COLS) appearance ids
    cell, _ = de.agent_of(app[None])
    grid, creature = terrain_of(app)
    agent = divmod(int(cell[0]), env.COLS)
    actions = []
    for _ in range(TASKS[task]):
        route = route_to_tree(grid, agent, creature)
        if route is None:
            return None
        path, face = route
        for prev, nxt in zip(path, path[1:]):  # walk: one move per tile
            move = env.MOVES.index((nxt[0] - prev[0], nxt[1] - prev[1]))
            actions.append(np.array([move, 0, 0, 0], np.int64))
        actions.append(np.array([face, 0, 0, 0], np.int64))  # blocked by the tree: turns to it
        actions += [np.array([0, 1, 0, 0], np.int64)] * env.HARDNESS[env.TREE]
        tree = env._next(path[-1], face)
        grid[tree], agent = env.GRASS, path[-1]  # a felled tree leaves grass
    if task == "place_table":  # facing the grass where the second tree stood
        actions.append(np.array([0, 0, 1, 0], np.int64))
    return actions


def player_action(frame, start, task: str) -> np.ndarray:
    """The key a player who looks at `frame` (H, W, 3; 0…255, read as the nearest sprites) presses
    next for `task`, having started at frame `start`: the closed-loop half of the interaction
    test, as the paper's people act on what the screen shows. Done (task_done against `start`):
    noop. Facing a tree (cracked or not): use. place_table with the wood for a table, facing free
    grass or path: place. Otherwise the first step of route_to_tree (at its end: the turn to the
    tree). An unreadable agent (not exactly one agent tile): noop. Returns (A,) int64."""
    if task_done(np.asarray(start)[None], np.asarray(frame)[None], task)[0]:
        return NOOP.copy()
    state = env.read_frames(np.asarray(frame)[None])
    app, wood = state["app"][0], int(state["inv"][0, env.WOOD])  # (ROWS, COLS), wood count
    cell, facing = de.agent_of(app[None])
    if cell[0] < 0:
        return NOOP.copy()
    grid, creature = terrain_of(app)
    agent = divmod(int(cell[0]), env.COLS)
    faced = env._next(agent, int(facing[0]) + 1)  # facing 0…3 is move 1…4
    if env._inside(faced) and grid[faced] == env.TREE:
        return np.array([0, 1, 0, 0], np.int64)
    if (task == "place_table" and wood >= env.TABLE_COST and env._inside(faced)
            and grid[faced] in env.WALKABLE and faced != creature):
        return np.array([0, 0, 1, 0], np.int64)
    route = route_to_tree(grid, agent, creature)
    if route is None:
        return NOOP.copy()
    path, face = route
    if len(path) == 1:  # beside the tree, not facing it: the blocked move turns the agent
        return np.array([face, 0, 0, 0], np.int64)
    move = env.MOVES.index((path[1][0] - agent[0], path[1][1] - agent[1]))
    return np.array([move, 0, 0, 0], np.int64)


def task_done(start: np.ndarray, end: np.ndarray, task: str) -> np.ndarray:
    """Read the outcome off frames (B, H, W, 3) in 0…255 (nearest sprite, dynamics_eval): more
    wood in the inventory at `end` than at `start` (chop_tree), or more tables on the map
    (place_table). Relative to each world's own start, so a picture that shows wood or a table
    all along does not count. Returns (B,) bool."""
    s, e = env.read_frames(start), env.read_frames(end)
    if task == "chop_tree":
        return e["inv"][:, env.WOOD] > s["inv"][:, env.WOOD]
    return (e["app"] == env.TABLE).sum((1, 2)) > (s["app"] == env.TABLE).sum((1, 2))


def shows_table_cost(frames: np.ndarray) -> np.ndarray:
    """Does each frame (B, H, W, 3) in 0…255 show in its inventory the wood a table costs (read
    as the nearest sprites)? Returns (B,) bool."""
    return env.read_frames(frames)["inv"][:, env.WOOD] >= env.TABLE_COST


@torch.no_grad()
def roundtrip(dream: Dream, frames: np.ndarray) -> np.ndarray:
    """Real frames (B, T, H, W, 3) uint8 → the tokenizer's pictures of them (B, T, H, W, 3)
    uint8, in one causal pass: the pictures Dream's frame-by-frame decoding with the KV caches
    gives (tests/test_tokenizer.py)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(dream.device)  # (B, T, H, W, 3)
    with common.autocast(dream.device):
        y = dream.tok.decode(dream.tok.encode(x))  # (B, T, H, W, 3)
    return (y.float().clamp(0, 1) * 255).round().byte().cpu().numpy()


def planned_worlds(a: Args, task: str, size: int) -> tuple:
    """The interaction test's worlds for `task`: `a.worlds` evaluation worlds started with
    real_start, less those where plan_script finds no tree to reach. Returns their envs, context
    frames (B, T_c, H, W, 3), context actions (B, T_c, A) and open-loop scripts."""
    seeds = [world_seed(a.seed, i) for i in range(a.worlds)]
    envs, frames, acts = real_start(seeds, size, a.context)
    scripts = [plan_script(f[-1], task) for f in frames]
    keep = [i for i, s in enumerate(scripts) if s is not None]
    return [envs[i] for i in keep], frames[keep], acts[keep], [scripts[i] for i in keep]


def interaction_test(a: Args, dream: Dream, size: int) -> dict:
    """Each task in `a.worlds` evaluation worlds: the script planned on the last real context
    frame, played in the real environment and (all worlds at once) in the dream from the same
    context; success read off the frame after the script's last action against the script's
    first frame, the same way in both, and in the tokenizer's pictures of the real frames (what
    a perfect world model could show at best)."""
    result = {}
    for task in TASKS:
        envs, frames, acts, scripts = planned_worlds(a, task, size)
        L = max(len(s) for s in scripts)
        # The real frames after each action, idle (NOOP) after the script: (B, L, H, W, 3)
        real = np.stack([np.stack([e.step(x)[0] for x in s + [NOOP] * (L - len(s))])
                         for e, s in zip(envs, scripts)])
        ends, rows = np.array([len(s) - 1 for s in scripts]), np.arange(len(scripts))  # (B,)
        real_end = real[rows, ends]  # (B, H, W, 3)
        padded = np.stack([np.stack(s + [NOOP] * (L - len(s))) for s in scripts])  # (B, L, A)
        t0 = time.time()
        dream_start = dream.start(frames, acts)  # (B, H, W, 3): the dream's last real frame
        dreamed = np.stack([dream.step(padded[:, t]) for t in range(L)], 1)  # (B, L, H, W, 3)
        wall = time.time() - t0
        dream_end = dreamed[rows, ends]
        real_ok = task_done(frames[:, -1], real_end, task)
        dream_ok = task_done(dream_start, dream_end, task)
        # The tokenizer's share: the real frames through encoder and decoder, as the dream shows
        # its frames. A dream cannot show more than this.
        shown = roundtrip(dream, np.concatenate([frames, real], 1))  # (B, T_c + L, H, W, 3)
        C = frames.shape[1]
        tok_ok = task_done(shown[:, C - 1], shown[rows, C + ends], task)
        result[task] = {
            "worlds": len(scripts), "no_plan": a.worlds - len(scripts),
            "script_len_mean": float(np.mean([len(s) for s in scripts])),
            "real_success": float(real_ok.mean()), "dream_success": float(dream_ok.mean()),
            "tokenizer_success": float(tok_ok.mean()),
            "dream_over_real": float(dream_ok.mean() / max(real_ok.mean(), 1e-9)),
            "agree": float((real_ok == dream_ok).mean()),
            "dream_frames_per_s": len(scripts) * L / max(wall, 1e-9)}
        r = result[task]
        print(f"{task:12s} {r['worlds']} worlds, scripts of {r['script_len_mean']:.1f} frames: "
              f"real {r['real_success']:.2f}, tokenizer {r['tokenizer_success']:.2f}, "
              f"dream {r['dream_success']:.2f} "
              f"({100 * r['dream_over_real']:.0f} % of real), outcome agrees in "
              f"{100 * r['agree']:.0f} %")
        if task == "place_table":
            # The table's cost on the frame the place press is made on: a tokenizer that cannot
            # draw the count leaves a player who reads the frames stuck
            before = ends - 1
            pictures = {"real": real[rows, before], "tokenizer": shown[rows, C + before],
                        "dream": dreamed[rows, before]}  # each (B, H, W, 3)
            w = r["wood_for_table_shown"] = {k: float(shows_table_cost(x).mean())
                                             for k, x in pictures.items()}
            print(f"{'':12s} the {env.TABLE_COST} wood a table costs shown before the place "
                  f"press: real {w['real']:.2f}, tokenizer {w['tokenizer']:.2f}, "
                  f"dream {w['dream']:.2f}")
    return result


def tree_marks(start: np.ndarray, frames: np.ndarray, ends: np.ndarray) -> tuple:
    """Per world: does any of frames (B, L, H, W, 3) up to ends (B,) show a cracked tree, and does
    the frame at ends show fewer trees (cracked or not) than start (B, H, W, 3)? Read as the
    nearest sprites. Returns two (B,) bool arrays."""
    B, L = frames.shape[:2]
    app = env.read_frames(frames.reshape(B * L, *frames.shape[2:]))["app"]
    app = app.reshape(B, L, env.ROWS, env.COLS)  # (B, L, ROWS, COLS)
    first = env.CRACK_APP + 4 * env.MINABLE.index(env.TREE)
    cracked = ((app >= first) & (app < first + 4)).any((2, 3))  # (B, L)
    crack_seen = (cracked & (np.arange(L) <= ends[:, None])).any(1)  # (B,)

    def trees(a):  # (..., ROWS, COLS) → (...) trees standing, cracked or not
        return ((a == env.TREE) | ((a >= first) & (a < first + 4))).sum((-2, -1))
    fewer = trees(app[np.arange(B), ends]) < trees(env.read_frames(start)["app"])
    return crack_seen, fewer


def closed_loop_test(a: Args, dream: Dream, size: int) -> dict:
    """The interaction test with a player who sees the frames (player_action), as the paper's
    people do: in each world the same player acts on the real frames in the real environment and
    on the dream's frames in the dream, for CLOSED_SLACK times the open-loop script's length
    (plan_script; worlds without a plan are left out, as there); success read off the last frame
    against the first, as in interaction_test, and in the tokenizer's pictures of the real
    frames. A dream that draws a crack one press late still lets the player finish; a dream that
    never fells the tree does not."""
    result = {}
    for task in TASKS:
        envs, frames, acts, scripts = planned_worlds(a, task, size)
        budget = np.array([CLOSED_SLACK * len(x) for x in scripts])  # (B,) frames
        t0 = time.time()
        real_start_frame, dream_start = frames[:, -1], dream.start(frames, acts)  # (B, H, W, 3)
        real_now, dream_now, real, dreamed = real_start_frame, dream_start, [], []
        for t in range(int(budget.max())):
            live = t < budget  # (B,) worlds still within their budget
            keys_real = np.stack([player_action(f, f0, task) if on else NOOP for f, f0, on
                                  in zip(real_now, real_start_frame, live)])  # (B, A)
            keys_dream = np.stack([player_action(f, f0, task) if on else NOOP for f, f0, on
                                   in zip(dream_now, dream_start, live)])  # (B, A)
            real_now = np.stack([e.step(x)[0] for e, x in zip(envs, keys_real)])  # (B, H, W, 3)
            dream_now = dream.step(keys_dream)  # (B, H, W, 3)
            real.append(real_now)
            dreamed.append(dream_now)
        wall = time.time() - t0
        real, dreamed = np.stack(real, 1), np.stack(dreamed, 1)  # (B, L, H, W, 3)
        ends, rows = budget - 1, np.arange(len(scripts))
        real_ok = task_done(real_start_frame, real[rows, ends], task)
        dream_ok = task_done(dream_start, dreamed[rows, ends], task)
        shown = roundtrip(dream, np.concatenate([frames, real], 1))  # (B, T_c + L, H, W, 3)
        C = frames.shape[1]
        tok_ok = task_done(shown[:, C - 1], shown[rows, C + ends], task)
        # Where a failure comes from: a crack ever drawn, and fewer trees at the end than at the
        # start (a felling drawn, whether or not the wood shows in the inventory)
        crack_real, fewer_real = tree_marks(real_start_frame, real, ends)
        crack_dream, fewer_dream = tree_marks(dream_start, dreamed, ends)
        result[task] = {
            "worlds": len(scripts), "no_plan": a.worlds - len(scripts),
            "budget_mean": float(budget.mean()),
            "real_crack_seen": float(crack_real.mean()),
            "dream_crack_seen": float(crack_dream.mean()),
            "real_fewer_trees": float(fewer_real.mean()),
            "dream_fewer_trees": float(fewer_dream.mean()),
            "real_success": float(real_ok.mean()), "dream_success": float(dream_ok.mean()),
            "tokenizer_success": float(tok_ok.mean()),
            "dream_over_real": float(dream_ok.mean() / max(real_ok.mean(), 1e-9)),
            "agree": float((real_ok == dream_ok).mean()),
            "wall_s": wall}
        r = result[task]
        print(f"{task:12s} a player who sees the frames, {r['budget_mean']:.1f} frames: "
              f"real {r['real_success']:.2f}, tokenizer {r['tokenizer_success']:.2f}, "
              f"dream {r['dream_success']:.2f} ({100 * r['dream_over_real']:.0f} % of real); "
              f"a crack drawn {r['dream_crack_seen']:.2f} (real {r['real_crack_seen']:.2f}), "
              f"fewer trees at the end {r['dream_fewer_trees']:.2f} "
              f"(real {r['real_fewer_trees']:.2f})")
    return result


def main(argv: list[str] | None = None) -> dict | None:
    a = common.parse_args(Args, PRESETS, argv)
    common.seed_everything(a.seed)
    device = common.pick_device(a.device, a.dtype)
    model, tok, ctx_tau = load_world(a, device)
    dream = Dream(model, tok, a.sample_k, ctx_tau, a.seed, device)
    size = tok.image_size
    if a.interaction:
        print("open loop: the script planned on the last real frame, played blind")
        tasks = interaction_test(a, dream, size)
        print(f"closed loop: a player who acts on each frame it is shown, for {CLOSED_SLACK}× "
              f"the script's length")
        result = {"tasks": tasks, "closed_loop": closed_loop_test(a, dream, size),
                  "closed_slack": CLOSED_SLACK, "sample_k": a.sample_k,
                  "context": a.context, "world_model": a.agent or a.dynamics}
        os.makedirs(a.out, exist_ok=True)
        common.write_json(os.path.join(a.out, "interaction.json"), result)
        print(f"wrote {os.path.join(a.out, 'interaction.json')}")
        return result
    if a.keys:
        return play_script(a, dream, parse_keys(a.keys), size)
    if not display_available():
        preset = "" if a.preset == "default" else f" --preset {a.preset}"
        raise SystemExit(
            "play.py: no display here (no $DISPLAY, or a non-interactive matplotlib backend), "
            "so no window can open. Play a scripted key sequence instead; it writes a GIF:\n"
            f"    python play.py{preset} --keys \"right*2 use*3 noop*4\" --real")
    play_window(a, dream, size)
    return None


if __name__ == "__main__":
    main()
