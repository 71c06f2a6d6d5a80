"""Tests of data.py: the environment, the label indexing of the data contract (PITFALLS.md item 9),
the loader and its split hygiene, the bad-input errors, the players, and the image import."""

import json
import os
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data
from common import parse_args

WOOD_TASK = data.TASKS.index("collect_wood")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> str:
    """The smoke dataset (8 episodes × 64 frames, 32×32), generated once for this file."""
    root = str(tmp_path_factory.mktemp("data") / "smoke")
    data.generate(parse_args(data.Args, data.PRESETS, ["--preset", "smoke", "--out", root, "--no-assets"]))
    return root


def copy_of(smoke: str, tmp_path) -> str:
    root = str(tmp_path / "copy")
    shutil.copytree(smoke, root)
    return root


# ---------------------------------------------------------------- environment

def test_same_seed_same_episode_and_different_seeds_differ():
    seeds = [data.episode_seed(0, "eval", i) for i in range(3)]
    a = data.rollout(data.RandomPolicy(7), seeds, 32, 40)
    b = data.rollout(data.RandomPolicy(7), seeds, 32, 40)
    for k in ("frames", "actions", "rewards"):
        np.testing.assert_array_equal(a[k], b[k])
    c = data.rollout(data.RandomPolicy(7), [s + 1 for s in seeds], 32, 40)
    assert not np.array_equal(a["frames"][:, 0], c["frames"][:, 0])  # other worlds
    # The world's randomness (creature, regrowth) is part of the seed: same actions, other seed, other future.
    env1, env2 = data.Env(32), data.Env(32)
    env1.reset(1), env2.reset(1)
    for _ in range(30):
        f1, *_ = env1.step(np.zeros(4, np.int64))
        f2, *_ = env2.step(np.zeros(4, np.int64))
    np.testing.assert_array_equal(f1, f2)


def test_rendering_at_both_sizes_shows_the_same_state():
    """The 32×32 and 64×64 renderings are drawn natively, but decode to the same world and inventory."""
    out = {}
    for size in (32, 64):
        env = data.Env(size)
        env.reset(5)
        env.inv = [3, 2, 1, 0, 1, 1, 0]
        frame = env.render()
        assert frame.shape == (size, size, 3) and frame.dtype == np.uint8
        out[size] = data.decode_frames(frame[None])
        # The inventory strip is visible: changing a count changes the bottom tile row only.
        env.inv[0] = 1
        changed = np.nonzero((env.render() != frame).any(-1))[0]
        assert changed.min() >= size * 7 // 8, "inventory change should only touch the strip"
    np.testing.assert_array_equal(out[32]["app"], out[64]["app"])
    np.testing.assert_array_equal(out[32]["inv"][0], [3, 2, 1, 0, 1, 1, 0])
    np.testing.assert_array_equal(out[64]["inv"][0], [3, 2, 1, 0, 1, 1, 0])


def test_environment_speed_is_measured():
    fps = data.bench_env(64, steps=3000)
    print(f"\nenvironment 64×64: {fps:,.0f} frames/s on one core (rendering included)")
    assert fps > 0  # measured and printed, not asserted (CI machines vary); the docstring reports it


# ---------------------------------------------------------------- label indexing (PITFALLS.md item 9)

def hand_made_world(rng):
    """All grass; the agent at (3, 3) with one tree to its right; the creature walled in by water."""
    grid = np.full((data.ROWS, data.COLS), data.GRASS, np.uint8)
    grid[3, 4] = data.TREE
    grid[5, 0] = grid[6, 1] = data.WATER
    return grid, (3, 3), (6, 0)


