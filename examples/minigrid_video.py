"""A second dataset, from a world this project did not design: MiniGrid's dynamic obstacles.

The built-in world (environment.py) was written together with the tokenizer and the dynamics
model: one tile is one tokenizer patch, the colours are few and flat. To show that the world
model is not tuned to that one world, this script renders a different one into the same data
contract (data.py, docs/conventions.md): MiniGrid's `MiniGrid-Dynamic-Obstacles-6x6-v0` from the
package registry (Farama's MiniGrid, on gymnasium). A grey-walled room, a green goal square, three
blue balls that hop to a random neighbouring cell every step, and the agent: a red triangle that
turns left, turns right or steps forward.

What differs from the built-in data, on purpose:
  - Pixels. The full 6×6 grid is rendered at 8 pixels per tile (48×48) and resized to 32×32
    with a box (area-style) filter, so one tile is 5.33 pixels: tiles do NOT line up with the
    tokenizer's 4-pixel patches, and edges are blended colours, not flat tiles.
  - Actions. MiniGrid's own discrete actions (left, right, forward: `env.action_space.n` = 3),
    one categorical component named "minigrid_action". Nobody here chose them.
  - Uncontrolled motion. The balls move at random whatever the agent does: the world model must
    learn a distribution over their moves, while the agent's own move follows its action.
  - No tasks. The dataset is video with actions only: meta.json lists no tasks and the episode
    files hold no `rewards` array (the contract's form for data without rewards; the reward
    heads of later stages have nothing to learn here). MiniGrid's goal reward is not recorded.

The player: a seeded random policy biased to move (forward 60 %, left 20 %, right 20 %; with
more than 3 actions the surplus 10 % of forward goes to the others). Stepping forward into a ball
or a wall ends a MiniGrid episode at once ("collision"); a random player then lives ≈ 5 steps,
far too short for the training windows. So the player looks at the cell in front (as a MiniGrid
agent sees it in its own view) and turns instead of walking into a wall or a ball; with
probability --careless it walks on anyway. An episode ends when the agent reaches the goal
(terminated), collides (terminated) or after --max-frames frames (truncated); every end starts
a NEW episode file: frames are never spliced across a reset. Episodes shorter than --min-len
frames are dropped (counted in meta.json), because the training windows could not use them.

Data contract, as data.py writes it (row t of `actions` = the action taken AT frame t, leading to
frame t + 1; the last row is chosen by the player but never executed):
    frames   uint8  (T, 32, 32, 3)
    actions  int64  (T, 1)        0 = left, 1 = right, 2 = forward
meta.json: image_size, fps, action_components [["minigrid_action", 3]], tasks [], episodes,
frames, split {"train", "heldout"} (by episode), seed, and the source (env id, minigrid
version, policy). Its "generator" is this script, not data.py's, so the instruments that need
the built-in generator (data.simulate_future replays, the environment's own evaluations) skip it.

Run (needs `pip install minigrid`, not a core dependency; ≈ 100k frames in about 2 minutes):
    python examples/minigrid_video.py --out data/minigrid32 --seed 0
    python tokenizer.py --data data/minigrid32 ...      # then every stage its labels allow
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

# The repository root on the path, so `import data` works when run as examples/minigrid_video.py.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402  (the writer, the split and meta.json of the data contract)
from common import parse_args  # noqa: E402

GENERATOR = "minidreamer4 examples/minigrid_video.py"  # meta.json "generator" (≠ data.GENERATOR)
ACTION_NAME = "minigrid_action"  # the one categorical action component
INSTALL = "this script needs MiniGrid, which is not a core dependency: `pip install minigrid`"


@dataclass
class Args:
    out: str = "data/minigrid32"  # output folder (written as <out>.partial, renamed at the end)
    seed: int = 0  # generation seed: same seed (and minigrid version), same dataset
    env_id: str = "MiniGrid-Dynamic-Obstacles-6x6-v0"  # any registered MiniGrid environment id
    frames: int = 100_000  # keep playing episodes until this many frames are written
    max_frames: int = 256  # frames per episode at most (truncation after max_frames − 1 steps)
    min_len: int = 16  # drop episodes with fewer frames (too short for the training windows)
    image_size: int = 32  # output frames are image_size × image_size (box-filter resize)
    tile_size: int = 8  # MiniGrid's render pixels per tile before the resize (6×6 grid: 48×48)
    careless: float = 0.0  # probability of stepping forward into a wall or ball anyway (collides)
    heldout: float = 0.1  # fraction of episodes held out for evaluation, split by episode
    fps: int = 10  # nominal frame rate written to meta.json


# ==== The pieces: one frame, one action, one episode ==========================================
def resize(frame: np.ndarray, size: int) -> np.ndarray:
    """(h, w, 3) uint8 render -> (size, size, 3) uint8 with PIL's box filter (an area-style
    average): each output pixel is the mean of the input pixels whose centres fall inside it. At
    48 -> 32 (1.5 input pixels per output pixel) output columns alternate between the mean of two
    input columns and one input column, so half the tile edges come out blended."""
    from PIL import Image
    if frame.shape[:2] == (size, size):
        return np.ascontiguousarray(frame, dtype=np.uint8)
    return np.asarray(Image.fromarray(frame).resize((size, size), Image.BOX), dtype=np.uint8)


def action_probs(n: int) -> np.ndarray:
    """(n,) the player's action distribution over MiniGrid's actions 0 = left, 1 = right,
    2 = forward, 3… = the rest: forward 50 %, left 20 %, right 20 %, the rest 10 % shared (with
    no other action, as in the dynamic-obstacles world with n = 3, forward takes it: 60 %)."""
    p = np.zeros(n)
    p[:3] = [0.2, 0.2, 0.5]
    if n > 3:
        p[3:] = 0.1 / (n - 3)
    else:
        p[2] += 0.1
    return p


def front_blocked(env) -> bool:
    """Whether a forward step would collide: the cell in front holds a wall or a ball (anything
    but empty floor or the goal). This is what the agent sees in its own view, one cell ahead."""
    cell = env.grid.get(*env.front_pos)
    return cell is not None and cell.type != "goal"


def choose_action(rng: np.random.Generator, probs: np.ndarray, blocked: bool,
                  careless: float) -> int:
    """One action of the random player: drawn from `probs`; a forward step into a blocked cell
    becomes a random turn (left or right), unless the player is careless this time."""
    a = int(rng.choice(len(probs), p=probs))
    if a == 2 and blocked and rng.random() >= careless:
        a = int(rng.integers(2))  # 0 = left, 1 = right
    return a


def play_episode(env, rng: np.random.Generator, env_seed: int, args: Args) -> dict:
    """Play one episode from env.reset(seed=env_seed) until it terminates, truncates or reaches
    args.max_frames frames. Returns frames uint8 (T, S, S, 3), actions int64 (T, 1) (row t taken
    AT frame t; the last row is drawn but never executed) and `end`: "goal", "collision",
    "truncated" (the environment's limit) or "cut" (max_frames here)."""
    probs = action_probs(int(env.action_space.n))
    env.reset(seed=env_seed)
    frames, actions, end = [], [], "cut"
    while True:
        frames.append(resize(env.get_frame(highlight=False, tile_size=args.tile_size),
                             args.image_size))  # frame t: the full grid, not the agent's view
        actions.append(choose_action(rng, probs, front_blocked(env), args.careless))  # a_t
        if len(frames) == args.max_frames:
            break  # a_{T−1} stays chosen but unexecuted, as the contract says
        _, reward, terminated, truncated, _ = env.step(actions[-1])
        if terminated or truncated:
            # the frame the episode ends on is recorded, then a new episode starts elsewhere
            frames.append(resize(env.get_frame(highlight=False, tile_size=args.tile_size),
                                 args.image_size))
            actions.append(choose_action(rng, probs, front_blocked(env), args.careless))
            end = ("goal" if reward > 0 else "collision") if terminated else "truncated"
            break
    return {"frames": np.stack(frames),  # (T, S, S, 3) uint8
            "actions": np.asarray(actions, dtype=np.int64)[:, None],  # (T, 1) int64
            "end": end}


# ==== The dataset: episodes until enough frames, meta.json, atomic rename =====================
def make_minigrid(env_id: str, max_frames: int):
    """The raw MiniGrid environment (no wrappers: frames come from get_frame), its step limit
    set so an episode truncates after max_frames − 1 steps, i.e. at max_frames frames."""
    try:
        import gymnasium as gym
        import minigrid  # noqa: F401  (importing it registers the MiniGrid-* ids with gymnasium)
    except ImportError as e:
        raise SystemExit(f"{INSTALL} ({e})") from None
    return gym.make(env_id, max_steps=max_frames - 1).unwrapped


def episode_seeds(seed: int, i: int) -> tuple[int, np.random.Generator]:
    """(environment seed, player generator) of attempt i: each episode is reproducible on its
    own, whatever the others did."""
    env_seed, player = np.random.SeedSequence([seed, i]).spawn(2)
    return int(env_seed.generate_state(1)[0]), np.random.default_rng(player)


def write_dataset(args: Args, make_env=None, source: dict | None = None) -> dict:
    """Play episodes until args.frames frames are kept; write them into <out>.partial with
    data.write_episode and data.write_meta, then rename it to <out>: a reader never sees half a
    dataset. make_env() -> env (default: MiniGrid's args.env_id; tests pass a fake). Returns
    meta."""
    root = args.out.rstrip("/")
    if os.path.exists(root) and os.listdir(root):  # replace only a dataset this script wrote
        meta_path = os.path.join(root, "meta.json")
        theirs = None
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                theirs = json.load(f).get("generator")
        if theirs != GENERATOR:
            raise FileExistsError(f"{root} exists and was not written by {GENERATOR}; "
                                  f"choose another --out")
    if make_env is None:
        env = make_minigrid(args.env_id, args.max_frames)
        import minigrid
        source = {"env_id": args.env_id, "minigrid_version": minigrid.__version__}
    else:
        env = make_env()
    tmp = root + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    ids, ends, lengths, dropped, attempt, t0 = [], {}, [], 0, 0, time.time()
    while sum(lengths) < args.frames:
        env_seed, rng = episode_seeds(args.seed, attempt)
        attempt += 1
        ep = play_episode(env, rng, env_seed, args)
        T = len(ep["frames"])
        if T < args.min_len:
            dropped += 1
            continue
        ids.append(f"ep{len(ids):06d}")
        data.write_episode(tmp, ids[-1], ep["frames"], ep["actions"])  # no rewards: no tasks
        ends[ep["end"]] = ends.get(ep["end"], 0) + 1
        lengths.append(T)
        if len(ids) % 200 == 0:
            print(f"  {len(ids)} episodes, {sum(lengths):,} frames, {time.time() - t0:.1f}s",
                  flush=True)
    gen_s = time.time() - t0
    n = int(env.action_space.n)
    meta = {"format_version": 1, "generator": GENERATOR, "name": os.path.basename(root),
            "image_size": args.image_size, "fps": args.fps, "episode_len": args.max_frames,
            "action_components": [[ACTION_NAME, n]], "tasks": [],
            "episodes": len(ids), "frames": int(sum(lengths)),
            "split": data.split_ids(ids, args.heldout), "seed": args.seed,
            "source": {**(source or {}), "action_probs": action_probs(n).tolist(),
                       "action_names": ["left", "right", "forward", "pickup", "drop", "toggle",
                                        "done"][:n],
                       "episode_ends": ends, "dropped_short": dropped,
                       "length": {"min": min(lengths), "median": float(np.median(lengths)),
                                  "max": max(lengths)}},
            "args": asdict(args), "seconds": round(gen_s, 1)}
    data.write_meta(tmp, meta)
    shutil.rmtree(root, ignore_errors=True)  # an older dataset of ours (checked above)
    os.replace(tmp, root)
    print(f"wrote {root}: {len(ids)} episodes ({dropped} shorter than {args.min_len} dropped), "
          f"{meta['frames']:,} frames of {args.image_size}×{args.image_size}, "
          f"episode ends {ends}, in {gen_s:.1f}s ({meta['frames'] / gen_s:,.0f} frames/s)")
    return meta


def main(argv: list[str] | None = None) -> None:
    args = parse_args(Args, {}, argv)
    print("args:", json.dumps(asdict(args)))
    write_dataset(args)


if __name__ == "__main__":
    main()
