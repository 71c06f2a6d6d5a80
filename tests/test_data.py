"""Tests of data.py: the label indexing of the data contract (hand-written specifications), the
writer and the loader and its split hygiene, the bad-input errors, the replay of an episode
(simulate_future) and the image import. The environment itself: tests/test_environment.py."""

import contextlib
import io
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import data
import environment
from common import parse_args

WOOD_TASK = environment.TASKS.index("collect_wood")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> str:
    """The smoke dataset (8 episodes × 64 frames, 32×32), generated once for this file."""
    root = str(tmp_path_factory.mktemp("data") / "smoke")
    argv = ["--preset", "smoke", "--out", root, "--no-assets"]
    data.generate(parse_args(data.Args, data.PRESETS, argv))
    return root


def copy_of(smoke: str, tmp_path) -> str:
    root = str(tmp_path / "copy")
    shutil.copytree(smoke, root)
    return root


# ---------------------------------------------------------------- the data contract's indexing
# A hand-made episode pins which frame an action and a reward belong to:
#   frame_0 --a_0--> frame_1, r_1 --a_1--> frame_2, r_2 --a_2--> …

def hand_made_world(rng):
    """All grass; the agent at (3, 3), a tree to its right; the creature walled in by water."""
    grid = np.full((environment.ROWS, environment.COLS), environment.GRASS, np.uint8)
    grid[3, 4] = environment.TREE
    grid[5, 0] = grid[6, 1] = environment.WATER
    return grid, (3, 3), (6, 0)


