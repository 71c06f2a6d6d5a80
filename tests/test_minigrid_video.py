"""Tests of examples/minigrid_video.py, the MiniGrid dynamic-obstacles dataset: the writer with a
tiny fake environment (no minigrid needed): frames, actions, one file per episode at termination,
the resize, meta.json; and one real render of two short episodes when minigrid is installed."""

import importlib.util
import json
import os
import sys
import types

import numpy as np
import pytest

import data
from common import parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "minigrid_video", os.path.join(ROOT, "examples", "minigrid_video.py"))
mv = importlib.util.module_from_spec(_spec)
sys.modules["minigrid_video"] = mv  # dataclasses look their module up there
_spec.loader.exec_module(mv)


class FakeEnv:
    """MiniGrid's surface as the writer uses it: reset(seed), step(a) -> (obs, reward,
    terminated, truncated, info), get_frame(highlight, tile_size) -> (6·tile, 6·tile, 3) uint8,
    grid.get(*front_pos), action_space.n. Episode k (k-th reset) terminates after lives[k] steps
    (reward 1, a goal), or never. Frame value = steps taken so far (so frames differ)."""

    def __init__(self, lives=(3, 5, 100)):
        self.lives, self.resets, self.steps = list(lives), 0, 0
        self.action_space = types.SimpleNamespace(n=3)
        self.front_pos = (0, 0)
        self.grid = types.SimpleNamespace(get=lambda x, y: None)  # nothing in front, ever
        self.taken = []  # every action passed to step

    def reset(self, seed=None):
        self.life = self.lives[min(self.resets, len(self.lives) - 1)]
        self.resets, self.steps = self.resets + 1, 0
        return None, {}

    def step(self, a):
        self.taken.append(int(a))
        self.steps += 1
        done = self.steps >= self.life
        return None, 1.0 if done else 0.0, done, False, {}

    def get_frame(self, highlight=True, tile_size=8):
        return np.full((6 * tile_size, 6 * tile_size, 3), self.steps % 256, np.uint8)


def args_for(tmp_path, **kw):
    argv = ["--out", str(tmp_path / "mg"), "--frames", "12", "--max-frames", "10",
            "--min-len", "1"]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return parse_args(mv.Args, {}, argv)


def test_episode_ends_at_termination_into_a_new_file(tmp_path):
    """Lives 3 then 5 steps: two files of 4 and 6 frames (the end frame included), no splice."""
    mv.write_dataset(args_for(tmp_path), lambda: FakeEnv((3, 5, 100)))
    root = str(tmp_path / "mg")
    eps = list(data.iter_episodes(root, "all"))
    assert [len(e["frames"]) for e in eps] == [4, 6, 10]
    # each file restarts at the reset frame (value 0) and counts up: no frames of another episode
    for e in eps:
        assert list(e["frames"][:, 0, 0, 0]) == list(range(len(e["frames"])))


def test_actions_rows_are_the_actions_taken_at_each_frame(tmp_path):
    """actions[t] is what step() received at frame t; the last row is chosen, not executed."""
    env = FakeEnv((3, 100))
    mv.write_dataset(args_for(tmp_path, frames=4), lambda: env)
    ep = next(data.iter_episodes(str(tmp_path / "mg"), "all"))
    assert ep["actions"].dtype == np.int64 and ep["actions"].shape == (4, 1)
    assert list(ep["actions"][:-1, 0]) == env.taken[:3]
    assert ep["rewards"] is None  # no tasks: no rewards array


def test_max_frames_cuts_an_endless_episode(tmp_path):
    mv.write_dataset(args_for(tmp_path, frames=20, max_frames=7), lambda: FakeEnv((100,)))
    eps = list(data.iter_episodes(str(tmp_path / "mg"), "all"))
    assert [len(e["frames"]) for e in eps] == [7, 7, 7]


def test_short_episodes_are_dropped_and_counted(tmp_path):
    meta = mv.write_dataset(args_for(tmp_path, min_len=5), lambda: FakeEnv((3, 5, 100)))
    assert meta["source"]["dropped_short"] == 1  # the 4-frame episode
    assert meta["episodes"] == 2


def test_resize_blends_tile_edges_to_32(tmp_path):
    """48×48 -> 32×32 with PIL's box filter: output column 0 averages input columns 0 and 1,
    output column 1 is input column 2 (1.5 input pixels per output pixel), so an edge at an odd
    input column is blended, not copied as nearest neighbour would."""
    frame = np.zeros((48, 48, 3), np.uint8)
    frame[:, 1] = 255
    out = mv.resize(frame, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert out[0, 0, 0] == 128 and out[0, 1, 0] == 0  # (0 + 255) / 2, then column 2 alone
    assert np.array_equal(mv.resize(frame, 48), frame)  # already the size: unchanged


def test_meta_follows_the_contract_and_not_the_builtin_generator(tmp_path):
    mv.write_dataset(args_for(tmp_path, frames=40), lambda: FakeEnv((3, 5, 100)))
    root = str(tmp_path / "mg")
    meta = data.load_meta(root)
    assert meta["generator"] != data.GENERATOR
    assert meta["action_components"] == [(mv.ACTION_NAME, 3)] and meta["tasks"] == []
    assert meta["image_size"] == 32 and meta["split"]["heldout"]  # a non-empty held-out split
    ids = meta["split"]["train"] + meta["split"]["heldout"]
    assert len(ids) == meta["episodes"] and not os.path.exists(root + ".partial")
    for i in ids:
        data.check_episode(os.path.join(root, i + ".npz"), meta)  # raises if off-contract
    assert data.simulate_future(root, ids[0], 1, []) is None  # built-in replays skip it


def test_refuses_to_overwrite_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "mg").mkdir()
    (tmp_path / "mg" / "mine.txt").write_text("x")
    with pytest.raises(FileExistsError):
        mv.write_dataset(args_for(tmp_path), lambda: FakeEnv())


def test_policy_turns_instead_of_walking_into_a_wall():
    rng = np.random.default_rng(0)
    probs = mv.action_probs(3)
    assert np.allclose(probs, [0.2, 0.2, 0.6])
    blocked = [mv.choose_action(rng, probs, True, 0.0) for _ in range(200)]
    free = [mv.choose_action(rng, probs, False, 0.0) for _ in range(200)]
    assert 2 not in blocked and free.count(2) > 80


def test_real_minigrid_two_short_episodes(tmp_path):
    """Two real episodes, rendered by MiniGrid: 32×32 frames, something moves every step."""
    pytest.importorskip("minigrid")
    argv = ["--out", str(tmp_path / "mg"), "--frames", "2", "--max-frames", "12",
            "--min-len", "1"]
    args = parse_args(mv.Args, {}, argv)
    env = mv.make_minigrid(args.env_id, args.max_frames)
    for i in range(2):
        env_seed, rng = mv.episode_seeds(0, i)
        ep = mv.play_episode(env, rng, env_seed, args)
        T = len(ep["frames"])
        assert 2 <= T <= 12 and ep["frames"].shape == (T, 32, 32, 3)
        assert ep["actions"].shape == (T, 1) and ep["actions"].max() < env.action_space.n
        assert (ep["frames"][1:] != ep["frames"][:-1]).any(axis=(1, 2, 3)).all()
    meta = mv.write_dataset(args)  # and the writer end to end on the real environment
    assert json.load(open(tmp_path / "mg" / "meta.json"))["source"]["env_id"] == args.env_id
    assert meta["action_components"] == [[mv.ACTION_NAME, 3]]
