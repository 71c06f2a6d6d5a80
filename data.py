"""Stage 0: the built-in environment, its scripted "contractor" players, and the dataset format.

Dreamer 4 learns the diamond challenge *offline*, from 2.5K h of VPT contractor video with mouse and keyboard
actions (paper §4.1, Table 7). This file builds a laptop-sized miniature of that setting (DESIGN.md §4), writes
it in the format every later stage reads (DESIGN.md §3), loads it back for training, and scores any policy in
the real environment.

Reads nothing (or --from-frames image folders). Writes data/<name>/: episodes (.npz), meta.json, episodes.png, episode.gif.

Run:
    python data.py                  # data/diamond64: 64×64, 1,000 episodes × 256 frames (≈ 2 min, 55 MB)
    python data.py --preset cpu     # data/diamond32: 32×32, 1,000 episodes × 256 frames (40–90 s, 15 MB)
    python data.py --preset smoke   # data/smoke: 32×32, 8 episodes × 64 frames (tests)
    python data.py --bench          # environment frames/s on one core
    python data.py --eval-random    # success per task of random, contractor and expert players
    python data.py --from-frames DIR --out data/NAME   # import image folders as unlabeled video

Paper map (no equations in this stage):
    §4.1 offline diamond challenge, VPT contractor data     -> Env, ContractorPolicy, generate
    Table 7 milestone ladder                                -> TASKS
    §3.3 "task-relevant" subset for agent finetuning        -> SequenceDataset.sample(relevant=…)
    §4.1 evaluation: success rate per item over episodes    -> evaluate

Data contract (DESIGN.md §3; written out here once, every stage refers to it)
    One episode = one file <id>.npz in the dataset folder (actions, rewards absent for unlabeled video):
      frames   uint8   (T, H, W, 3)
      actions  int64   (T, A)        row t = the action taken AT frame t; it leads to frame t+1. The
                                     last row is chosen but never executed (the episode ends on T−1).
      rewards  float32 (T, n_tasks)  row t = the reward received on ENTERING frame t; row 0 is 0.
          frame_0 --a_0--> frame_1, r_1 --a_1--> frame_2, r_2 --a_2--> …
    So the dynamics token of step t carries a_{t−1} ("no action" at t = 0 and for unlabeled clips): h_t has seen
    a_{t−1} and z_t; the policy head at h_t predicts a_t, the reward head r_t (DreamerV3 indexing; pinned in
    tests/test_data.py). Every action component is categorical (a button has 2 classes).
    meta.json: image_size (H = W), fps, action_components [[name, classes], …], tasks [names],
    episodes, frames, split {"train": [ids], "heldout": [ids]} (by episode, never by frame), seed.

The environment and its players (DESIGN.md §4; rules in Env.step and the README): TASKS are the rows of
Table 7, each paying 1 on the step its milestone is first reached; contractors reach wood 99 % … diamond 4 %.

Deviations and ambiguities
  - 8 tasks, not the paper's 12 milestones: planks, stick, furnace and iron ingot are folded into the recipes;
    crafting is one button instead of the crafting GUI.
  - Mining by holding `use` (3/4/5/6 presses for tree/stone/iron/diamond; Minecraft's rule) keeps random play low.
  - Fixed episode length, 256 frames (60 min in the paper): an expert needs ≈ 75 steps, a diligent contractor
    that dawdles still gets to the top, a sloppy one stalls midway. Lockstep evaluation stays simple; the
    continuation c_t is 1 everywhere. fps is nominal (10; the paper's is 20).
  - Storage: the compressed .npz files (≈ 60× smaller) are the source of truth; the loader decodes each episode
    once into <root>/.decoded/<id>.npy and memory-maps it (≈ 3 GB for diamond64, 0.8 GB for diamond32).
  - 1,000 episodes per built-in dataset (not in paper), one random world each: with 200, the cpu world model
    learned its training worlds by heart (held-out loss 0.039 → 0.043 from 6,000 to 18,000 steps while the
    training loss fell); 5× the worlds gave +0.6 dB held-out rollout PSNR at 6,000 steps.
  - A bring-your-own folder without meta.json gets one inferred and written (names a0…, task0…; classes =
    largest action + 1; the last 10 % of sorted ids held out), so the split never changes between stages.
"""

from __future__ import annotations

import copy
import functools
import glob
import json
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch

from common import parse_args, seed_everything

ACTION_COMPONENTS = [("move", 5), ("use", 2), ("place", 2), ("craft", 2)]  # (name, classes); A = 4
TASKS = ["collect_wood", "place_table", "make_wood_pickaxe", "collect_stone",
         "make_stone_pickaxe", "collect_iron", "make_iron_pickaxe", "collect_diamond"]
BUILTIN = {"diamond64": "default", "diamond32": "cpu", "smoke": "smoke"}  # dataset name -> preset
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")  # what --from-frames imports


@dataclass
class Args:
    preset: str = "default"  # default (GPU: 64×64), cpu (32×32, smaller) or smoke (seconds)
    name: str = "diamond64"  # dataset name; written to data/<name> unless --out is given (not in paper)
    out: str = ""  # output folder (default data/<name>)
    image_size: int = 64  # frame height = width in pixels, a multiple of 8 (DESIGN.md §4)
    episodes: int = 1000  # episodes to write: one random world each (not in paper; see the docstring)
    episode_len: int = 256  # frames per episode, fixed (paper: 60 min episodes; see docstring)
    heldout: float = 0.1  # fraction of episodes held out for evaluation, split by episode
    fps: int = 10  # nominal frame rate written to meta.json and the GIF (paper: 20)
    seed: int = 0  # generation seed: same seed, same dataset
    assets: bool = True  # also copy the picture grid to assets/environment.png (README)
    bench: bool = False  # only measure environment frames/s on one core
    eval_random: bool = False  # only print success per task of random, contractor and expert players
    eval_episodes: int = 200  # episodes for --eval-random
    from_frames: str = ""  # import DIR/<episode>/<frames>.png as unlabeled episodes into --out
    resize: int = 0  # with --from-frames: resize images to N×N (0 = keep; sizes must agree)


PRESETS = {"smoke": dict(name="smoke", image_size=32, episodes=8, episode_len=64, assets=False, eval_episodes=16),
           "cpu": dict(name="diamond32", image_size=32, episodes=1000, assets=False)}


# ==== The environment: world, rules, rendering ================================================
ROWS, COLS = 7, 8  # map tiles; the image is 8 tiles tall: 7 map rows + 1 inventory row
GRASS, PATH, TREE, WATER, STONE, IRON, DIAMOND, TABLE = range(8)  # terrain ids
WALKABLE = (GRASS, PATH)  # PATH = floor left behind by mining
AGENT_APP, CREATURE_APP, CRACK_APP = 8, 16, 18  # appearance ids: agent 8 + 4·on_path + facing,
#   creature 16 + on_path, a tile being mined 18 + 4·MINABLE.index(tile) + crack stage − 1
MOVES = [(0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)]  # move classes noop/up/down/left/right as (Δrow, Δcol)
INVENTORY = ["wood", "stone", "iron", "diamond", "wood_pickaxe", "stone_pickaxe", "iron_pickaxe"]
WOOD, STONE_I, IRON_I, DIAMOND_I, WOOD_PICK, STONE_PICK, IRON_PICK = range(7)  # inventory slots
MAX_COUNT, TABLE_COST = 4, 2  # a slot holds up to 4; a table costs 2 wood
MINE = {TREE: (None, WOOD, 0), STONE: (WOOD_PICK, STONE_I, 3),  # tile: (tool needed, item, task)
        IRON: (STONE_PICK, IRON_I, 5), DIAMOND: (IRON_PICK, DIAMOND_I, 7)}