# a_0 turns right (blocked by the tree), a_1..a_3 press `use` 3 times (tree hardness 3): the tree
# breaks during the step taken at frame 3, so the wood reward is r_4 — "received on entering
# frame 4".
HAND_ACTIONS = np.array([[4, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0],
                         [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
                        np.int64)  # (T=8, A)
HAND_REWARDS = np.zeros((8, len(environment.TASKS)), np.float32)  # (T, n_tasks)
HAND_REWARDS[4, WOOD_TASK] = 1  # the 3rd `use` is a_3; its reward arrives with frame 4
HAND_WOOD = [0, 0, 0, 0, 1, 1, 1, 1]  # (T,) wood in the inventory strip: the frame entered shows it


class HandPlayer:
    """Plays HAND_ACTIONS, one row per frame."""

    def __init__(self):
        self.t = 0

    def act(self, frames: np.ndarray) -> np.ndarray:
        self.t += 1
        return np.repeat(HAND_ACTIONS[self.t - 1][None], len(frames), 0)  # (B, A)


@pytest.fixture
def hand_episode(monkeypatch) -> dict:
    """The hand-made episode as recorded by environment.rollout: frames, actions, rewards (T, …)."""
    monkeypatch.setattr(environment, "_generate_world", hand_made_world)
    assert environment.HARDNESS[environment.TREE] == 3, "update HAND_ACTIONS: tree hardness changed"
    ep = environment.rollout(HandPlayer(), seeds=[0], image_size=32, episode_len=8)
    return {k: v[0] for k, v in ep.items()}


def test_action_row_t_is_the_action_taken_at_frame_t(hand_episode):
    np.testing.assert_array_equal(hand_episode["actions"], HAND_ACTIONS)


def test_reward_arrives_with_the_frame_the_action_leads_to(hand_episode):
    """The wood is mined by a_3 (taken at frame 3), so r_4 pays it: row t = reward on entering
    frame t. A reward on row 3 means the rows were shifted to the action's frame."""
    got = hand_episode["rewards"]
    np.testing.assert_array_equal(got, HAND_REWARDS,
                                  err_msg=f"wood reward on rows {np.nonzero(got)[0]}, expected [4]")


def test_the_entered_frame_shows_the_new_wood(hand_episode):
    wood = environment.decode_frames(hand_episode["frames"])["inv"][:, environment.WOOD]  # (T,)
    np.testing.assert_array_equal(wood, HAND_WOOD)


@pytest.fixture
def hand_dataset(hand_episode, tmp_path) -> str:
    """The hand-made episode written to disk as a one-episode dataset."""
    root = str(tmp_path / "hand")
    os.makedirs(root)
    ep = hand_episode
    data.write_episode(root, "ep000000", ep["frames"], ep["actions"], ep["rewards"])
    data.write_meta(root, {"image_size": 32, "fps": 10,
                           "action_components": environment.ACTION_COMPONENTS,
                           "tasks": environment.TASKS,
                           "split": {"train": ["ep000000"], "heldout": []}})
    return root


def loaded_windows(root: str, seq_len: int):
    """(start, window) pairs from 5 batches of 2 rows: window = that row's frames, actions,
    rewards as numpy arrays."""
    ds = data.SequenceDataset(root, "train", seq_len=seq_len, seed=0)
    for _ in range(5):
        b = ds.sample(2)
        for row in range(2):
            yield int(b["start"][row]), {k: b[k][row].numpy()
                                         for k in ("frames", "actions", "rewards")}


@pytest.mark.parametrize("seq_len", [8, 5])
def test_loader_keeps_rewards_on_the_frame_they_enter(hand_dataset, seq_len):
    for s, win in loaded_windows(hand_dataset, seq_len):
        np.testing.assert_array_equal(win["rewards"], HAND_REWARDS[s:s + seq_len])


@pytest.mark.parametrize("seq_len", [8, 5])
def test_loader_keeps_actions_on_the_frame_they_are_taken_at(hand_dataset, seq_len):
    for s, win in loaded_windows(hand_dataset, seq_len):
        np.testing.assert_array_equal(win["actions"], HAND_ACTIONS[s:s + seq_len])


@pytest.mark.parametrize("seq_len", [8, 5])
def test_loader_windows_show_the_frames_of_their_positions(hand_dataset, hand_episode, seq_len):
    for s, win in loaded_windows(hand_dataset, seq_len):
        np.testing.assert_array_equal(win["frames"], hand_episode["frames"][s:s + seq_len])


def test_reward_row_0_is_zero(smoke):
    """Nothing led into frame 0."""
    for e in data.iter_episodes(smoke, "all"):
        assert (e["rewards"][0] == 0).all(), e["id"]


# ---------------------------------------------------------------- writer and loader

def test_split_holds_out_the_last_sorted_episodes():
    ids = [f"ep{i:06d}" for i in range(10, 0, -1)]
    split = data.split_ids(ids, 0.25)
    assert split == {"train": sorted(ids)[:7], "heldout": sorted(ids)[7:]}  # ⌈0.25·10⌉ = 3


def test_split_keeps_one_training_episode():
    assert data.split_ids(["a", "b"], 0.9) == {"train": ["a"], "heldout": ["b"]}


def test_train_and_heldout_are_disjoint(smoke):
    meta = data.load_meta(smoke)
    train, held = meta["split"]["train"], meta["split"]["heldout"]
    assert meta["episodes"] == 8 and len(held) == 1 and not set(train) & set(held)


def test_split_covers_every_episode_file(smoke):
    meta = data.load_meta(smoke)
    files = sorted(f[:-4] for f in os.listdir(smoke) if f.endswith(".npz"))
    assert sorted(meta["split"]["train"] + meta["split"]["heldout"]) == files


def test_meta_declares_the_environment_actions_and_tasks(smoke):
    meta = data.load_meta(smoke)
    assert meta["action_components"] == environment.ACTION_COMPONENTS
    assert meta["tasks"] == environment.TASKS


def test_generate_draws_the_pictures(smoke):
    assert os.path.exists(os.path.join(smoke, "episodes.png"))
    assert os.path.exists(os.path.join(smoke, "episode.gif"))


@pytest.mark.parametrize("key,dtype,shape", [("frames", np.uint8, (64, 32, 32, 3)),
                                             ("actions", np.int64, (64, 4)),
                                             ("rewards", np.float32, (64, 8))])
def test_episode_file_arrays_follow_the_contract(smoke, key, dtype, shape):
    first = data.load_meta(smoke)["split"]["train"][0]
    with np.load(os.path.join(smoke, first + ".npz")) as z:
        assert (z[key].dtype, z[key].shape) == (dtype, shape)


@pytest.mark.parametrize("key,dtype,shape", [("frames", torch.uint8, (12, 16, 32, 32, 3)),
                                             ("actions", torch.int64, (12, 16, 4)),
                                             ("rewards", torch.float32, (12, 16, 8))])
def test_batch_tensors_have_contract_dtypes_and_shapes(smoke, key, dtype, shape):
    b = data.SequenceDataset(smoke, "train", seq_len=16, seed=0).sample(12)
    assert (b[key].dtype, tuple(b[key].shape)) == (dtype, shape)


def test_uniform_windows_are_labelled_and_have_no_task(smoke):
    b = data.SequenceDataset(smoke, "train", seq_len=16, seed=0).sample(12)
    assert b["has_actions"].all() and b["has_rewards"].all() and (b["task"] == -1).all()


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_windows_come_only_from_their_split(smoke, split):
    ds = data.SequenceDataset(smoke, split, seq_len=16, seed=0)
    b = ds.sample(12)
    assert {ds.ids[i] for i in b["episode"].tolist()} <= set(data.load_meta(smoke)["split"][split])


def test_window_starts_fit_inside_the_episode(smoke):
    b = data.SequenceDataset(smoke, "train", seq_len=16, seed=0).sample(32)
    assert ((b["start"] >= 0) & (b["start"] <= 64 - 16)).all()


def test_open_memory_maps_stay_within_the_bound(smoke):
    ds = data.SequenceDataset(smoke, "train", seq_len=16, seed=0, open_episodes=2)
    ds.sample(12)
    assert ds._frames.cache_info().currsize <= 2


def test_window_frames_equal_the_file_frames(smoke):
    ds = data.SequenceDataset(smoke, "train", seq_len=16, seed=3)
    b = ds.sample(4)
    for row in range(4):
        with np.load(os.path.join(smoke, ds.ids[int(b["episode"][row])] + ".npz")) as z:
            s = int(b["start"][row])
            assert torch.equal(b["frames"][row], torch.from_numpy(z["frames"][s:s + 16]))


def test_the_data_stream_depends_on_the_seed_only(smoke):
    b1 = data.SequenceDataset(smoke, "train", seq_len=16, seed=5).sample(6)
    b2 = data.SequenceDataset(smoke, "train", seq_len=16, seed=5).sample(6)
    assert torch.equal(b1["frames"], b2["frames"]) and torch.equal(b1["start"], b2["start"])


def test_iter_episodes_yields_whole_episodes_of_the_split(smoke):
    held = data.load_meta(smoke)["split"]["heldout"]
    episodes = list(data.iter_episodes(smoke, "heldout"))
    assert [e["id"] for e in episodes] == held
    assert episodes[0]["frames"].shape == (64, 32, 32, 3)


# ---------------------------------------------------------------- task-relevant windows (§3.3)

def test_relevant_windows_hold_a_reward_and_the_frame_before_it(smoke):
    b = data.SequenceDataset(smoke, "train", seq_len=8, seed=0).sample(32, relevant=True)
    assert b["relevant"].all()
    for row in range(32):
        t = torch.nonzero(b["rewards"][row, :, int(b["task"][row])])[:, 0]
        assert len(t) and (t >= 1).any(), "the window holds the reward and the frame before it"


def test_mixed_batches_put_the_relevant_rows_first(smoke):
    mixed = data.SequenceDataset(smoke, "train", seq_len=8, seed=0).sample(10, relevant=0.5)
    assert mixed["relevant"].tolist() == [True] * 5 + [False] * 5
    assert (mixed["task"][:5] >= 0).all() and (mixed["task"][5:] == -1).all()


def test_relevant_windows_cover_more_than_one_task(smoke):
    b = data.SequenceDataset(smoke, "train", seq_len=8, seed=0).sample(64, relevant=1.0)
    assert len(set(b["task"].tolist())) > 1, "tasks are drawn uniformly among those with events"


# ---------------------------------------------------------------- bad inputs: errors name the file

def rewrite(root, name, **arrays):
    path = os.path.join(root, name + ".npz")
    with np.load(path) as z:
        content = {k: z[k] for k in z.files}
    content.update(arrays)
    np.savez_compressed(path, **{k: v for k, v in content.items() if v is not None})
    return path


def spoil(problem: str, root: str, victim: str, frames, actions) -> str:
    """Damage one episode file in the way `problem` names; returns the expected message."""
    path = os.path.join(root, victim + ".npz")
    if problem == "missing_key":
        os.remove(path)
        np.savez_compressed(path, images=frames, actions=actions)
        return "missing key 'frames'"
    if problem == "frames_dtype":
        rewrite(root, victim, frames=frames.astype(np.float32))
        return "uint8"
    if problem == "actions_dtype":
        rewrite(root, victim, actions=actions.astype(np.int32))
        return "int64"
    if problem == "image_size":
        rewrite(root, victim, frames=frames[:, :16, :16])
        return "image_size 32"
    if problem == "action_range":
        bad = actions.copy()
        bad[3, 0] = 5  # move has classes 0…4
        rewrite(root, victim, actions=bad)
        return "'move'"
    if problem == "truncated":
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(size // 2)
        return "truncated or corrupt"
    rewrite(root, victim, rewards=np.zeros((64, 3), np.float32))
    return "rewards must be float32"


@pytest.mark.parametrize("problem", ["missing_key", "frames_dtype", "actions_dtype", "image_size",
                                     "action_range", "truncated", "rewards_shape"])
def test_bad_episode_error_names_the_file_and_the_fix(smoke, tmp_path, problem):
    root = copy_of(smoke, tmp_path)
    victim = data.load_meta(root)["split"]["train"][1]
    path = os.path.join(root, victim + ".npz")
    with np.load(path) as z:
        frames, actions = z["frames"], z["actions"]
    match = spoil(problem, root, victim, frames, actions)
    with pytest.raises(ValueError, match=match) as err:
        data.SequenceDataset(root, "train", seq_len=8)
    assert path in str(err.value) and "python data.py" in str(err.value)


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.SequenceDataset(str(tmp_path / "nowhere"))


def test_empty_folder_error_names_the_folder(tmp_path):
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no .npz episodes") as err:
        data.SequenceDataset(str(tmp_path / "empty"))
    assert str(tmp_path / "empty") in str(err.value)


def test_missing_listed_episode_is_named(smoke, tmp_path):
    root = copy_of(smoke, tmp_path)
    gone = data.load_meta(root)["split"]["heldout"][0]
    os.remove(os.path.join(root, gone + ".npz"))
    with pytest.raises(FileNotFoundError, match=gone):
        data.SequenceDataset(root, "heldout", seq_len=8)


def truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def test_corrupt_generated_episode_names_the_command_that_writes_the_dataset(smoke, tmp_path):
    root = copy_of(smoke, tmp_path)
    truncate(os.path.join(root, data.load_meta(root)["split"]["train"][1] + ".npz"))
    with pytest.raises(ValueError, match=f"`python data.py --preset smoke --out {root}`"):
        data.SequenceDataset(root, "train", seq_len=8)


def test_corrupt_episode_of_your_own_data_has_advice_that_leads_out(smoke, tmp_path):
    """Your own data cannot be regenerated: the advice takes the episode out of the split, and
    following it the dataset loads (deleting the file would only bring "listed but missing")."""
    root = copy_of(smoke, tmp_path)
    meta = data.load_meta(root)
    victim = meta["split"]["train"][1]
    edit_meta(root, generator="my recorder")
    truncate(os.path.join(root, victim + ".npz"))
    with pytest.raises(ValueError, match="take its id out of the \"split\" lists") as err:
        data.SequenceDataset(root, "train", seq_len=8)
    assert f"`python data.py --check {root}`" in str(err.value)
    edit_meta(root, split={"train": [i for i in meta["split"]["train"] if i != victim],
                           "heldout": meta["split"]["heldout"]})
    assert victim not in data.SequenceDataset(root, "train", seq_len=8).ids


def test_ensure_dataset_refuses_a_missing_custom_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.ensure_dataset(str(tmp_path / "nowhere"))


# ---------------------------------------------------------------- ensure_dataset

@pytest.fixture(scope="module")
def generated_builtin(tmp_path_factory) -> dict:
    """ensure_dataset("smoke") called in an empty working folder: what it returned and printed."""
    cwd = tmp_path_factory.mktemp("work")
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.chdir(cwd)
        root = data.ensure_dataset("smoke")
    return {"cwd": cwd, "root": root, "printed": printed.getvalue()}


def test_ensure_dataset_generates_a_missing_builtin_dataset(generated_builtin):
    assert generated_builtin["root"] == os.path.join("data", "smoke")
    assert "generating" in generated_builtin["printed"]


def test_ensure_dataset_writes_the_builtin_preset(generated_builtin):
    root = os.path.join(generated_builtin["cwd"], generated_builtin["root"])
    assert data.load_meta(root)["episodes"] == 8


def test_ensure_dataset_leaves_the_assets_alone(generated_builtin):
    assert not os.path.exists(os.path.join(generated_builtin["cwd"], "assets"))


def test_ensure_dataset_finds_an_existing_dataset(smoke, tmp_path, monkeypatch, capsys):
    shutil.copytree(smoke, tmp_path / "data" / "smoke")
    monkeypatch.chdir(tmp_path)
    assert data.ensure_dataset("data/smoke") == "data/smoke"
    assert "generating" not in capsys.readouterr().out


def test_ensure_dataset_warns_about_a_builtin_dataset_drawn_by_older_sprites(
        smoke, tmp_path, monkeypatch, capsys):
    shutil.copytree(smoke, tmp_path / "data" / "smoke")
    monkeypatch.chdir(tmp_path)
    assert "older sprites" not in (data.ensure_dataset("data/smoke") and capsys.readouterr().out)
    meta = data.load_meta("data/smoke")
    del meta["render_version"]  # a dataset written before the version was recorded
    data.write_meta("data/smoke", meta)
    data.ensure_dataset("data/smoke")
    out = capsys.readouterr().out
    assert "older sprites" in out and "Delete data/smoke" in out


# ---------------------------------------------------------------- episodes without meta.json

@pytest.fixture(scope="module")
def inferred(smoke, tmp_path_factory) -> str:
    """A copy of the smoke dataset with meta.json deleted, then loaded once (which infers it)."""
    root = str(tmp_path_factory.mktemp("byo") / "copy")
    shutil.copytree(smoke, root)
    os.remove(os.path.join(root, "meta.json"))
    data.SequenceDataset(root, "train", seq_len=8)
    return root


def test_meta_is_inferred_and_written(inferred):
    with open(os.path.join(inferred, "meta.json")) as f:
        meta = json.load(f)
    assert meta["image_size"] == 32 and len(meta["tasks"]) == len(environment.TASKS)


def test_inferred_classes_are_the_largest_action_plus_one(inferred):
    """At least 2 classes per component (a button never pressed is still a button)."""
    largest = np.max([e["actions"].max(0) for e in data.iter_episodes(inferred, "all")], 0)  # (A,)
    with open(os.path.join(inferred, "meta.json")) as f:
        classes = [n for _, n in json.load(f)["action_components"]]
    assert classes == [max(2, int(m) + 1) for m in largest]


def test_inferred_split_holds_out_one_episode_of_eight(inferred):
    assert len(data.load_meta(inferred)["split"]["heldout"]) == 1


def test_dataset_with_inferred_meta_loads(inferred):
    batch = data.SequenceDataset(inferred, "train", seq_len=8).sample(2)
    assert batch["actions"].shape == (2, 8, 4)


def test_check_warns_that_inferred_classes_are_a_guess(inferred):
    assert "guessed from the largest action seen" in findings(inferred, "warn")


def test_check_accepts_classes_once_confirmed(inferred, tmp_path):
    root = copy_of(inferred, tmp_path)
    with open(os.path.join(root, "meta.json")) as f:
        meta = json.load(f)
    del meta["action_classes_inferred"]  # what the warning asks for, after checking the classes
    with open(os.path.join(root, "meta.json"), "w") as f:
        json.dump(meta, f)
    assert "guessed" not in findings(root, "warn")


def test_failed_generation_leaves_no_partial_folder(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C in the middle of the contractors' play
    monkeypatch.setattr(environment, "rollout", crash)
    out = str(tmp_path / "gen")
    with pytest.raises(KeyboardInterrupt):
        data.generate(parse_args(data.Args, data.PRESETS, ["--preset", "smoke", "--out", out]))
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- simulate_future

EID, T0, H = "ep000001", 10, 12  # episode, the frame the plans start at, plan length


def recorded_actions(root: str) -> np.ndarray:
    with np.load(os.path.join(root, EID + ".npz")) as z:
        return z["actions"][T0:T0 + H]  # (H, A)


def test_simulate_future_replays_the_stored_frames(smoke):
    """The environment as a world model: with the recorded actions and the episode's own draws it
    reproduces the stored frames exactly."""
    stored = data.load_frames(os.path.join(smoke, EID + ".npz"))  # (T, 32, 32, 3)
    (same,) = data.simulate_future(smoke, EID, T0, [recorded_actions(smoke)])
    assert same.shape == (H, 32, 32, 3)
    np.testing.assert_array_equal(same, stored[T0 + 1:T0 + 1 + H])


def test_every_plan_starts_from_the_same_state(smoke):
    plan = recorded_actions(smoke)
    first, second = data.simulate_future(smoke, EID, T0, [plan, plan.copy()])
    np.testing.assert_array_equal(first, second)


def test_other_actions_give_another_future(smoke):
    plan = recorded_actions(smoke)
    moved = plan.copy()
    moved[:, 0] = moved[:, 0] % 4 + 1  # a move every step, never the recorded move class
    # rng_seed: fresh draws for what nobody controls, the same for both plans
    mine, theirs = data.simulate_future(smoke, EID, T0, [moved, plan], rng_seed=123)
    assert mine.shape == theirs.shape == (H, 32, 32, 3)
    assert not np.array_equal(mine, theirs)


def test_simulate_future_refuses_frames_the_rules_do_not_produce(smoke, tmp_path):
    root = copy_of(smoke, tmp_path)
    with np.load(os.path.join(root, EID + ".npz")) as z:
        frames, actions, rewards = z["frames"].copy(), z["actions"], z["rewards"]
    frames[T0] = 255 - frames[T0]
    data.write_episode(root, EID, frames, actions, rewards)
    assert data.simulate_future(root, EID, T0, [recorded_actions(root)]) is None


def test_simulate_future_refuses_another_generator(smoke):
    meta = {**data.load_meta(smoke), "generator": "someone else"}
    assert data.simulate_future(smoke, EID, T0, [recorded_actions(smoke)], meta=meta) is None


def test_simulate_future_refuses_ids_generate_does_not_write(smoke):
    assert data.simulate_future(smoke, "clip_7", T0, [recorded_actions(smoke)]) is None


# ---------------------------------------------------------------- bring your own frames

@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict:
    """Two 6-frame clips of random play saved as PNG folders, and their import by data.main."""
    tmp = tmp_path_factory.mktemp("frames")
    ep = environment.rollout(environment.RandomPolicy(0), [1, 2], 32, 6)["frames"]  # (2, 6, ...)
    for e in range(2):
        os.makedirs(tmp / "videos" / f"clip{e}")
        for t in range(6):
            Image.fromarray(ep[e, t]).save(tmp / "videos" / f"clip{e}" / f"{t:04d}.png")
    out = str(tmp / "mine")
    data.main(["--from-frames", str(tmp / "videos"), "--out", out])
    return {"tmp": tmp, "src": tmp / "videos", "frames": ep, "out": out}


def test_import_declares_no_actions_and_no_tasks(clips):
    meta = data.load_meta(clips["out"])
    assert meta["image_size"] == 32 and meta["action_components"] == [] and meta["tasks"] == []


def test_import_keeps_the_frames_exactly(clips):
    got = {e["id"]: e for e in data.iter_episodes(clips["out"], "all")}
    for e in range(2):
        np.testing.assert_array_equal(got[f"ep00000{e}"]["frames"], clips["frames"][e])  # lossless


def test_imported_episodes_are_unlabeled(clips):
    for e in data.iter_episodes(clips["out"], "all"):
        assert e["actions"] is None and e["rewards"] is None


def test_unlabeled_batches_have_empty_labels(clips):
    b = data.SequenceDataset(clips["out"], "train", seq_len=4).sample(3)
    assert not b["has_actions"].any()
    assert b["actions"].shape == (3, 4, 0) and b["rewards"].shape == (3, 4, 0)


@pytest.fixture
def mixed_sizes(clips, tmp_path):
    """The two clips with one 40×40 image added to the second."""
    src = tmp_path / "videos"
    shutil.copytree(clips["src"], src)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(src / "clip1" / "9999.png")
    return src


def test_mixed_image_sizes_error_names_the_image(mixed_sizes, tmp_path):
    with pytest.raises(ValueError, match="9999.png.*--resize"):
        data.import_frames(str(mixed_sizes), str(tmp_path / "mixed"))


def test_resize_makes_mixed_sizes_agree(mixed_sizes, tmp_path):
    data.import_frames(str(mixed_sizes), str(tmp_path / "resized"), resize=16)
    episode = next(data.iter_episodes(str(tmp_path / "resized"), "all"))
    assert episode["frames"].shape == (6, 16, 16, 3)


# ---------------------------------------------------------------- data.py --check and the import
def findings(root: str, level: str, probe: bool = False) -> str:
    """The messages of one level that `data.py --check` reports for root, joined."""
    return "\n".join(t for lv, t in data.check_dataset(root, probe) if lv == level)


def edit_meta(root: str, **fields) -> None:
    with open(os.path.join(root, "meta.json")) as f:
        meta = json.load(f)
    with open(os.path.join(root, "meta.json"), "w") as f:
        json.dump({**meta, **fields}, f)


def rewrite_all(root: str, change) -> None:
    """Rewrite every episode with change(dict of arrays) applied."""
    for path in glob_npz(root):
        with np.load(path) as z:
            arrays = dict(z)
        np.savez_compressed(path, **change(arrays))


def glob_npz(root: str) -> list[str]:
    return sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".npz"))


def test_check_passes_the_smoke_dataset_with_the_probe(smoke):
    result = data.check_dataset(smoke, probe=True)
    assert [lv for lv, _ in result if lv != "ok"] == []


def test_check_catches_actions_stored_one_frame_late(smoke, tmp_path):
    root = copy_of(smoke, tmp_path)
    rewrite_all(root, lambda a: {**a, "actions": np.roll(a["actions"], 1, 0)})  # row t: a_{t−1}
    assert "one row earlier" in findings(root, "warn", probe=True)


def test_check_catches_actions_stored_one_frame_early(smoke, tmp_path):
    root = copy_of(smoke, tmp_path)
    rewrite_all(root, lambda a: {**a, "actions": np.roll(a["actions"], -1, 0)})  # row t: a_{t+1}
    assert "one row later" in findings(root, "warn", probe=True)


def test_check_catches_actions_of_other_frames(smoke, tmp_path):
    root = copy_of(smoke, tmp_path)
    rng = np.random.default_rng(0)
    rewrite_all(root, lambda a: {**a, "actions": rng.permutation(a["actions"])})  # shuffled rows
    assert "do not show in the next frame" in findings(root, "warn", probe=True)


def test_check_catches_text_sorted_frames(smoke, tmp_path):
    root = copy_of(smoke, tmp_path)
    order = sorted(range(64), key=str)  # 0, 1, 10, 11, …: the order of a text sort
    rewrite_all(root, lambda a: {**a, "frames": a["frames"][order]})
    assert "sorted as text" in findings(root, "warn")


def test_check_flags_an_empty_heldout_split(smoke, tmp_path):
    root = copy_of(smoke, tmp_path)
    meta = data.load_meta(root)
    edit_meta(root, split={"train": meta["split"]["train"] + meta["split"]["heldout"],
                           "heldout": []})
    assert "split 'heldout' is empty" in findings(root, "error")


def test_check_flags_declared_classes_that_never_occur(smoke, tmp_path):
    root = copy_of(smoke, tmp_path)
    edit_meta(root, action_components=[["move", 17], ["use", 2], ["place", 2], ["craft", 2]])
    assert "'move' declares 17 classes but only 5 occur" in findings(root, "warn")


def test_check_flags_shaped_rewards(smoke, tmp_path):
    root = copy_of(smoke, tmp_path)
    rewrite_all(root, lambda a: {**a, "rewards": a["rewards"] - np.float32(0.01)})
    assert "rewards are shaped" in findings(root, "warn")


def test_check_flags_episodes_shorter_than_a_preset_window(smoke, tmp_path):
    root = copy_of(smoke, tmp_path)
    rewrite_all(root, lambda a: {k: v[:20] for k, v in a.items()})  # 20 < dynamics' 64 (default)
    assert "--preset default (dynamics.py --seq-len-long 64)" in findings(root, "warn")


def test_check_reports_a_bad_episode_as_an_error(smoke, tmp_path):
    root = copy_of(smoke, tmp_path)
    rewrite_all(root, lambda a: {**a, "actions": a["actions"].astype(np.int32)})
    assert "actions must be int64" in findings(root, "error")


def test_check_command_fails_on_errors(smoke, tmp_path):
    root = copy_of(smoke, tmp_path)
    edit_meta(root, split={"train": ["ep000000"], "heldout": []})
    with pytest.raises(SystemExit) as stop, contextlib.redirect_stdout(io.StringIO()):
        data.main(["--check", root, "--no-probe"])
    assert stop.value.code == 1


def test_action_components_as_objects_load(smoke, tmp_path):
    root = copy_of(smoke, tmp_path)
    edit_meta(root, action_components=[{"name": "move", "classes": 5},
                                       {"name": "use", "classes": 2},
                                       {"name": "place", "classes": 2},
                                       {"name": "craft", "classes": 2}])
    assert data.load_meta(root)["action_components"] == environment.ACTION_COMPONENTS


def test_unknown_action_components_form_shows_the_expected_one(smoke, tmp_path):
    root = copy_of(smoke, tmp_path)
    edit_meta(root, action_components=["move", "use"])
    with pytest.raises(ValueError, match=r'expected "action_components": \[\["move", 5\]'):
        data.load_meta(root)


def test_split_ids_may_carry_the_npz_extension(smoke, tmp_path):
    root = copy_of(smoke, tmp_path)
    meta = data.load_meta(root)
    edit_meta(root, split={k: [i + ".npz" for i in v] for k, v in meta["split"].items()})
    assert data.SequenceDataset(root, "heldout", seq_len=8).ids == meta["split"]["heldout"]


def test_missing_episode_advice_is_not_to_delete_it(smoke, tmp_path):
    root = copy_of(smoke, tmp_path)
    gone = data.load_meta(root)["split"]["heldout"][0]
    os.remove(os.path.join(root, gone + ".npz"))
    with pytest.raises(FileNotFoundError, match="remove .* from split in meta.json") as err:
        data.SequenceDataset(root, "heldout", seq_len=8)
    assert "delete" not in str(err.value)


def save_numbered_frames(folder, frames: np.ndarray) -> None:
    """frame_1.png … frame_N.png, numbered as ffmpeg's %d.png writes them (no zero padding)."""
    os.makedirs(folder)
    for t, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"frame_{t + 1}.png")


def test_import_sorts_frame_numbers_by_value(clips, tmp_path):
    frames = environment.rollout(environment.RandomPolicy(0), [3, 4], 32, 12)["frames"]
    for e in range(2):
        save_numbered_frames(tmp_path / "videos" / f"ep{e}", frames[e])
    with contextlib.redirect_stdout(io.StringIO()):
        data.import_frames(str(tmp_path / "videos"), str(tmp_path / "mine"))
    first = next(data.iter_episodes(str(tmp_path / "mine"), "all"))
    np.testing.assert_array_equal(first["frames"], frames[0])


def test_import_of_a_missing_folder_says_it_does_not_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.import_frames(str(tmp_path / "nowhere"), str(tmp_path / "mine"))


def test_import_of_empty_episode_folders_is_a_clear_error(tmp_path):
    os.makedirs(tmp_path / "videos" / "ep0")
    with pytest.raises(FileNotFoundError, match="no images"), pytest.warns(UserWarning):
        data.import_frames(str(tmp_path / "videos"), str(tmp_path / "mine"))


def test_failed_import_leaves_no_partial_folder(mixed_sizes, tmp_path):
    with pytest.raises(ValueError):
        data.import_frames(str(mixed_sizes), str(tmp_path / "mixed"))
    assert not os.path.exists(tmp_path / "mixed.partial")