# a_0 turns right (blocked by the tree), a_1..a_3 press `use` 3 times (tree hardness 3): the tree breaks
# during the step taken at frame 3, so the wood reward is r_4 — "received on entering frame 4".
HAND_ACTIONS = np.array([[4, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0],
                         [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], np.int64)  # (T=8, A)


def test_reward_follows_the_action_that_caused_it(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "_generate_world", hand_made_world)
    assert data.HARDNESS[data.TREE] == 3, "update HAND_ACTIONS if the tree hardness changes"
    policy = lambda frames, it=iter(HAND_ACTIONS): np.repeat(next(it)[None], len(frames), 0)
    ep = data.rollout(policy, seeds=[0], image_size=32, episode_len=8)
    frames, actions, rewards = ep["frames"][0], ep["actions"][0], ep["rewards"][0]  # (T, ...)
    np.testing.assert_array_equal(actions, HAND_ACTIONS)  # row t = action taken at frame t
    expected = np.zeros(8)
    expected[4] = 1  # the 3rd `use` is a_3; its reward arrives with frame 4
    np.testing.assert_array_equal(rewards[:, WOOD_TASK], expected)
    assert rewards[:, np.arange(len(data.TASKS)) != WOOD_TASK].sum() == 0
    inv = data.decode_frames(frames)["inv"][:, data.WOOD]  # (T,) wood shown in the inventory strip
    np.testing.assert_array_equal(inv, [0, 0, 0, 0, 1, 1, 1, 1])  # the frame we enter shows the wood
    # The same alignment after a round trip through the writer and the loader.
    root = str(tmp_path / "hand")
    os.makedirs(root)
    data.write_episode(root, "ep000000", frames, actions, rewards)
    data.write_meta(root, {"image_size": 32, "fps": 10, "action_components": data.ACTION_COMPONENTS,
                           "tasks": data.TASKS, "split": {"train": ["ep000000"], "heldout": []}})
    for seq_len in (8, 5):
        ds = data.SequenceDataset(root, "train", seq_len=seq_len, seed=0)
        for _ in range(5):
            b = ds.sample(2)
            for row in range(2):
                s = int(b["start"][row])
                win = torch.arange(s, s + seq_len)
                want = torch.from_numpy(expected[s:s + seq_len]).float()  # (seq_len,)
                torch.testing.assert_close(b["rewards"][row, :, WOOD_TASK], want)
                torch.testing.assert_close(b["actions"][row], torch.from_numpy(HAND_ACTIONS[win.numpy()]))
                assert torch.equal(b["frames"][row], torch.from_numpy(frames[s:s + seq_len]))


# ---------------------------------------------------------------- writer and loader

def test_dataset_files_and_split_hygiene(smoke):
    meta = data.load_meta(smoke)
    train, held = meta["split"]["train"], meta["split"]["heldout"]
    assert meta["episodes"] == 8 and len(held) == 1 and not set(train) & set(held)
    assert sorted(train + held) == sorted(f[:-4] for f in os.listdir(smoke) if f.endswith(".npz"))
    assert meta["action_components"] == data.ACTION_COMPONENTS and meta["tasks"] == data.TASKS
    assert os.path.exists(os.path.join(smoke, "episodes.png")) and os.path.exists(os.path.join(smoke, "episode.gif"))
    with np.load(os.path.join(smoke, train[0] + ".npz")) as z:
        assert z["frames"].dtype == np.uint8 and z["frames"].shape == (64, 32, 32, 3)
        assert z["actions"].dtype == np.int64 and z["actions"].shape == (64, 4)
        assert z["rewards"].dtype == np.float32 and z["rewards"].shape == (64, len(data.TASKS))
        assert (z["rewards"][0] == 0).all()  # nothing led into frame 0
    for split, ids in (("train", train), ("heldout", held)):
        ds = data.SequenceDataset(smoke, split, seq_len=16, seed=0, open_episodes=2)
        b = ds.sample(12)
        assert b["frames"].shape == (12, 16, 32, 32, 3) and b["frames"].dtype == torch.uint8
        assert b["actions"].shape == (12, 16, 4) and b["actions"].dtype == torch.int64
        assert b["rewards"].shape == (12, 16, len(data.TASKS)) and b["rewards"].dtype == torch.float32
        assert b["has_actions"].all() and b["has_rewards"].all() and (b["task"] == -1).all()
        assert {ds.ids[i] for i in b["episode"].tolist()} <= set(ids)  # windows only from this split
        assert ((b["start"] >= 0) & (b["start"] <= 64 - 16)).all()
        assert ds._frames.cache_info().currsize <= 2  # the LRU bound on open memory maps holds
    # Every frame of a window equals the file's frames at the same positions.
    ds = data.SequenceDataset(smoke, "train", seq_len=16, seed=3)
    b = ds.sample(4)
    for row in range(4):
        with np.load(os.path.join(smoke, ds.ids[int(b["episode"][row])] + ".npz")) as z:
            s = int(b["start"][row])
            assert torch.equal(b["frames"][row], torch.from_numpy(z["frames"][s:s + 16]))
    # The data stream depends on the seed only.
    b1 = data.SequenceDataset(smoke, "train", seq_len=16, seed=5).sample(6)
    b2 = data.SequenceDataset(smoke, "train", seq_len=16, seed=5).sample(6)
    assert torch.equal(b1["frames"], b2["frames"]) and torch.equal(b1["start"], b2["start"])
    episodes = list(data.iter_episodes(smoke, "heldout"))
    assert [e["id"] for e in episodes] == held and episodes[0]["frames"].shape == (64, 32, 32, 3)


def test_relevant_windows_contain_a_reward_and_its_action(smoke):
    ds = data.SequenceDataset(smoke, "train", seq_len=8, seed=0)
    b = ds.sample(32, relevant=True)
    assert b["relevant"].all()
    for row in range(32):
        k = int(b["task"][row])
        t = torch.nonzero(b["rewards"][row, :, k])[:, 0]
        assert len(t) and (t >= 1).any(), "the window holds the reward and the frame before it"
    mixed = ds.sample(10, relevant=0.5)
    assert mixed["relevant"].tolist() == [True] * 5 + [False] * 5
    assert (mixed["task"][:5] >= 0).all() and (mixed["task"][5:] == -1).all()
    # Task-balanced: more than one task shows up among the relevant windows.
    assert len(set(ds.sample(64, relevant=1.0)["task"].tolist())) > 1


# ---------------------------------------------------------------- bad inputs: clear errors naming the file

def rewrite(root, name, **arrays):
    path = os.path.join(root, name + ".npz")
    with np.load(path) as z:
        content = {k: z[k] for k in z.files}
    content.update(arrays)
    np.savez_compressed(path, **{k: v for k, v in content.items() if v is not None})
    return path


@pytest.mark.parametrize("problem", ["missing_key", "frames_dtype", "actions_dtype", "image_size",
                                     "action_range", "truncated", "rewards_shape"])
def test_bad_episode_errors_name_the_file(smoke, tmp_path, problem):
    root = copy_of(smoke, tmp_path)
    victim = data.load_meta(root)["split"]["train"][1]
    path = os.path.join(root, victim + ".npz")
    with np.load(path) as z:
        frames, actions = z["frames"], z["actions"]
    if problem == "missing_key":
        os.remove(path)
        np.savez_compressed(path, images=frames, actions=actions)
        match = "missing key 'frames'"
    elif problem == "frames_dtype":
        rewrite(root, victim, frames=frames.astype(np.float32))
        match = "uint8"
    elif problem == "actions_dtype":
        rewrite(root, victim, actions=actions.astype(np.int32))
        match = "int64"
    elif problem == "image_size":
        rewrite(root, victim, frames=frames[:, :16, :16])
        match = "image_size 32"
    elif problem == "action_range":
        bad = actions.copy()
        bad[3, 0] = 5  # move has classes 0…4
        rewrite(root, victim, actions=bad)
        match = "'move'"
    elif problem == "truncated":
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(size // 2)
        match = "truncated or corrupt"
    else:
        rewrite(root, victim, rewards=np.zeros((64, 3), np.float32))
        match = "rewards must be float32"
    with pytest.raises(ValueError, match=match) as err:
        data.SequenceDataset(root, "train", seq_len=8)
    assert path in str(err.value) and "python data.py" in str(err.value)


def test_missing_folder_empty_folder_and_missing_file(smoke, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.SequenceDataset(str(tmp_path / "nowhere"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no .npz episodes") as err:
        data.SequenceDataset(str(tmp_path / "empty"))
    assert str(tmp_path / "empty") in str(err.value)
    root = copy_of(smoke, tmp_path)
    gone = data.load_meta(root)["split"]["heldout"][0]
    os.remove(os.path.join(root, gone + ".npz"))
    with pytest.raises(FileNotFoundError, match=gone):
        data.SequenceDataset(root, "heldout", seq_len=8)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.ensure_dataset(str(tmp_path / "nowhere"))


def test_ensure_dataset_generates_a_missing_builtin_dataset(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    root = data.ensure_dataset("smoke")
    assert root == os.path.join("data", "smoke") and "generating" in capsys.readouterr().out
    assert data.load_meta(root)["episodes"] == 8 and not os.path.exists("assets")
    assert data.ensure_dataset("data/smoke") == "data/smoke"  # found: nothing to do
    assert "generating" not in capsys.readouterr().out


def test_meta_is_inferred_for_bring_your_own_episodes(smoke, tmp_path):
    root = copy_of(smoke, tmp_path)
    os.remove(os.path.join(root, "meta.json"))
    ds = data.SequenceDataset(root, "train", seq_len=8)
    meta = json.load(open(os.path.join(root, "meta.json")))
    assert meta["image_size"] == 32 and [n for _, n in meta["action_components"]][0] <= 5
    assert len(meta["tasks"]) == len(data.TASKS) and len(meta["split"]["heldout"]) == 1
    assert ds.sample(2)["actions"].shape == (2, 8, 4)


def test_simulate_future_replays_an_episode_and_refuses_other_data(smoke, tmp_path):
    """The environment as a world model (the dynamics stage's reference): with the recorded actions and the
    episode's own draws it reproduces the stored frames exactly; other actions change the agent; a dataset it
    cannot replay (bring-your-own ids, or frames the rules do not reproduce) gives None."""
    meta, eid, t, H = data.load_meta(smoke), "ep000001", 10, 12
    stored = data.load_frames(os.path.join(smoke, eid + ".npz"))  # (T, 32, 32, 3)
    recorded = np.load(os.path.join(smoke, eid + ".npz"))["actions"]
    same, fresh, other = data.simulate_future(smoke, eid, t, [recorded[t:t + H]] * 2 + [recorded[t:t + H].copy()])
    assert same.shape == (H, 32, 32, 3) and np.array_equal(same, stored[t + 1:t + 1 + H])
    assert np.array_equal(fresh, same)  # each plan starts from the same replayed state
    moved = recorded[t:t + H].copy()
    moved[:, 0] = moved[:, 0] % 4 + 1  # a move every step, never the recorded move class
    mine, theirs = data.simulate_future(smoke, eid, t, [moved, recorded[t:t + H]], rng_seed=123)  # fresh draws
    assert not np.array_equal(mine, theirs) and theirs.shape == same.shape
    root = copy_of(smoke, tmp_path)
    frames = stored.copy()
    frames[t] = 255 - frames[t]  # a frame the rules do not produce
    data.write_episode(root, eid, frames, recorded, np.load(os.path.join(root, eid + ".npz"))["rewards"])
    assert data.simulate_future(root, eid, t, [recorded[t:t + H]]) is None
    assert data.simulate_future(smoke, eid, t, [recorded[t:t + H]], meta={**meta, "generator": "someone else"}) is None
    assert data.simulate_future(smoke, "clip_7", t, [recorded[t:t + H]]) is None  # not an id `generate` writes

# ---------------------------------------------------------------- players in the real environment

def test_random_and_contractor_success_rates():
    t0 = time.time()
    rand = data.evaluate(data.RandomPolicy(0), episodes=40, seed=0, image_size=32)["success"]
    contractor = data.evaluate(data.ContractorPolicy(0), episodes=40, seed=0, image_size=32)["success"]
    print(f"\n{'task':<20s} random  contractor   ({time.time() - t0:.1f}s)")
    for k in data.TASKS:
        print(f"{k:<20s} {rand[k]['rate']:6.2f}  {contractor[k]['rate']:6.2f}")
    assert 0 < rand["collect_wood"]["rate"] < 1  # the bottom rung is reachable by chance, not always
    assert rand["collect_diamond"]["rate"] == 0 and rand["collect_iron"]["rate"] == 0
    for k in data.TASKS[:4]:
        assert contractor[k]["rate"] > rand[k]["rate"], k
    assert contractor["collect_diamond"]["rate"] < 0.25  # the top rung stays rare in the data
    r = rand["collect_wood"]
    assert r["stderr"] == pytest.approx(np.sqrt(r["rate"] * (1 - r["rate"]) / 40))


def test_an_expert_climbs_the_whole_ladder():
    """The ladder is solvable within an episode: the scripted player at full diligence and ambition
    gets the diamond — the data's contractors are suboptimal by choice, not by necessity."""
    result = data.evaluate(data.ContractorPolicy(0, skill=1.0, ambition=7), episodes=8, seed=1, image_size=32)
    assert result["success"]["collect_diamond"]["rate"] >= 0.75


def test_evaluate_accepts_a_plain_callable_and_checks_actions():
    noop = lambda frames: np.zeros((len(frames), 4), np.int64)
    assert data.evaluate(noop, episodes=2, image_size=32, episode_len=16)["return"]["mean"] == 0
    with pytest.raises(ValueError, match="policy returned actions"):
        data.evaluate(lambda frames: np.zeros((len(frames), 3), np.int64), episodes=1, image_size=32, episode_len=4)


# ---------------------------------------------------------------- bring your own frames

def test_from_frames_import_round_trip(tmp_path):
    src = tmp_path / "videos"
    ep = data.rollout(data.RandomPolicy(0), [1, 2], 32, 6)["frames"]  # (2, 6, 32, 32, 3)
    for e in range(2):
        os.makedirs(src / f"clip{e}")
        for t in range(6):
            Image.fromarray(ep[e, t]).save(src / f"clip{e}" / f"{t:04d}.png")
    out = str(tmp_path / "mine")
    data.main(["--from-frames", str(src), "--out", out])
    meta = data.load_meta(out)
    assert meta["image_size"] == 32 and meta["action_components"] == [] and meta["tasks"] == []
    got = {e["id"]: e for e in data.iter_episodes(out, "all")}
    for e in range(2):
        np.testing.assert_array_equal(got[f"ep00000{e}"]["frames"], ep[e])  # PNG is lossless
        assert got[f"ep00000{e}"]["actions"] is None and got[f"ep00000{e}"]["rewards"] is None
    b = data.SequenceDataset(out, "train", seq_len=4).sample(3)
    assert not b["has_actions"].any() and b["actions"].shape == (3, 4, 0) and b["rewards"].shape == (3, 4, 0)
    # Mixed sizes: a clear error naming the image, unless --resize.
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(src / "clip1" / "9999.png")
    with pytest.raises(ValueError, match="9999.png.*--resize"):
        data.import_frames(str(src), str(tmp_path / "mixed"))
    data.import_frames(str(src), str(tmp_path / "resized"), resize=16)
    assert next(data.iter_episodes(str(tmp_path / "resized"), "all"))["frames"].shape == (6, 16, 16, 3)