MINABLE = [TREE, STONE, IRON, DIAMOND]
HARDNESS = {TREE: 3, STONE: 4, IRON: 5, DIAMOND: 6}  # consecutive `use` presses to break a tile
RECIPES = [(WOOD_PICK, {WOOD: 1}, 2), (STONE_PICK, {WOOD: 1, STONE_I: 1}, 4),  # (tool, cost, task)
           (IRON_PICK, {WOOD: 1, IRON_I: 1}, 6)]
P_CREATURE_MOVE, P_STEAL, P_REGROW, MAX_TREES = 0.5, 0.1, 0.03, 10  # the stochastic parts
_inside = lambda cell: 0 <= cell[0] < ROWS and 0 <= cell[1] < COLS  # is the (row, col) cell on the map?
_next = lambda cell, move: (cell[0] + MOVES[move][0], cell[1] + MOVES[move][1])  # the neighbour in direction `move`


def _generate_world(rng: np.random.Generator):
    """A random world: a stone "mountain" in one corner with iron inside and the diamond at its
    heart (so reaching it takes mining), trees and a pond elsewhere, agent far from the mountain."""
    rr, cc = np.mgrid[:ROWS, :COLS]
    while True:
        grid = np.full((ROWS, COLS), GRASS, np.uint8)
        corner = (rng.integers(2) * (ROWS - 1), rng.integers(2) * (COLS - 1))
        depth = np.abs(rr - corner[0]) + np.abs(cc - corner[1])  # Manhattan distance to the corner
        grid[depth + rng.random((ROWS, COLS)) * 1.5 < 4.5] = STONE  # ragged edge, ≈ 12–15 tiles
        grid[corner] = DIAMOND
        inner = np.argwhere((grid == STONE) & (depth >= 2) & (depth <= 3))
        grid[tuple(inner[rng.choice(len(inner), size=2, replace=False)].T)] = IRON
        free = np.argwhere((grid == GRASS) & (depth >= 6))
        pond = free[rng.integers(len(free))]
        grid[tuple(pond)] = WATER
        r, c = pond + MOVES[1 + rng.integers(4)]
        if _inside((r, c)) and grid[r, c] == GRASS:
            grid[r, c] = WATER
        free = np.argwhere(grid == GRASS)
        grid[tuple(free[rng.choice(len(free), size=int(rng.integers(7, 10)), replace=False)].T)] = TREE
        free = np.argwhere((grid == GRASS) & (depth >= 7))
        if len(free) == 0:
            continue
        agent = tuple(int(v) for v in free[rng.integers(len(free))])
        far = np.argwhere((grid == GRASS) & (np.abs(rr - agent[0]) + np.abs(cc - agent[1]) >= 3))
        creature = tuple(int(v) for v in far[rng.integers(len(far))])
        # Water is the only tile nothing removes: re-draw worlds where it cuts the map in two.
        if len(_bfs(grid != WATER, agent)) == int((grid != WATER).sum()):
            return grid, agent, creature


def _bfs(passable: np.ndarray, start: tuple) -> dict:
    """Breadth-first search over 4-neighbours; returns {cell: parent} of every reachable cell."""
    parent, frontier = {start: None}, [start]
    for cell in frontier:  # the list grows while we walk it: a FIFO queue
        for n in (_next(cell, m) for m in range(1, 5)):
            if _inside(n) and n not in parent and passable[n]:
                parent[n] = cell
                frontier.append(n)
    return parent


