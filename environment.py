"""Stage 0, the environment: a miniature of the paper's offline diamond challenge (§4.1, Table 7).

Dreamer 4 learns to collect diamonds offline, from 2.5K hours of Minecraft contractor video with
mouse and keyboard actions. This file is a laptop-sized stand-in in pure numpy: a 7×8 tile world
with an inventory strip, the milestone ladder of Table 7 as tasks, scripted "contractor" players
of mixed skill who play from pixels, and `evaluate`, which scores any policy in the real
environment. data.py records the contractors' episodes as the dataset.

Reads and writes nothing; prints.

Run:
    python environment.py --bench           # environment frames/s on one core
    python environment.py --eval-random     # success per task of random, contractor, expert
    python environment.py --preset smoke --eval-random   # the same in seconds (16 episodes)
    (`python data.py --bench` and `python data.py --eval-random` run the same code)

Paper map (no equations in this stage):
    §4.1 offline diamond challenge, VPT contractors        -> Env, ContractorPolicy
    Table 7 milestone ladder                                -> TASKS
    §4.1 evaluation: success rate per item over episodes    -> evaluate

The rules are in Env.step. Deviations from the paper and choices it leaves open:
docs/deviations.md (section `environment.py`).
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import asdict, dataclass

import numpy as np

from common import parse_args, seed_everything

ACTION_COMPONENTS = [("move", 5), ("use", 2), ("place", 2), ("craft", 2)]  # (name, classes); A = 4
# The rows of Table 7, each paying 1 on the step its milestone is first reached.
# deviation: 8 tasks, not 12 milestones; crafting is one button (docs/deviations.md)
TASKS = ["collect_wood", "place_table", "make_wood_pickaxe", "collect_stone",
         "make_stone_pickaxe", "collect_iron", "make_iron_pickaxe", "collect_diamond"]


@dataclass
class Args:
    preset: str = "default"  # default (64×64), cpu (32×32) or smoke (32×32, short, seconds)
    image_size: int = 64  # frame height = width in pixels, a multiple of 8
    episode_len: int = 256  # frames per episode, fixed (paper: 60 min episodes)
    seed: int = 0  # seed of the players and of the evaluation worlds
    bench: bool = False  # measure environment frames/s on one core
    eval_random: bool = False  # print success per task of random, contractor and expert players
    eval_episodes: int = 200  # episodes per player for --eval-random


PRESETS = {"smoke": dict(image_size=32, episode_len=64, eval_episodes=16),
           "cpu": dict(image_size=32)}


# ==== The world: tiles, inventory, rules =======================================================
ROWS, COLS = 7, 8  # map tiles; the image is 8 tiles tall: 7 map rows + 1 inventory row
GRASS, PATH, TREE, WATER, STONE, IRON, DIAMOND, TABLE = range(8)  # terrain ids
WALKABLE = (GRASS, PATH)  # PATH = floor left behind by mining
# Appearance ids: agent 8 + 4·on_path + facing, creature 16 + on_path,
# a tile being mined 18 + 4·MINABLE.index(tile) + crack stage − 1.
AGENT_APP, CREATURE_APP, CRACK_APP = 8, 16, 18
MOVES = [(0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)]  # move noop/up/down/left/right as (Δrow, Δcol)
INVENTORY = ["wood", "stone", "iron", "diamond", "wood_pickaxe", "stone_pickaxe", "iron_pickaxe"]
WOOD, STONE_I, IRON_I, DIAMOND_I, WOOD_PICK, STONE_PICK, IRON_PICK = range(7)  # inventory slots
MAX_COUNT, TABLE_COST = 4, 2  # a slot holds up to 4; a table costs 2 wood
MINE = {TREE: (None, WOOD, 0),  # tile: (tool needed, item, task)
        STONE: (WOOD_PICK, STONE_I, 3),
        IRON: (STONE_PICK, IRON_I, 5),
        DIAMOND: (IRON_PICK, DIAMOND_I, 7)}
MINABLE = [TREE, STONE, IRON, DIAMOND]
# not in paper: mining holds `use` for HARDNESS presses, as in Minecraft (docs/deviations.md)
HARDNESS = {TREE: 3, STONE: 4, IRON: 5, DIAMOND: 6}  # consecutive `use` presses to break a tile
CRACK_COLOUR = (235, 215, 160)  # the pale split on a tile being mined (see _sprites)
# The look of the frames: raised whenever a sprite changes, recorded in each dataset's meta.json so
# that a dataset drawn by older sprites is recognised (data.ensure_dataset). 2: the wide pale split
# of 2026-12-05 in place of a one-pixel dark crack. 3: material slots that light up as a whole
# (2026-12-06) in place of a two-pixel-wide count bar. 4: a material slot's count is the shade of
# the whole slot (2026-12-06), in place of a bar of quarters the tokenizer did not keep.
RENDER_VERSION = 4
RECIPES = [(WOOD_PICK, {WOOD: 1}, 2),  # (tool, cost, task)
           (STONE_PICK, {WOOD: 1, STONE_I: 1}, 4),
           (IRON_PICK, {WOOD: 1, IRON_I: 1}, 6)]
MIN_IMAGE_SIZE = 32  # smaller tiles (2–3 pixels) cannot tell every sprite apart
P_CREATURE_MOVE, P_STEAL, P_REGROW, MAX_TREES = 0.5, 0.1, 0.03, 10  # the stochastic parts


def _inside(cell) -> bool:
    """Is the (row, col) cell on the map?"""
    return 0 <= cell[0] < ROWS and 0 <= cell[1] < COLS


def _next(cell, move: int) -> tuple:
    """The neighbour of `cell` in direction `move` (a move class)."""
    return cell[0] + MOVES[move][0], cell[1] + MOVES[move][1]


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
        n_trees = int(rng.integers(7, 10))
        grid[tuple(free[rng.choice(len(free), size=n_trees, replace=False)].T)] = TREE
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


def _distance(a: tuple, b: tuple) -> int:
    """Manhattan distance between two cells."""
    return abs(a[0] - b[0]) + abs(a[1] - b[1])


class Env:
    """Gym-like, seeded: frame = env.reset(seed); frame, reward, done, info = env.step(action).
    frame uint8 (H, W, 3); action int64 (A,) = (move, use, place, craft); reward float32
    (n_tasks,), 1 where a milestone is first reached this episode; done on frame episode_len − 1.
    Same seed + same actions = same episode."""

    def __init__(self, image_size: int = 64, episode_len: int = 256):
        assert image_size % 8 == 0 and image_size >= MIN_IMAGE_SIZE, \
            f"image_size must be a multiple of 8 and at least {MIN_IMAGE_SIZE}, got {image_size}"
        self.image_size, self.episode_len, self.t = image_size, episode_len, None

    def reset(self, seed: int) -> np.ndarray:
        self.rng = np.random.default_rng(seed)  # all randomness of the episode: world and dynamics
        self.grid, self.agent, self.creature = _generate_world(self.rng)
        self.facing = int(self.rng.integers(4))  # 0 up, 1 down, 2 left, 3 right (= move class − 1)
        self.inv, self.achieved, self.t = [0] * len(INVENTORY), [False] * len(TASKS), 0
        self.progress, self.mining = 0, None  # consecutive `use` presses on the tile `mining`
        return self.render()

    def _free(self, cell) -> bool:
        """Walkable and nobody standing there."""
        if not _inside(cell) or self.grid[cell] not in WALKABLE:
            return False
        return cell != self.agent and cell != self.creature

    def step(self, action) -> tuple[np.ndarray, np.ndarray, bool, dict]:
        assert self.t is not None and self.t < self.episode_len - 1, \
            "episode is over: call reset(seed)"
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
                   if _distance((r, c), self.agent) >= 4]
            self.creature = far[self.rng.integers(len(far))] if far else self.creature
        elif use and _inside(faced) and self.grid[faced] in MINE:
            # Mining is "hold to break", as in Minecraft: HARDNESS consecutive presses on the same
            # tile with the right tool; anything else resets the progress. This keeps a random
            # policy off the ladder.
            tool, item, task = MINE[self.grid[faced]]
            if tool is None or self.inv[tool]:
                self.progress = self.progress + 1 if faced == self.mining else 1
                self.mining = faced
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
            for tool, cost, task in RECIPES:  # the first recipe not yet made that we can pay for
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
        if (_distance(self.creature, self.agent) == 1
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
        """An array blit of precomputed sprites, no drawing calls per frame (> 5,000 frames/s)."""
        s, bank = self.image_size // 8, _sprites(self.image_size)
        app = self.grid.copy()  # (ROWS, COLS) appearance id per tile
        app[self.agent] = AGENT_APP + 4 * (self.grid[self.agent] == PATH) + self.facing
        app[self.creature] = CREATURE_APP + (self.grid[self.creature] == PATH)
        if self.progress:  # a crack on the tile being mined, in 4 stages up to its hardness
            hardness = HARDNESS[self.grid[self.mining]]
            stage = -(-4 * self.progress // hardness)  # ⌈4·progress/hardness⌉
            app[self.mining] = CRACK_APP + 4 * MINABLE.index(self.grid[self.mining]) + stage - 1
        world = bank["tiles"][app]  # (7, 8, s, s, 3)
        world = world.transpose(0, 2, 1, 3, 4).reshape(ROWS * s, COLS * s, 3)  # (7s, 8s, 3)
        counts = np.array(self.inv + [0])  # the 8th slot is empty
        strip = bank["slots"][np.arange(8), counts]  # (8, s, s, 3)
        strip = strip.transpose(1, 0, 2, 3).reshape(s, COLS * s, 3)  # (s, 8s, 3)
        return np.concatenate([world, strip], axis=0)  # (H, W, 3)


# ==== Sprites, and reading the state back from pixels =========================================
@functools.lru_cache(maxsize=None)
def _sprites(image_size: int) -> dict:
    """Sprites drawn natively at one size s = image_size / 8 (shapes on the unit square, sampled
    at the pixel centres): tiles (34, s, s, 3) = 8 terrains, agent on grass/path × 4 facings,
    creature on grass/path, 4 minable terrains × 4 crack stages; slots (8, MAX_COUNT + 1, s, s, 3);
    the hashes decode_frames uses."""
    s = image_size // 8
    v, u = (np.mgrid[:s, :s] + 0.5) / s  # pixel centres in [0, 1]: v down, u right

    def disc(cu, cv, r):
        return (u - cu) ** 2 + (v - cv) ** 2 < r * r  # (s, s) mask of a disc

    def paint(base, *layers):
        img = np.full((s, s, 3), base, np.uint8)
        for mask, colour in layers:
            img[mask] = colour
        return img
    grass, path, rock = (76, 153, 60), (168, 140, 100), (125, 125, 130)
    spots = (disc(0.3, 0.3, 0.22) | disc(0.72, 0.7, 0.22))
    trunk = (abs(u - 0.5) < 0.2) & (v > 0.75)
    ripple = (abs(v - 0.4) < 0.1) & (abs(u - 0.45) < 0.3)
    table_legs = (v >= 0.45) & (abs(u - 0.5) < 0.25)
    ores = [(95, 95, 100), (220, 150, 90), (90, 235, 235)]  # stone, iron, diamond
    tiles = [paint(grass),
             paint(path),
             paint(grass, (disc(0.5, 0.4, 0.42), (24, 90, 36)), (trunk, (110, 70, 30))),  # tree
             paint((50, 100, 210), (ripple, (140, 180, 240))),  # water
             *(paint(rock, (spots, c)) for c in ores),  # stone, iron, diamond
             paint((100, 60, 30), (v < 0.45, (190, 140, 80)), (table_legs, grass))]  # table
    # The agent: a yellow body with a dark "nose" on its facing side (up, down, left, right),
    # on grass or path.
    tiles += [paint(g, (disc(0.5, 0.5, 0.4), (245, 205, 50)),
                    (disc(0.5 + 0.3 * du, 0.5 + 0.3 * dv, 0.16), (30,) * 3))
              for g in (grass, path) for dv, du in [(-1, 0), (1, 0), (0, -1), (0, 1)]]
    creature = abs(u - 0.5) + abs(v - 0.5) < 0.45
    tiles += [paint(g, (creature, (215, 40, 60))) for g in (grass, path)]
    # Mining progress, crack stages 1…4 of each minable terrain: a pale split grows down the
    # diagonal. Wide and bright so that a 32×32 frame tells the stages apart: at 4 pixels a tile
    # a tree's stages 2 and 3 (after its first and second press) cover 5 and 8 pixels; a one-pixel
    # dark crack made them differ in a single low-contrast pixel, which no tokenizer kept
    # (docs/log.md, "Weighting the pixels that change in the tokenizer").
    split = np.array(CRACK_COLOUR, np.uint8)
    tiles += [np.where(((np.abs(u + v - 1) < 0.3) & (v < stage / 4))[..., None],
                       split, tiles[terrain])
              for terrain in MINABLE for stage in range(1, 5)]
    # Inventory slots. A material slot shows its count as the shade of the whole slot: the full
    # colour for 1, and each further unit halves the distance to white. Every step changes 12 of
    # the slot's 16 pixels at 32×32, the first two (the wood a pickaxe and a table cost) by most.
    # A bar of quarters in full colour on a dim slot made 1 and 2 wood differ in 3 pixels, which
    # the tokenizer never kept: its pictures showed 1 wood where the frame showed 2; a dim shade
    # for 1 halved the first wood's change, and the dream drew it a third as often (docs/log.md,
    # "A count the tokenizer keeps"). Tools: a pickaxe icon, its head in its material's colour.
    colours, dark = [(150, 95, 40), (170, 170, 175), (230, 150, 95), (90, 235, 235)], (35, 35, 40)
    gap = max(1, s // 8) / s  # one dark gap column between slots
    slot_u = u < 1 - gap
    bar_u = (u > 0.5 / s) & (u < 1 - gap)
    handle = (abs(u - 0.45) < 0.2) & (v >= 0.3)
    slots = np.zeros((8, MAX_COUNT + 1, s, s, 3), np.uint8)
    for k, n in np.ndindex(8, MAX_COUNT + 1):
        if k < 4 and n:  # a material: the slot in the shade of count n
            shade = tuple(int(255 - (255 - c) / 2 ** (n - 1)) for c in colours[k])
            slots[k, n] = paint(dark, (slot_u, shade))
        elif 4 <= k < 7 and n:  # a tool
            head = bar_u & (v < 0.3)
            slots[k, n] = paint(dark, (head, colours[k - 4]), (handle, (200, 170, 120)))
        else:
            slots[k, n] = paint(dark)
    tiles = np.stack(tiles)  # (34, s, s, 3)
    # Decoding (for the pixel-reading contractor): a random linear hash of every tile's pixels.
    weights = np.random.default_rng(12345).integers(1, 1 << 20, size=s * s * 3)
    tile_hash = tiles.reshape(len(tiles), -1).astype(np.int64) @ weights  # (34,)
    slot_hash = slots.reshape(8, MAX_COUNT + 1, -1).astype(np.int64) @ weights  # (8, 5)
    assert len(set(tile_hash.tolist())) == len(tiles), "sprites must be distinguishable"
    return {"tiles": tiles, "slots": slots, "weights": weights,
            "tile_hash": tile_hash, "slot_hash": slot_hash}


def decode_frames(frames: np.ndarray) -> dict:
    """Read the state back from rendered frames (B, H, W, 3): the contractors play from pixels, as
    the human VPT contractors did. Returns appearance ids (B, ROWS, COLS) and inventory (B, 7)."""
    B, H, W, _ = frames.shape
    s, bank = H // 8, _sprites(H)
    cells = frames.reshape(B, 8, s, 8, s, 3).transpose(0, 1, 3, 2, 4, 5)  # (B, 8, 8, s, s, 3)
    cells = cells.reshape(B, 64, -1)  # (B, 64, s·s·3)
    h = cells.astype(np.int64) @ bank["weights"]  # (B, 64) one hash per tile
    tile_eq = h[:, :56, None] == bank["tile_hash"]  # (B, 56, 34): 7×8 map tiles vs appearances
    slot_eq = h[:, 56:63, None] == bank["slot_hash"][:7]  # (B, 7, 5): inventory slots vs counts
    if not (tile_eq.any(-1).all() and slot_eq.any(-1).all()):
        raise ValueError("decode_frames: a tile does not match any sprite; "
                         "was this frame rendered by Env?")
    return {"app": tile_eq.argmax(-1).reshape(B, ROWS, COLS), "inv": slot_eq.argmax(-1)}


def read_frames(frames) -> dict:
    """The state of frames (B, H_px, W_px, 3) with values in 0…255 (any dtype), read as the
    nearest sprite (squared pixel distance) per map tile and per inventory slot. Returns app
    (B, ROWS, COLS) appearance ids and inv (B, 7) counts, as decode_frames (which needs the exact
    pixels): for generated and reconstructed frames."""
    x = np.asarray(frames, np.float64)
    B, H, W, _ = x.shape
    s, bank = H // 8, _sprites(H)
    cells = x.reshape(B, 8, s, 8, s, 3).transpose(0, 1, 3, 2, 4, 5)  # (B, 8, 8, s, s, 3)
    cells = cells.reshape(B, 64, -1)  # (B, 64, s·s·3)
    tiles = bank["tiles"].reshape(len(bank["tiles"]), -1).astype(np.float64)  # (34, s·s·3)
    slots = bank["slots"][:7].reshape(7, MAX_COUNT + 1, -1).astype(np.float64)
    # ‖x − t‖² = ‖x‖² − 2·x·t + ‖t‖²; ‖x‖² is the same for every sprite, so it is left out
    # (a product, not a (B, 56, 34, s·s·3) difference: that is gigabytes at 64 × 64)
    d_tile = (tiles ** 2).sum(-1) - 2 * cells[:, :56] @ tiles.T  # (B, 56, 34)
    cross = np.einsum("bkp,knp->bkn", cells[:, 56:63], slots)  # (B, 7, 5) slot · count sprite
    d_slot = (slots ** 2).sum(-1) - 2 * cross  # (B, 7, 5)
    return {"app": d_tile.argmin(-1).reshape(B, ROWS, COLS),
            "inv": d_slot.argmin(-1)}


# ==== Players (random; contractors of mixed skill) and rollouts in the real environment =======
class RandomPolicy:
    """Uniform over the classes of every action component (the paper's random baseline)."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def act(self, frames: np.ndarray) -> np.ndarray:
        columns = [self.rng.integers(n, size=len(frames)) for _, n in ACTION_COMPONENTS]
        return np.stack(columns, 1)  # (B, A)


class ContractorPolicy:
    """A scripted player: reads the frame, finds the next rung of the ladder, walks there by BFS,
    but like a hired human only partly diligently. Each episode draws `skill` (chance of following
    the script, else a wandering excursion of `sticky` length), `ambition` (the highest task it
    bothers with: most stop early, which keeps the diamond rare), `hoard` (wood gathered before
    building), `mash` (stray button presses), `scares` (chases the creature off) and `still`
    (chance of pressing a button alone when it already faces the tile, instead of holding the
    direction key with it: both mine, and a world model must see both). skill=1, ambition=7
    (fixed for all players) is an expert: what the ladder allows."""

    AMBITION = [.05, .1, .15, .15, .15, .15, .15, .1]  # P(highest task it bothers with)

    def __init__(self, seed: int = 0, skill: float | None = None, ambition: int | None = None):
        self.rng, self.skill, self.ambition = np.random.default_rng(seed), skill, ambition

    def reset(self, n_envs: int) -> None:
        r = self.rng
        self.profiles = []
        for _ in range(n_envs):  # the draws in this order: skill, ambition, hoard, sticky, …
            skill = self.skill if self.skill is not None else r.uniform(0.3, 0.95)
            ambition = (self.ambition if self.ambition is not None
                        else int(r.choice(len(TASKS), p=self.AMBITION)))
            self.profiles.append({"skill": skill, "ambition": ambition,
                                  "hoard": int(r.integers(2, 5)), "sticky": r.uniform(0.5, 0.9),
                                  "mash": r.uniform(0, 0.1), "scares": bool(r.random() < 0.5),
                                  "still": r.uniform(0, 1), "excursion": 0,
                                  "last": np.zeros(len(ACTION_COMPONENTS), np.int64)})

    def act(self, frames: np.ndarray) -> np.ndarray:
        state = decode_frames(frames)
        return np.stack([self._act(p, app, inv)
                         for p, app, inv in zip(self.profiles, state["app"], state["inv"])])

    def _explore(self) -> np.ndarray:
        return np.array([self.rng.integers(5), *(self.rng.random(3) < 0.1)], np.int64)

    def _act(self, p: dict, app: np.ndarray, inv: np.ndarray) -> np.ndarray:
        if p["excursion"] > 0:  # wandering off: keep walking the same way, sometimes turn
            p["excursion"] -= 1
            p["last"] = self._explore() if self.rng.random() > p["sticky"] else p["last"]
            return p["last"]
        if self.rng.random() > p["skill"]:
            p["excursion"] = int(self.rng.geometric(1 - p["sticky"])) - 1
            p["last"] = self._explore()
            return p["last"]
        action = self._script(p, app, inv)
        if action is None:  # nothing left to do (or stuck): wander
            action = self._explore()
        if self.rng.random() < p["mash"]:
            action[1 + self.rng.integers(3)] = 1
        return action

    def _script(self, p: dict, app: np.ndarray, inv: np.ndarray):
        """The next sensible action toward the next rung of the ladder, or None."""
        agent = tuple(int(v) for v in np.argwhere((app >= AGENT_APP) & (app < CREATURE_APP))[0])
        on_path, facing = divmod(int(app[agent]) - AGENT_APP, 4)
        creature = tuple(int(v) for v in np.argwhere((app >= CREATURE_APP) & (app < CRACK_APP))[0])
        # The terrain: under the two figures, and under cracks.
        grid, cracked = app.copy(), app >= CRACK_APP
        grid[cracked] = np.array(MINABLE)[(app[cracked] - CRACK_APP) // 4]
        grid[agent] = PATH if on_path else GRASS
        grid[creature] = PATH if app[creature] == CREATURE_APP + 1 else GRASS
        # The next task on the ladder: the first rung not done yet, read off the world and the
        # inventory, as (done?, task).
        ladder = [((grid == TABLE).any(), 1),
                  (inv[WOOD_PICK], 2),
                  (inv[STONE_PICK], 4 if inv[STONE_I] else 3),
                  (inv[IRON_PICK], 6 if inv[IRON_I] else 5),
                  (inv[DIAMOND_I], 7)]
        task = next((k for done, k in ladder if not done), len(TASKS))
        if task > p["ambition"]:  # done with what it meant to do: potter about, gather some wood
            return None if inv[WOOD] else self._walk(p, agent, facing, grid, inv, creature, TREE)
        if p["scares"] and _distance(creature, agent) == 1:
            return self._face_and(p, agent, facing, creature, button=1)
        if task == 1 and inv[WOOD] >= min(max(TABLE_COST, p["hoard"]), MAX_COUNT):
            faced = _next(agent, facing + 1)
            if _inside(faced) and grid[faced] in WALKABLE and faced != creature:
                return np.array([0, 0, 1, 0], np.int64)  # place the table on the faced tile
            return None  # turn by wandering a step, try again next frame
        # Mine the rung's material, or craft its pickaxe at a table (each pickaxe costs one wood:
        # get some first).
        tile = {1: TREE, 3: STONE, 5: IRON, 7: DIAMOND}.get(task, TABLE if inv[WOOD] else TREE)
        return self._walk(p, agent, facing, grid, inv, creature, tile,
                          button=3 if tile == TABLE else 1)

    def _face_and(self, p: dict, agent, facing: int, cell, button=0) -> np.ndarray:
        """Move toward an adjacent cell (a blocked move only turns) and press `button`
        (1 use, 3 craft). Already facing it, a player presses the button alone with chance
        p["still"] (a human mining in Minecraft keeps still; the direction key held with it does
        the same here, as the blocked move only turns)."""
        move = 1 + MOVES[1:].index((cell[0] - agent[0], cell[1] - agent[1]))
        if button and move == facing + 1 and self.rng.random() < p["still"]:
            move = 0
        return np.array([move, button == 1, button == 2, button == 3], np.int64)

    def _walk(self, p: dict, agent, facing: int, grid, inv, creature, tile, button=1):
        """The first action of a shortest path (BFS through walkable tiles and tiles we can mine
        on the way) next to a `tile`: a step, or turn + use to clear an obstacle, or at the end:
        face it and press `button`."""
        minable = {TREE} | {t for t, (tool, _, _) in MINE.items() if tool is not None and inv[tool]}
        passable = np.isin(grid, list(WALKABLE) + sorted(minable))
        passable[creature] = False  # it blocks the way (or gets scared off, see `scares`)
        parent = _bfs(passable, agent)
        for cell in parent:  # BFS order: the nearest cell first (obstacles on the way get mined)
            neighbours = (_next(cell, m) for m in range(1, 5))
            goal = next((n for n in neighbours if _inside(n) and grid[n] == tile), None)
            if goal is None:
                continue
            if cell == agent:
                return self._face_and(p, agent, facing, goal, button)
            while parent[cell] != agent:  # walk back to the first step of the path
                cell = parent[cell]
            button = 1 if grid[cell] not in WALKABLE else 0
            return self._face_and(p, agent, facing, cell, button=button)
        return None


def episode_seed(seed: int, stream: str, i: int) -> int:
    """Independent world seeds per purpose: dataset worlds and evaluation worlds never coincide."""
    stream_id = ["data", "eval", "bench", "players"].index(stream)
    return int(np.random.SeedSequence([seed, stream_id, i]).generate_state(1)[0])


def rollout(policy, seeds: list[int], image_size: int = 64, episode_len: int = 256,
            keep_frames: bool = True) -> dict:
    """Play B = len(seeds) episodes in lockstep, recorded in the data contract's indexing (see
    data.py). policy: an object with act(frames (B, H, W, 3) uint8) -> (B, A) int64 (and
    optionally reset(n_envs)), or a callable frames -> actions. Returns frames (B, T, H, W, 3)
    (None unless keep_frames), actions (B, T, A), rewards (B, T, n_tasks)."""
    B, T, A = len(seeds), episode_len, len(ACTION_COMPONENTS)
    envs = [Env(image_size, episode_len) for _ in seeds]
    frame = np.stack([env.reset(s) for env, s in zip(envs, seeds)])  # (B, H, W, 3)
    act = policy.act if hasattr(policy, "act") else policy
    if hasattr(policy, "reset"):
        policy.reset(B)
    frames = np.empty((B, T, *frame.shape[1:]), np.uint8) if keep_frames else None
    actions = np.zeros((B, T, A), np.int64)
    rewards = np.zeros((B, T, len(TASKS)), np.float32)  # rewards[:, 0] = 0
    classes = np.array([n for _, n in ACTION_COMPONENTS])
    for t in range(T):
        if keep_frames:
            frames[:, t] = frame
        a = np.asarray(act(frame))  # (B, A): a_t, taken at frame t
        if (a.shape != (B, A) or not np.issubdtype(a.dtype, np.integer)
                or (a < 0).any() or (a >= classes).any()):
            raise ValueError(f"policy returned actions of shape {a.shape} dtype {a.dtype}; "
                             f"expected ({B}, {A}) integers with component ranges "
                             f"{ACTION_COMPONENTS}")
        actions[:, t] = a
        if t == T - 1:
            break  # a_{T-1} is recorded but never executed: the episode ends on frame T−1
        for i, env in enumerate(envs):
            frame[i], rewards[i, t + 1], _, _ = env.step(a[i])  # r_{t+1}: reward on entering t+1
    return {"frames": frames, "actions": actions, "rewards": rewards}


# ==== Scoring a policy ==========================================================================
def success_rates(rewards: np.ndarray) -> dict:
    """rewards (E, T, n_tasks) -> {task: {"rate", "stderr", "hits"}}: share of episodes reaching
    it, stderr √(p(1 − p)/E), and the outcome of each episode (0/1, in world order: the same
    worlds for every policy, so two policies can be compared world by world)."""
    hit = rewards.max(1) > 0  # (E, n_tasks)
    p, n = hit.mean(0), len(hit)
    return {k: {"rate": float(p[j]), "stderr": float(np.sqrt(p[j] * (1 - p[j]) / n)),
                "hits": hit[:, j].astype(int).tolist()}
            for j, k in enumerate(TASKS)}


def evaluate(policy, episodes: int = 100, seed: int = 0, image_size: int = 64,
             episode_len: int = 256, batch: int = 50) -> dict:
    """Score any policy in the real environment, on evaluation worlds no dataset contains, `batch`
    episodes in lockstep. Returns {"success": {task: {"rate", "stderr"}},
    "return": {"mean", "stderr"}, "episodes": n}."""
    chunks = [range(start, min(start + batch, episodes)) for start in range(0, episodes, batch)]
    rewards = np.concatenate([rollout(policy, [episode_seed(seed, "eval", i) for i in chunk],
                                      image_size, episode_len, keep_frames=False)["rewards"]
                              for chunk in chunks])  # (episodes, T, n_tasks)
    ret = rewards.sum((1, 2))  # (episodes,) number of milestones reached
    return {"success": success_rates(rewards), "episodes": episodes,
            "return": {"mean": float(ret.mean()), "stderr": float(ret.std() / np.sqrt(len(ret)))}}


def print_rates(title: str, result: dict) -> None:
    print(f"{title} ({result['episodes']} episodes; "
          f"milestones/episode {result['return']['mean']:.2f}):")
    for k, r in result["success"].items():
        print(f"  {k:<20s} {100 * r['rate']:5.1f} % ± {100 * r['stderr']:.1f}")


# ==== Command line: speed and baseline success rates ============================================
def bench_env(image_size: int = 64, steps: int = 20000) -> float:
    """Environment frames/s on one core, rendering included, random actions."""
    env = Env(image_size, episode_len=10 ** 9)
    acts = RandomPolicy(0).act(np.zeros((steps, 1)))  # (steps, A)
    env.reset(episode_seed(0, "bench", 0))
    t0 = time.perf_counter()
    for a in acts:
        env.step(a)
    return steps / (time.perf_counter() - t0)


def run_bench(image_size: int, episode_len: int, seed: int) -> None:
    """Print the environment's speed alone, then with 16 contractors playing (`--bench`)."""
    for size in (64, 32):
        print(f"environment {size}×{size}: {bench_env(size):,.0f} frames/s on one core "
              f"(rendering included)")
    t0 = time.perf_counter()
    rollout(ContractorPolicy(seed), [episode_seed(seed, "bench", i) for i in range(16)],
            image_size, episode_len, keep_frames=False)
    print(f"contractors + environment {image_size}×{image_size}: "
          f"{16 * episode_len / (time.perf_counter() - t0):,.0f} frames/s")


def run_eval_random(episodes: int, seed: int, image_size: int, episode_len: int) -> None:
    """Print success per task of the random, contractor and expert players (`--eval-random`)."""
    players = [("random", RandomPolicy(seed)),
               ("contractor", ContractorPolicy(seed)),
               ("expert (skill 1, full ambition)", ContractorPolicy(seed, skill=1.0, ambition=7))]
    for name, policy in players:
        result = evaluate(policy, episodes, seed, image_size, episode_len)
        print_rates(f"{name} policy", result)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(Args, PRESETS, argv)
    print("args:", json.dumps(asdict(args)))
    seed_everything(args.seed)
    if args.bench:
        run_bench(args.image_size, args.episode_len, args.seed)
    elif args.eval_random:
        run_eval_random(args.eval_episodes, args.seed, args.image_size, args.episode_len)
    else:
        raise SystemExit("python environment.py: choose --bench or --eval-random (see --help)")


if __name__ == "__main__":
    main()