class Env:
    """Gym-like, seeded: frame = env.reset(seed); frame, reward, done, info = env.step(action). frame uint8
    (H, W, 3); action int64 (A,) = (move, use, place, craft); reward float32 (n_tasks,), 1 where a milestone is
    first reached this episode; done on frame episode_len − 1. Same seed + same actions = same episode."""

    def __init__(self, image_size: int = 64, episode_len: int = 256):
        assert image_size % 8 == 0 and image_size >= 16, f"image_size must be a multiple of 8, got {image_size}"
        self.image_size, self.episode_len, self.t = image_size, episode_len, None

    def reset(self, seed: int) -> np.ndarray:
        self.rng = np.random.default_rng(seed)  # all randomness of the episode: world and dynamics
        self.grid, self.agent, self.creature = _generate_world(self.rng)
        self.facing = int(self.rng.integers(4))  # 0 up, 1 down, 2 left, 3 right (= move class − 1)
        self.inv, self.achieved, self.t = [0] * len(INVENTORY), [False] * len(TASKS), 0
        self.progress, self.mining = 0, None  # consecutive `use` presses on the tile `mining`
        return self.render()

    def _free(self, cell) -> bool:  # walkable and nobody standing there
        return _inside(cell) and self.grid[cell] in WALKABLE and cell != self.agent and cell != self.creature

    def step(self, action) -> tuple[np.ndarray, np.ndarray, bool, dict]:
        assert self.t is not None and self.t < self.episode_len - 1, "episode is over: call reset(seed)"
        move, use, place, craft = (int(a) for a in action)
        reward = np.zeros(len(TASKS), np.float32)

        def achieve(task):  # sparse binary reward, once per episode
            if not self.achieved[task]:
                self.achieved[task], reward[task] = True, 1.0
        # Rules, in this order: move (or turn), use, place, craft, then the world moves.
        if move:  # a blocked move still turns the agent: then `use` hits that tile
            self.facing = move - 1
            if self._free(_next(self.agent, move)):
                self.agent = _next(self.agent, move)
        faced = _next(self.agent, self.facing + 1)
        if use and faced == self.creature:  # scare it off to a random tile away from the agent
            far = [(int(r), int(c)) for r, c in np.argwhere(np.isin(self.grid, WALKABLE))
                   if abs(r - self.agent[0]) + abs(c - self.agent[1]) >= 4]
            self.creature = far[self.rng.integers(len(far))] if far else self.creature
        elif use and _inside(faced) and self.grid[faced] in MINE:
            # Mining is "hold to break", as in Minecraft: HARDNESS consecutive presses on the same tile with
            # the right tool; anything else resets the progress. This keeps a random policy off the ladder.
            tool, item, task = MINE[self.grid[faced]]
            if tool is None or self.inv[tool]:
                self.progress, self.mining = (self.progress + 1 if faced == self.mining else 1), faced
                if self.progress == HARDNESS[self.grid[faced]]:
                    self.inv[item] = min(self.inv[item] + 1, MAX_COUNT)  # a full slot drops it
                    self.grid[faced] = GRASS if item == WOOD else PATH
                    self.progress, self.mining = 0, None
                    achieve(task)
        if not (use and faced == self.mining):
            self.progress, self.mining = 0, None
        if place and self.inv[WOOD] >= TABLE_COST and self._free(faced):
            self.grid[faced], self.inv[WOOD] = TABLE, self.inv[WOOD] - TABLE_COST
            achieve(1)
        if craft and _inside(faced) and self.grid[faced] == TABLE:  # crafting: face a table
            for tool, cost, task in RECIPES:  # the first recipe not yet made whose cost we can pay
                if not self.inv[tool] and all(self.inv[k] >= n for k, n in cost.items()):
                    for k, n in cost.items():
                        self.inv[k] -= n
                    self.inv[tool] = 1
                    achieve(task)
                    break
        # The parts nobody controls: the creature wanders, steals wood, trees regrow.
        if self.rng.random() < P_CREATURE_MOVE:
            target = _next(self.creature, 1 + self.rng.integers(4))
            self.creature = target if self._free(target) else self.creature
        if (abs(self.creature[0] - self.agent[0]) + abs(self.creature[1] - self.agent[1]) == 1
                and self.inv[WOOD] and self.rng.random() < P_STEAL):
            self.inv[WOOD] -= 1
        if (self.grid == TREE).sum() < MAX_TREES and self.rng.random() < P_REGROW:
            r, c = self.rng.integers(ROWS), self.rng.integers(COLS)
            if self._free((r, c)) and self.grid[r, c] == GRASS:
                self.grid[r, c] = TREE
        self.t += 1
        info = {"t": self.t, "inventory": dict(zip(INVENTORY, self.inv)),
                "achieved": [k for k, a in zip(TASKS, self.achieved) if a]}
        return self.render(), reward, self.t == self.episode_len - 1, info

    def render(self) -> np.ndarray:
        """An array blit of precomputed sprites, no drawing calls per frame (hence > 5,000 frames/s)."""
        s, bank = self.image_size // 8, _sprites(self.image_size)
        app = self.grid.copy()  # (ROWS, COLS) appearance id per tile
        app[self.agent] = AGENT_APP + 4 * (self.grid[self.agent] == PATH) + self.facing
        app[self.creature] = CREATURE_APP + (self.grid[self.creature] == PATH)
        if self.progress:  # a crack on the tile being mined, in 4 stages up to its hardness
            stage = -(-4 * self.progress // HARDNESS[self.grid[self.mining]])  # ⌈4·progress/hardness⌉
            app[self.mining] = CRACK_APP + 4 * MINABLE.index(self.grid[self.mining]) + stage - 1
        world = bank["tiles"][app].transpose(0, 2, 1, 3, 4).reshape(ROWS * s, COLS * s, 3)  # (7s, 8s, 3)
        counts = np.array(self.inv + [0])  # the 8th slot is empty
        strip = bank["slots"][np.arange(8), counts].transpose(1, 0, 2, 3).reshape(s, COLS * s, 3)  # (s, 8s, 3)
        return np.concatenate([world, strip], axis=0)  # (H, W, 3)


@functools.lru_cache(maxsize=None)
def _sprites(image_size: int) -> dict:
    """Sprites drawn natively at one size s = image_size / 8 (shapes on the unit square, sampled at the pixel
    centres): tiles (34, s, s, 3) = 8 terrains, agent on grass/path × 4 facings, creature on grass/path, 4
    minable terrains × 4 crack stages; slots (8, MAX_COUNT + 1, s, s, 3); the hashes decode_frames uses."""
    s = image_size // 8
    v, u = (np.mgrid[:s, :s] + 0.5) / s  # pixel centres in [0, 1]: v down, u right

    disc = lambda cu, cv, r: (u - cu) ** 2 + (v - cv) ** 2 < r * r  # (s, s) mask of a disc

    def paint(base, *layers):
        img = np.full((s, s, 3), base, np.uint8)
        for mask, colour in layers:
            img[mask] = colour
        return img
    grass, path, rock = (76, 153, 60), (168, 140, 100), (125, 125, 130)
    spots = (disc(0.3, 0.3, 0.22) | disc(0.72, 0.7, 0.22))
    tiles = [paint(grass), paint(path),
             paint(grass, (disc(0.5, 0.4, 0.42), (24, 90, 36)), ((abs(u - 0.5) < 0.2) & (v > 0.75), (110, 70, 30))),
             paint((50, 100, 210), ((abs(v - 0.4) < 0.1) & (abs(u - 0.45) < 0.3), (140, 180, 240))),
             *(paint(rock, (spots, c)) for c in [(95, 95, 100), (220, 150, 90), (90, 235, 235)]),  # stone/iron/diamond
             paint((100, 60, 30), (v < 0.45, (190, 140, 80)), ((v >= 0.45) & (abs(u - 0.5) < 0.25), grass))]
    # The agent: a yellow body with a dark "nose" on its facing side (up, down, left, right), on grass or path.
    tiles += [paint(g, (disc(0.5, 0.5, 0.4), (245, 205, 50)), (disc(0.5 + 0.3 * du, 0.5 + 0.3 * dv, 0.16), (30,) * 3))
              for g in (grass, path) for dv, du in [(-1, 0), (1, 0), (0, -1), (0, 1)]]
    tiles += [paint(g, (abs(u - 0.5) + abs(v - 0.5) < 0.45, (215, 40, 60))) for g in (grass, path)]  # the creature
    # Mining progress, crack stages 1…4 of each minable terrain: a dark crack grows along the diagonal.
    tiles += [np.where(((np.abs(u + v - 1) < 0.55 / s) & (v < stage / 4))[..., None], np.uint8(25), tiles[terrain])
              for terrain in MINABLE for stage in range(1, 5)]
    # Inventory slots: a bar of `count` quarters for materials, a pickaxe icon (head colour = material) for tools.
    colours, dark = [(150, 95, 40), (170, 170, 175), (230, 150, 95), (90, 235, 235)], (35, 35, 40)
    bar_u = (u > 0.5 / s) & (u < 1 - max(1, s // 8) / s)  # one dark gap column between slots
    handle = (abs(u - 0.45) < 0.2) & (v >= 0.3)
    slots = np.zeros((8, MAX_COUNT + 1, s, s, 3), np.uint8)
    for k, n in np.ndindex(8, MAX_COUNT + 1):
        if k < 4:
            slots[k, n] = paint(dark, (bar_u & (v > 1 - n / MAX_COUNT), colours[k]))
        elif k < 7 and n:
            slots[k, n] = paint(dark, (bar_u & (v < 0.3), colours[k - 4]), (handle, (200, 170, 120)))
        else:
            slots[k, n] = paint(dark)
    tiles = np.stack(tiles)  # (34, s, s, 3)
    # Decoding (for the pixel-reading contractor): a random linear hash of every tile's pixels.
    weights = np.random.default_rng(12345).integers(1, 1 << 20, size=s * s * 3)
    tile_hash = tiles.reshape(len(tiles), -1).astype(np.int64) @ weights  # (34,)
    slot_hash = slots.reshape(8, MAX_COUNT + 1, -1).astype(np.int64) @ weights  # (8, 5)
    assert len(set(tile_hash.tolist())) == len(tiles), "sprites must be distinguishable"
    return {"tiles": tiles, "slots": slots, "weights": weights, "tile_hash": tile_hash, "slot_hash": slot_hash}


def decode_frames(frames: np.ndarray) -> dict:
    """Read the state back from rendered frames (B, H, W, 3): the contractors play from pixels, as
    the human VPT contractors did. Returns appearance ids (B, ROWS, COLS) and inventory (B, 7)."""
    B, H, W, _ = frames.shape
    s, bank = H // 8, _sprites(H)
    cells = frames.reshape(B, 8, s, 8, s, 3).transpose(0, 1, 3, 2, 4, 5).reshape(B, 64, -1)  # (B, 64, s·s·3)
    h = cells.astype(np.int64) @ bank["weights"]  # (B, 64) one hash per tile
    tile_eq = h[:, :56, None] == bank["tile_hash"]  # (B, 56, 34): 7×8 map tiles vs appearances
    slot_eq = h[:, 56:63, None] == bank["slot_hash"][:7]  # (B, 7, 5): inventory slots vs counts
    if not (tile_eq.any(-1).all() and slot_eq.any(-1).all()):
        raise ValueError("decode_frames: a tile does not match any sprite; was this frame rendered by Env?")
    return {"app": tile_eq.argmax(-1).reshape(B, ROWS, COLS), "inv": slot_eq.argmax(-1)}


# ==== Players (random; contractors of mixed skill) and rollouts in the real environment =======
class RandomPolicy:
    """Uniform over the classes of every action component (the paper's random baseline)."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def act(self, frames: np.ndarray) -> np.ndarray:
        return np.stack([self.rng.integers(n, size=len(frames)) for _, n in ACTION_COMPONENTS], 1)  # (B, A)


class ContractorPolicy:
    """A scripted player: reads the frame, finds the next rung of the ladder, walks there by BFS, but like a hired
    human only partly diligently. Each episode draws `skill` (chance of following the script, else a wandering
    excursion of `sticky` length), `ambition` (the highest task it bothers with: most stop early, which keeps the
    diamond rare), `hoard` (wood gathered before building), `mash` (stray button presses) and `scares` (chases
    the creature off). skill=1, ambition=7 (fixed for all players) is an expert: what the ladder allows."""

    def __init__(self, seed: int = 0, skill: float | None = None, ambition: int | None = None):
        self.rng, self.skill, self.ambition = np.random.default_rng(seed), skill, ambition

    def reset(self, n_envs: int) -> None:
        r = self.rng
        self.profiles = [{"skill": self.skill if self.skill is not None else r.uniform(0.3, 0.95),
                          "ambition": self.ambition if self.ambition is not None else
                          int(r.choice(len(TASKS), p=[.05, .1, .15, .15, .15, .15, .15, .1])),
                          "hoard": int(r.integers(2, 5)), "sticky": r.uniform(0.5, 0.9),
                          "mash": r.uniform(0, 0.1), "scares": bool(r.random() < 0.5), "excursion": 0,
                          "last": np.zeros(len(ACTION_COMPONENTS), np.int64)} for _ in range(n_envs)]

    def act(self, frames: np.ndarray) -> np.ndarray:
        state = decode_frames(frames)
        return np.stack([self._act(p, app, inv) for p, app, inv in zip(self.profiles, state["app"], state["inv"])])

    def _explore(self) -> np.ndarray:
        return np.array([self.rng.integers(5), *(self.rng.random(3) < 0.1)], np.int64)

    def _act(self, p: dict, app: np.ndarray, inv: np.ndarray) -> np.ndarray:
        if p["excursion"] > 0:  # wandering off: keep walking the same way, sometimes turn
            p["excursion"] -= 1
            p["last"] = self._explore() if self.rng.random() > p["sticky"] else p["last"]
            return p["last"]
        if self.rng.random() > p["skill"]:
            p["excursion"], p["last"] = int(self.rng.geometric(1 - p["sticky"])) - 1, self._explore()
            return p["last"]
        action = self._script(p, app, inv)
        action = self._explore() if action is None else action  # nothing left to do (or stuck): wander
        if self.rng.random() < p["mash"]:
            action[1 + self.rng.integers(3)] = 1
        return action

    def _script(self, p: dict, app: np.ndarray, inv: np.ndarray):
        """The next sensible action toward the next rung of the ladder, or None."""
        agent = tuple(int(v) for v in np.argwhere((app >= AGENT_APP) & (app < CREATURE_APP))[0])
        on_path, facing = divmod(int(app[agent]) - AGENT_APP, 4)
        creature = tuple(int(v) for v in np.argwhere((app >= CREATURE_APP) & (app < CRACK_APP))[0])
        grid, cracked = app.copy(), app >= CRACK_APP  # the terrain: under the two figures, and under cracks
        grid[cracked] = np.array(MINABLE)[(app[cracked] - CRACK_APP) // 4]
        grid[agent] = PATH if on_path else GRASS
        grid[creature] = PATH if app[creature] == CREATURE_APP + 1 else GRASS
        # The next task on the ladder: the first rung not done yet, read off the world and the inventory.
        ladder = [((grid == TABLE).any(), 1), (inv[WOOD_PICK], 2), (inv[STONE_PICK], 4 if inv[STONE_I] else 3),
                  (inv[IRON_PICK], 6 if inv[IRON_I] else 5), (inv[DIAMOND_I], 7)]  # (done?, task)
        task = next((k for done, k in ladder if not done), len(TASKS))
        if task > p["ambition"]:  # done with what it meant to do: potter about, gather some wood
            return None if inv[WOOD] else self._walk(agent, grid, inv, creature, TREE)
        if p["scares"] and abs(creature[0] - agent[0]) + abs(creature[1] - agent[1]) == 1:
            return self._face_and(agent, creature, button=1)
        if task == 1 and inv[WOOD] >= min(max(TABLE_COST, p["hoard"]), MAX_COUNT):
            faced = _next(agent, facing + 1)
            if _inside(faced) and grid[faced] in WALKABLE and faced != creature:
                return np.array([0, 0, 1, 0], np.int64)  # place the table on the faced tile
            return None  # turn by wandering a step, try again next frame
        # Mine the rung's material, or craft its pickaxe at a table (each pickaxe costs one wood: get some first).
        tile = {1: TREE, 3: STONE, 5: IRON, 7: DIAMOND}.get(task, TABLE if inv[WOOD] else TREE)
        return self._walk(agent, grid, inv, creature, tile, button=3 if tile == TABLE else 1)

    def _face_and(self, agent, cell, button=0) -> np.ndarray:
        """Move toward an adjacent cell (a blocked move only turns) and press `button` (1 use, 3 craft)."""
        move = 1 + MOVES[1:].index((cell[0] - agent[0], cell[1] - agent[1]))
        return np.array([move, button == 1, button == 2, button == 3], np.int64)

    def _walk(self, agent, grid, inv, creature, tile, button=1):
        """The first action of a shortest path (BFS through walkable tiles and tiles we can mine on the way)
        next to a `tile`: a step, or turn + use to clear an obstacle, or at the end: face it and press `button`."""
        minable = {TREE} | {t for t, (tool, _, _) in MINE.items() if tool is not None and inv[tool]}
        passable = np.isin(grid, list(WALKABLE) + sorted(minable))
        passable[creature] = False  # it blocks the way (or gets scared off, see `scares`)
        parent = _bfs(passable, agent)
        for cell in parent:  # BFS order: the nearest cell first (obstacles on the way get mined)
            goal = next((n for n in (_next(cell, m) for m in range(1, 5)) if _inside(n) and grid[n] == tile), None)
            if goal is None:
                continue
            if cell == agent:
                return self._face_and(agent, goal, button)
            while parent[cell] != agent:  # walk back to the first step of the path
                cell = parent[cell]
            return self._face_and(agent, cell, button=1 if grid[cell] not in WALKABLE else 0)
        return None


def episode_seed(seed: int, stream: str, i: int) -> int:
    """Independent world seeds per purpose: dataset worlds and evaluation worlds never coincide."""
    stream_id = ["data", "eval", "bench", "players"].index(stream)
    return int(np.random.SeedSequence([seed, stream_id, i]).generate_state(1)[0])


def rollout(policy, seeds: list[int], image_size: int = 64, episode_len: int = 256, keep_frames: bool = True) -> dict:
    """Play B = len(seeds) episodes in lockstep, recorded in the data contract's indexing. policy: an object with
    act(frames (B, H, W, 3) uint8) -> (B, A) int64 (and optionally reset(n_envs)), or a callable frames -> actions.
    Returns frames (B, T, H, W, 3) (None unless keep_frames), actions (B, T, A), rewards (B, T, n_tasks)."""
    B, T, A = len(seeds), episode_len, len(ACTION_COMPONENTS)
    envs = [Env(image_size, episode_len) for _ in seeds]
    frame = np.stack([env.reset(s) for env, s in zip(envs, seeds)])  # (B, H, W, 3)
    act = policy.act if hasattr(policy, "act") else policy
    if hasattr(policy, "reset"):
        policy.reset(B)
    frames = np.empty((B, T, *frame.shape[1:]), np.uint8) if keep_frames else None
    actions, rewards = np.zeros((B, T, A), np.int64), np.zeros((B, T, len(TASKS)), np.float32)  # rewards[:, 0] = 0
    classes = np.array([n for _, n in ACTION_COMPONENTS])
    for t in range(T):
        if keep_frames:
            frames[:, t] = frame
        a = np.asarray(act(frame))  # (B, A): a_t, taken at frame t
        if a.shape != (B, A) or not np.issubdtype(a.dtype, np.integer) or (a < 0).any() or (a >= classes).any():
            raise ValueError(f"policy returned actions of shape {a.shape} dtype {a.dtype}; expected ({B}, {A}) "
                             f"integers with component ranges {ACTION_COMPONENTS}")
        actions[:, t] = a
        if t == T - 1:
            break  # a_{T-1} is recorded but never executed: the episode ends on frame T−1
        for i, env in enumerate(envs):
            frame[i], rewards[i, t + 1], _, _ = env.step(a[i])  # r_{t+1}: reward on entering frame t+1
    return {"frames": frames, "actions": actions, "rewards": rewards}


def success_rates(rewards: np.ndarray) -> dict:
    """rewards (E, T, n_tasks) -> {task: {"rate", "stderr"}}: share of episodes reaching it, stderr √(p(1 − p)/E)."""
    hit = rewards.max(1) > 0  # (E, n_tasks)
    p, n = hit.mean(0), len(hit)
    return {k: {"rate": float(p[j]), "stderr": float(np.sqrt(p[j] * (1 - p[j]) / n))} for j, k in enumerate(TASKS)}


def evaluate(policy, episodes: int = 100, seed: int = 0, image_size: int = 64, episode_len: int = 256,
             batch: int = 50) -> dict:
    """Score any policy in the real environment, on evaluation worlds no dataset contains, `batch` episodes in
    lockstep. Returns {"success": {task: {"rate", "stderr"}}, "return": {"mean", "stderr"}, "episodes": n}."""
    chunks = [range(start, min(start + batch, episodes)) for start in range(0, episodes, batch)]
    rewards = np.concatenate([rollout(policy, [episode_seed(seed, "eval", i) for i in chunk], image_size, episode_len,
                                      keep_frames=False)["rewards"] for chunk in chunks])  # (episodes, T, n_tasks)
    ret = rewards.sum((1, 2))  # (episodes,) number of milestones reached
    return {"success": success_rates(rewards), "episodes": episodes,
            "return": {"mean": float(ret.mean()), "stderr": float(ret.std() / np.sqrt(len(ret)))}}


def simulate_future(root: str, episode_id: str, t: int, plans: list, rng_seed=None, meta: dict | None = None):
    """The true environment as a world model: rebuild the world of a generated episode, replay its recorded
    actions to frame t once, then play each plan (H, A) of `plans` from frame t on (row h is taken at frame
    t + h) and return, per plan, the H frames that follow, (H, H_px, W_px, 3) uint8. rng_seed draws afresh what
    nobody controls (the creature, regrowing trees, where a scared creature lands), the same draws for every
    plan; None keeps the episode's own draws. Returns None when the episode cannot be replayed: not a dataset
    written by `generate` (ids ep000000, …), or the replay does not reproduce frame t (other rules)."""
    meta = meta or load_meta(root)
    if meta.get("generator") != "minidreamer4 data.py" or not (episode_id[:2] == "ep" and episode_id[2:].isdigit()):
        return None
    recorded = check_episode(os.path.join(root, episode_id + ".npz"), meta)["actions"]  # (T_ep, A)
    env = Env(meta["image_size"], meta.get("episode_len", 256))
    frame = env.reset(episode_seed(meta["seed"], "data", int(episode_id[2:])))
    for a in recorded[:t]:
        frame, *_ = env.step(a)
    if not np.array_equal(frame, mapped_frames(root, episode_id)[t]):
        return None  # written by another version of the rules: no replay
    futures = []
    for plan in plans:
        branch = copy.deepcopy(env)  # every plan starts from the same state at frame t
        if rng_seed is not None:
            branch.rng = np.random.default_rng(rng_seed)
        futures.append(np.stack([branch.step(a)[0] for a in plan]))  # (H, H_px, W_px, 3)
    return futures


def bench_env(image_size: int = 64, steps: int = 20000) -> float:
    """Environment frames/s on one core, rendering included, random actions."""
    env, acts = Env(image_size, episode_len=10 ** 9), RandomPolicy(0).act(np.zeros((steps, 1)))  # acts (steps, A)
    env.reset(episode_seed(0, "bench", 0))
    t0 = time.perf_counter()
    for a in acts:
        env.step(a)
    return steps / (time.perf_counter() - t0)


def print_rates(title: str, result: dict) -> None:
    print(f"{title} ({result['episodes']} episodes; milestones/episode {result['return']['mean']:.2f}):")
    for k, r in result["success"].items():
        print(f"  {k:<20s} {100 * r['rate']:5.1f} % ± {100 * r['stderr']:.1f}")


# ==== Writing a dataset: contractor episodes and pictures, or imported image folders ==========
def split_ids(ids: list[str], heldout: float) -> dict:
    """Held-out = the last ⌈heldout·N⌉ sorted episodes (≥ 1 when N ≥ 2): by episode, never by frame."""
    ids = sorted(ids)
    n = min(len(ids) - 1, max(1, int(np.ceil(heldout * len(ids))))) if len(ids) >= 2 and heldout > 0 else 0
    return {"train": ids[:len(ids) - n], "heldout": ids[len(ids) - n:]}


def write_episode(root: str, episode_id: str, frames: np.ndarray, actions: np.ndarray | None = None,
                  rewards: np.ndarray | None = None) -> str:
    """Write one episode in the data contract's format (frames; actions, rewards unless None): bring your own."""
    path, labels = os.path.join(root, episode_id + ".npz"), {"actions": actions, "rewards": rewards}
    np.savez_compressed(path, frames=frames, **{k: v for k, v in labels.items() if v is not None})
    return path


def write_meta(root: str, meta: dict) -> None:
    tmp = os.path.join(root, f"meta.json.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(root, "meta.json"))  # atomic: a reader never sees half a meta.json


def generate(args: Args) -> str:
    """Play contractors in fresh worlds; write into <out>.partial, renamed at the end: never half a dataset."""
    root = args.out or os.path.join("data", args.name)
    if os.path.exists(root) and os.listdir(root) and (not os.path.exists(os.path.join(root, "meta.json"))
                                                      or load_meta(root).get("generator") != "minidreamer4 data.py"):
        raise FileExistsError(f"{root} exists and is not a dataset written by data.py; choose another --out")
    tmp = root.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    ids, all_rewards, t0 = [f"ep{i:06d}" for i in range(args.episodes)], [], time.time()
    batch = 16  # episodes in lockstep (batched frame decoding); fixed so the dataset depends on seed only
    for start in range(0, args.episodes, batch):
        seeds = [episode_seed(args.seed, "data", i) for i in range(start, min(start + batch, args.episodes))]
        policy = ContractorPolicy(episode_seed(args.seed, "players", start))  # fresh player profiles per batch
        ep = rollout(policy, seeds, args.image_size, args.episode_len)
        for i in range(len(seeds)):
            write_episode(tmp, ids[start + i], ep["frames"][i], ep["actions"][i], ep["rewards"][i])
        all_rewards.append(ep["rewards"])
        if (start // batch) % 5 == 4 or start + len(seeds) == args.episodes:
            print(f"  {start + len(seeds)}/{args.episodes} episodes, {time.time() - t0:.1f}s", flush=True)
    gen_s, rewards = time.time() - t0, np.concatenate(all_rewards)  # rewards (episodes, T, n_tasks)
    meta = {"format_version": 1, "generator": "minidreamer4 data.py", "name": os.path.basename(root.rstrip("/")),
            "image_size": args.image_size, "fps": args.fps, "episode_len": args.episode_len,
            "action_components": [list(c) for c in ACTION_COMPONENTS], "tasks": TASKS, "episodes": len(ids),
            "frames": len(ids) * args.episode_len, "split": split_ids(ids, args.heldout), "seed": args.seed,
            "args": asdict(args)}
    write_meta(tmp, meta)
    order = np.argsort(-rewards.sum((1, 2)), kind="stable")  # episodes by milestones reached
    shown = [{"frames": load_frames(os.path.join(tmp, ids[i] + ".npz")), "rewards": rewards[i]}
             for i in order[[0, len(order) // 2, -1]]]  # the best, a median and the weakest contractor
    save_pictures(tmp, shown, args.fps, os.path.join("assets", "environment.png") if args.assets else None)
    shutil.rmtree(root, ignore_errors=True)  # an older dataset of ours (checked above)
    os.replace(tmp, root)
    size = sum(os.path.getsize(f) for f in glob.glob(os.path.join(root, "*.npz")))
    print(f"wrote {root}: {len(ids)} episodes, {meta['frames']:,} frames of {args.image_size}×{args.image_size}, "
          f"{size:,} bytes on disk ({size / 2 ** 20:.1f} MiB, {size / meta['frames']:.0f} B/frame), in {gen_s:.1f}s "
          f"({meta['frames'] / gen_s:,.0f} frames/s incl. contractors and compression)")
    print_rates("contractor success in the dataset", {"success": success_rates(rewards), "episodes": len(ids),
                                                      "return": {"mean": float(rewards.sum((1, 2)).mean())}})
    print(f"environment speed: {bench_env(args.image_size, 5000):,.0f} frames/s on one core (rendering included)")
    return root


def save_pictures(root: str, episodes: list, fps: int, asset_path: str | None = None) -> None:
    """episodes.png: episodes [{frames (T, H, W, 3), rewards (T, n_tasks)}] as rows of frames, the first at its
    milestones (filled up with evenly spaced frames); episode.gif: the first. asset_path: a copy of the grid."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image
    cols, (T, S) = 8, episodes[0]["frames"].shape[:2]
    events = [(int(t), TASKS[k]) for t, k in zip(*np.nonzero(episodes[0]["rewards"]))][:cols]
    times = [int(t) for t in np.linspace(0, T - 1, cols + 2)[1:-1] if all(abs(t - e) > 2 for e, _ in events)]
    rows = [sorted(events + [(t, "") for t in times[:cols - len(events)]])]
    rows += [[(int(t), "") for t in np.linspace(0, T - 1, cols)] for _ in episodes[1:]]
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.3 * cols, 1.45 * len(rows)), squeeze=False)
    for r, (row, ep) in enumerate(zip(rows, episodes)):
        for ax, (t, name) in zip(axes[r], row):
            ax.imshow(ep["frames"][t], interpolation="nearest")
            ax.set_title(f"t={t} {name.replace('_', ' ')}", fontsize=6, color="C3" if name else "black")
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"built-in environment {S}×{S}: the best contractor episode at its milestones (top), a median "
                 f"and the weakest contractor (below); inventory strip at the bottom of each frame", fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(root, "episodes.png"), dpi=120)
    plt.close(fig)
    size = S * max(1, 128 // S)  # the GIF scaled up to about 128 pixels, nearest neighbour
    gif = [Image.fromarray(f).resize((size, size), Image.NEAREST) for f in episodes[0]["frames"]]
    gif[0].save(os.path.join(root, "episode.gif"), save_all=True, append_images=gif[1:], duration=1000 // fps, loop=0)
    if asset_path:
        os.makedirs(os.path.dirname(asset_path), exist_ok=True)
        shutil.copyfile(os.path.join(root, "episodes.png"), asset_path)


def import_frames(src: str, out: str, resize: int = 0, fps: int = 10, heldout: float = 0.1) -> str:
    """DIR/<episode>/<frame images, sorted by name> -> out/ep000000.npz … (frames only) + meta.json.
    Images must share one square size unless `resize` > 0 resizes all to resize×resize (bilinear)."""
    from PIL import Image
    folders = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d))) if os.path.isdir(src) else []
    if not folders:
        raise FileNotFoundError(f"{src}: expected one sub-folder of images per episode, found none")
    if os.path.exists(out) and os.listdir(out):
        raise FileExistsError(f"{out} exists and is not empty; choose another --out")
    tmp = out.rstrip("/") + ".partial"  # written in full, then renamed (as in generate)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    size, sources = None, {}  # sources: episode id -> its sub-folder
    for d in folders:
        files = sorted(f for f in os.listdir(os.path.join(src, d)) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            warnings.warn(f"{os.path.join(src, d)}: no images; skipped")
            continue
        frames = []
        for f in files:
            with Image.open(os.path.join(src, d, f)) as im:
                im = im.convert("RGB").resize((resize, resize), Image.BILINEAR) if resize else im.convert("RGB")
                a = np.asarray(im, dtype=np.uint8)  # (H, W, 3)
            if size is None and a.shape[0] != a.shape[1]:
                raise ValueError(f"{os.path.join(src, d, f)}: {a.shape[0]}×{a.shape[1]} is not square; pass --resize N")
            if size is not None and a.shape != size:
                raise ValueError(f"{os.path.join(src, d, f)}: {a.shape[0]}×{a.shape[1]} differs from the first image "
                                 f"({size[0]}×{size[1]}); pass --resize N to resize every image to N×N")
            size = a.shape
            frames.append(a)
        sources[f"ep{len(sources):06d}"] = d
        write_episode(tmp, list(sources)[-1], np.stack(frames))  # frames only: (T, H, W, 3)
    write_meta(tmp, {"format_version": 1, "generator": "data.py --from-frames",
                     "name": os.path.basename(out.rstrip("/")), "image_size": size[0], "fps": fps,
                     "action_components": [], "tasks": [], "episodes": len(sources),
                     "split": split_ids(list(sources), heldout), "seed": None, "sources": sources})
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"imported {len(sources)} unlabeled episodes of {size[0]}×{size[1]} frames into {out}"
          + (f" (resized to {resize}×{resize})" if resize else ""))
    return out


# ==== Reading a dataset: validation, meta.json, the window sampler ============================
REGENERATE = "Regenerate a built-in dataset with `python data.py` (see --help), or fix/delete this file."
HOW_TO_MAKE = ("Generate the built-in dataset with `python data.py`, or import images with "
               "`python data.py --from-frames DIR --out {}`.")


def _bad(path: str, problem: str, error=ValueError) -> Exception:  # names the file and says how to fix it
    return error(f"{path}: {problem} {REGENERATE}")


def _read_episode(path: str) -> tuple:
    """(frames shape, frames dtype, actions or None, rewards or None) of one .npz, the frames left compressed."""
    keys = []
    try:
        with np.load(path) as z:
            keys = sorted(z.files)
            with z.zip.open("frames.npy") as f:  # KeyError if there is none
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
            return shape, dtype, *(z[k] if k in keys else None for k in ("actions", "rewards"))
    except KeyError:
        raise _bad(path, f"missing key 'frames' (found {keys}); every episode needs "
                         f"frames uint8 (T, H, W, 3).") from None
    except Exception as e:  # zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, …
        raise _bad(path, f"cannot read it, the file is truncated or corrupt ({type(e).__name__}: {e}).") from None


def check_episode(path: str, meta: dict) -> dict:
    """Check one episode file against the data contract and meta.json, without decoding its frames.
    Returns {"T", "actions" (T, A) int64 or None, "rewards" (T, n_tasks) float32 or None}."""
    shape, dtype, actions, rewards = _read_episode(path)
    S, T, A, K = meta["image_size"], shape[0] if shape else 0, len(meta["action_components"]), len(meta["tasks"])
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
        raise _bad(path, f"frames must be uint8 (T, H, W, 3), got {dtype} {shape}.")
    if shape[1:3] != (S, S):
        raise _bad(path, f"frames are {shape[1]}×{shape[2]} but meta.json says image_size {S}; all episodes of a "
                         f"dataset must share one size (import with --from-frames --resize {S}).")
    if T < 1:
        raise _bad(path, "the episode has no frames.")
    if actions is not None and (actions.dtype != np.int64 or actions.shape != (T, A)):
        raise _bad(path, f"actions must be int64 (T={T}, A={A}) to match meta.json, got {actions.dtype} "
                         f"{actions.shape}.")
    for j, (name, n) in enumerate(meta["action_components"] if actions is not None else []):
        if actions[:, j].min() < 0 or actions[:, j].max() >= n:
            raise _bad(path, f"action component '{name}' has values in [{actions[:, j].min()}, {actions[:, j].max()}] "
                             f"but meta.json declares {n} classes (0…{n - 1}).")
    if rewards is not None and (rewards.dtype != np.float32 or rewards.shape != (T, K)):
        raise _bad(path, f"rewards must be float32 (T={T}, n_tasks={K}) to match meta.json, got {rewards.dtype} "
                         f"{rewards.shape}.")
    return {"T": T, "actions": actions, "rewards": rewards}


def load_frames(path: str) -> np.ndarray:
    """Decode the frames of one episode (the expensive part: ≈ 5 ms for 256 frames at 64×64)."""
    try:
        with np.load(path) as z:
            return z["frames"]
    except Exception as e:  # a CRC error shows up only here, when the data is decompressed
        raise _bad(path, f"cannot decode frames, the file is corrupt ({type(e).__name__}: {e}).") from None


def mapped_frames(root: str, episode_id: str) -> np.ndarray:
    """The frames of one episode as a read-only memory map of a decoded copy, <root>/.decoded/<id>.npy,
    written on first use (and again when the .npz is newer); the OS pages it in and out."""
    src, dst = os.path.join(root, episode_id + ".npz"), os.path.join(root, ".decoded", episode_id + ".npy")
    if not os.path.exists(dst) or os.path.getmtime(dst) < os.path.getmtime(src):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        tmp = f"{dst[:-4]}.tmp{os.getpid()}.npy"  # write, then rename: readers never see half a file
        np.save(tmp, load_frames(src))
        os.replace(tmp, dst)
    return np.load(dst, mmap_mode="r")  # (T, H, W, 3) uint8


def load_meta(root: str) -> dict:
    """Read meta.json; action_components become (name, classes) tuples. A bring-your-own folder without one gets
    it inferred from the episodes and written (see the module docstring's deviations)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset folder {root} does not exist. {HOW_TO_MAKE.format(root)}")
    path, files = os.path.join(root, "meta.json"), sorted(glob.glob(os.path.join(root, "*.npz")))
    if not os.path.exists(path):
        if not files:
            raise FileNotFoundError(f"{root}: no .npz episodes and no meta.json. {HOW_TO_MAKE.format(root)}")
        heads = [_read_episode(f) for f in files]  # (frames shape, frames dtype, actions, rewards) per episode
        sizes, n_tasks = {tuple(h[0][1:3]) for h in heads}, {h[3].shape[-1] for h in heads if h[3] is not None}
        maxima = [h[2].max(0) for h in heads if h[2] is not None and len(h[2])]  # (A,) per labelled episode
        if len(sizes) != 1 or len({len(m) for m in maxima}) > 1 or len(n_tasks) > 1:
            raise ValueError(f"{root}: episodes disagree (image sizes {sorted(sizes)}, action widths "
                             f"{sorted({len(m) for m in maxima})}, reward widths {sorted(n_tasks)}); write meta.json "
                             f"yourself or fix the files.")
        classes = [max(2, int(m) + 1) for m in (np.max(maxima, axis=0) if maxima else [])]  # largest action + 1
        ids = [os.path.basename(f)[:-4] for f in files]
        write_meta(root, {"format_version": 1, "generator": "inferred by data.py",
                          "name": os.path.basename(root.rstrip("/")), "image_size": next(iter(sizes))[0], "fps": 10,
                          "action_components": [[f"a{j}", c] for j, c in enumerate(classes)],
                          "tasks": [f"task{k}" for k in range(next(iter(n_tasks), 0))], "episodes": len(ids),
                          "split": split_ids(ids, 0.1), "seed": None})
        print(f"note: {path} was missing; inferred it from the episodes and wrote it (edit names there if you like)")
    with open(path) as f:
        meta = json.load(f)
    missing = {"image_size", "fps", "action_components", "tasks", "split"} - set(meta)
    if missing:
        raise _bad(path, f"missing fields {sorted(missing)}. Delete meta.json to have it inferred, or")
    meta["action_components"] = [(str(n), int(c)) for n, c in meta["action_components"]]
    return meta


def _split_ids(root: str, meta: dict, split: str) -> list[str]:
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    ids = meta["split"]["train"] + meta["split"]["heldout"] if split == "all" else meta["split"][split]
    for path in (os.path.join(root, i + ".npz") for i in ids):
        if not os.path.exists(path):
            raise _bad(path, "listed in meta.json but missing.", FileNotFoundError)
    return ids


def iter_episodes(root: str, split: str = "train"):
    """Yield every episode of a split whole: {"id", "frames" (T, H, W, 3) uint8, "actions" (T, A) int64
    or None, "rewards" (T, n_tasks) float32 or None} as numpy arrays (the tokenizer encodes them all)."""
    meta = load_meta(root)
    for i in _split_ids(root, meta, split):
        path = os.path.join(root, i + ".npz")
        yield {"id": i, "frames": load_frames(path), **check_episode(path, meta)}


class SequenceDataset:
    """Random windows of `seq_len` frames from one split of a dataset folder, drawn with the dataset's own numpy
    Generator `rng` (seeded by `seed`: the data stream does not depend on model initialisation). Episodes are
    validated up front (headers, labels); frames come from memory-mapped decoded copies, `open_episodes` at most."""

    def __init__(self, root: str, split: str = "train", seq_len: int = 16, seed: int = 0, open_episodes: int = 256):
        self.root, self.split, self.seq_len, self.meta = root, split, seq_len, load_meta(root)
        self.image_size, self.tasks = self.meta["image_size"], self.meta["tasks"]
        self.action_components = self.meta["action_components"]
        checked = {i: check_episode(os.path.join(root, i + ".npz"), self.meta)
                   for i in _split_ids(root, self.meta, split)}  # id -> {"T", "actions", "rewards"}
        for i in [i for i, e in checked.items() if e["T"] < seq_len]:
            warnings.warn(f"{root}/{i}.npz: {checked.pop(i)['T']} frames < seq_len {seq_len}; skipped")
        self.ids, self.episodes = list(checked), list(checked.values())
        if not self.ids:
            raise ValueError(f"{root}: split '{split}' has no episode of at least seq_len={seq_len} frames "
                             f"(run `python data.py` to generate, or lower seq_len)")
        self.n_frames = sum(e["T"] for e in self.episodes)
        # Uniform sampling over every valid window: episode i owns T_i − seq_len + 1 start positions.
        self.offsets = np.cumsum([0] + [e["T"] - seq_len + 1 for e in self.episodes])  # (n_episodes + 1,)
        self.events = {}  # task -> its reward events [(episode index, t)], for "relevant" windows
        for i, e in enumerate(self.episodes):
            for t, k in zip(*np.nonzero(e["rewards"] > 0)) if e["rewards"] is not None else []:
                self.events.setdefault(int(k), []).append((i, int(t)))
        self.rng = np.random.default_rng(seed)
        # Episode index -> memory-mapped frames (T, H, W, 3). Each open map holds a file descriptor, so only
        # the `open_episodes` most recently used stay open.
        self._frames = functools.lru_cache(open_episodes)(lambda i, ids=self.ids: mapped_frames(root, ids[i]))

    def _window(self, relevant: bool) -> tuple[int, int, int]:
        """(episode index, start, task). Uniform: over every valid window (task −1). Relevant: a window holding
        a reward event and the action that caused it: the task uniformly among the tasks with events (so rare
        rungs are not drowned out), then one of its events, then the start among the windows with t−1 and t."""
        if not relevant:
            u = int(self.rng.integers(self.offsets[-1]))  # a window index
            i = int(np.searchsorted(self.offsets, u, side="right")) - 1
            return i, u - int(self.offsets[i]), -1
        k = sorted(self.events)[self.rng.integers(len(self.events))]
        i, t = self.events[k][self.rng.integers(len(self.events[k]))]
        lo = max(0, t - self.seq_len + 1)
        hi = min(self.episodes[i]["T"] - self.seq_len, max(lo, t - 1))
        return i, int(self.rng.integers(lo, hi + 1)), k

    def sample(self, batch_size: int, relevant: float = 0.0) -> dict:
        """A batch of windows, CPU tensors: frames uint8 (B, T, H, W, 3); actions int64 (B, T, A), rewards float32
        (B, T, n_tasks), zeros where unlabeled, with has_actions / has_rewards bool (B,); task int64 (B,) (the
        event's task, −1 for uniform rows); relevant bool (B,); episode (index into .ids), start int64 (B,).
        relevant: the fraction of rows (the first ones) drawn from task-relevant windows; True = all."""
        n_rel, T = int(round(batch_size * float(relevant))), self.seq_len
        if n_rel and not self.events:
            raise ValueError(f"{self.root}: no reward events in split '{self.split}', so no relevant windows")
        rows = [self._window(b < n_rel) for b in range(batch_size)]
        out = {"frames": torch.from_numpy(np.stack([self._frames(i)[s:s + T] for i, s, _ in rows]))}  # (B, T, H, W, 3)
        for key, width, dtype in [("actions", len(self.action_components), np.int64),
                                  ("rewards", len(self.tasks), np.float32)]:
            labels = np.zeros((batch_size, T, width), dtype)  # (B, T, A) or (B, T, n_tasks)
            for b, (i, s, _) in enumerate(rows):
                if self.episodes[i][key] is not None:
                    labels[b] = self.episodes[i][key][s:s + T]
            out[key] = torch.from_numpy(labels)
            out["has_" + key] = torch.tensor([self.episodes[i][key] is not None for i, _, _ in rows])
        idx = lambda j: torch.tensor([r[j] for r in rows], dtype=torch.int64)  # (B,)
        return {**out, "task": idx(2), "relevant": torch.arange(batch_size) < n_rel, "episode": idx(0), "start": idx(1)}


def ensure_dataset(name_or_path: str) -> str:
    """The dataset folder for a stage's --data flag. A missing built-in dataset (diamond64, diamond32,
    smoke; as a name or data/<name>) is generated on the spot; a missing other path is an error."""
    bare_name = os.sep not in name_or_path and not os.path.exists(name_or_path)
    path = os.path.join("data", name_or_path) if bare_name else name_or_path
    name = os.path.basename(os.path.normpath(path))
    if os.path.exists(os.path.join(path, "meta.json")) or glob.glob(os.path.join(path, "*.npz")):
        if name in BUILTIN and os.path.exists(os.path.join(path, "meta.json")):
            want = PRESETS.get(BUILTIN[name], {}).get("episodes", Args.episodes)
            have = json.load(open(os.path.join(path, "meta.json"))).get("episodes")
            if have != want:  # e.g. a folder written before the preset grew
                print(f"!! {path} holds {have} episodes but the built-in '{name}' preset now writes {want}: "
                      f"figures will differ from the README's. Delete {path} to regenerate it.", flush=True)
        return path
    if name not in BUILTIN:
        raise FileNotFoundError(f"dataset {path} does not exist. Built-in datasets: {sorted(BUILTIN)} (`python "
                                f"data.py`); your own frames: `python data.py --from-frames DIR --out {path}`.")
    cmd = "python data.py" + ("" if BUILTIN[name] == "default" else f" --preset {BUILTIN[name]}")
    print(f"dataset {path} not found: generating the built-in '{name}' dataset now (`{cmd}`)", flush=True)
    generate(parse_args(Args, PRESETS, ["--preset", BUILTIN[name], "--out", path, "--no-assets"]))
    return path


def main(argv: list[str] | None = None) -> None:
    args = parse_args(Args, PRESETS, argv)
    print("args:", json.dumps(asdict(args)))
    seed_everything(args.seed)
    if args.bench:
        for size in (64, 32):
            print(f"environment {size}×{size}: {bench_env(size):,.0f} frames/s on one core (rendering included)")
        t0 = time.perf_counter()
        rollout(ContractorPolicy(args.seed), [episode_seed(args.seed, "bench", i) for i in range(16)],
                args.image_size, args.episode_len, keep_frames=False)
        print(f"contractors + environment {args.image_size}×{args.image_size}: "
              f"{16 * args.episode_len / (time.perf_counter() - t0):,.0f} frames/s")
    elif args.eval_random:
        for name, policy in [("random", RandomPolicy(args.seed)), ("contractor", ContractorPolicy(args.seed)),
                             ("expert (skill 1, full ambition)", ContractorPolicy(args.seed, skill=1.0, ambition=7))]:
            result = evaluate(policy, args.eval_episodes, args.seed, args.image_size, args.episode_len)
            print_rates(f"{name} policy", result)
    elif args.from_frames:
        if not args.out:
            raise SystemExit("--from-frames needs --out data/NAME (the folder to write the episodes to)")
        import_frames(args.from_frames, args.out, args.resize, args.fps, args.heldout)
    else:
        generate(args)


if __name__ == "__main__":
    main()
