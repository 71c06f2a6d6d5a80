"""Tests of the action-following instruments of dynamics_eval.py: generated frames read back into
the agent's tile, its facing and the inventory, scored against the real environment's frames;
the actions shifted by ±1 frame for the timing check."""

import copy
import os

import numpy as np
import pytest
import torch

import data
import environment
from dynamics_eval import change_share, find_events, follow_hits, shift_window, step_figures
from environment import read_frames

SIZE, T = 32, 12  # 32×32 frames (4 pixels per tile), frames per hand-made episode
SEED = environment.episode_seed(0, "data", 0)  # the world of dataset episode ep000000


def walk(seed: int = SEED, steps: int = T - 1):
    """An Env after `steps` random moves from reset(seed), and the frames (T, H, W, 3) uint8."""
    env = environment.Env(SIZE)
    frames = [env.reset(seed)]
    rng = np.random.default_rng(1)
    for _ in range(steps):
        frames.append(env.step(np.array([rng.integers(1, 5), 0, 0, 0]))[0])
    return env, np.stack(frames)


def as_generated(frames: np.ndarray) -> np.ndarray:
    """Real frames as the decoder would give them: float pixel values 0…255."""
    return frames.astype(np.float32)


def edited(env, **state) -> np.ndarray:
    """The frame env would render with some of its state replaced (agent, facing, inv)."""
    other = copy.deepcopy(env)
    for k, v in state.items():
        setattr(other, k, v)
    return other.render()


def free_neighbour(env) -> tuple:
    """A walkable neighbour of the agent that nobody stands on."""
    cells = [environment._next(env.agent, m) for m in range(1, 5)]
    return next(c for c in cells if env._free(c))


# ---------------------------------------------------------------- reading and scoring

def test_real_frames_as_generated_score_all_right():
    _, frames = walk()
    hits = follow_hits(as_generated(frames)[None], frames[None])  # (1, T) each
    for what, right in hits.items():
        assert right.all(), f"{what}: the real frames must read as themselves"


def test_nearest_sprite_reads_noisy_frames_as_the_clean_ones():
    _, frames = walk()
    noise = np.random.default_rng(0).normal(0, 20, frames.shape)  # a blurry decoder's error
    got = read_frames(as_generated(frames) + noise)
    want = environment.decode_frames(frames)
    np.testing.assert_array_equal(got["app"], want["app"])
    np.testing.assert_array_equal(got["inv"], want["inv"])


def test_agent_moved_one_tile_gives_zero_tile_accuracy_at_that_step():
    env, frames = walk()
    generated = as_generated(frames).copy()
    generated[-1] = edited(env, agent=free_neighbour(env))
    hits = follow_hits(generated[None], frames[None])["tile"][0]  # (T,)
    assert not hits[-1], "the agent one tile off must count as wrong"
    assert hits[:-1].all(), "the other steps are untouched"


def test_wrong_facing_on_the_right_tile_is_right_tile_wrong_facing():
    env, frames = walk()
    generated = as_generated(frames).copy()
    generated[-1] = edited(env, facing=(env.facing + 1) % 4)
    hits = follow_hits(generated[None], frames[None])
    assert hits["tile"][0, -1] and not hits["facing"][0, -1]


def test_a_frame_without_the_agent_counts_as_wrong():
    env, frames = walk()
    generated = as_generated(frames).copy()
    r, c = env.agent
    s = SIZE // 8
    generated[-1, r * s:(r + 1) * s, c * s:(c + 1) * s] = frames[0, 0:s, 0:s]  # a copy of a tile
    hits = follow_hits(generated[None], frames[None])
    assert not hits["tile"][0, -1] and not hits["facing"][0, -1]


def test_one_inventory_count_off_makes_the_inventory_wrong():
    env, frames = walk()
    generated = as_generated(frames).copy()
    inv = list(env.inv)
    inv[environment.WOOD] += 1
    generated[-1] = edited(env, inv=inv)
    hits = follow_hits(generated[None], frames[None])
    assert not hits["inventory"][0, -1] and hits["tile"][0, -1]


def test_step_figures_against_a_hand_table():
    # 4 windows × 3 steps of the rollout's tile hits, and copying's first step: windows 0 and 1
    # moved (copying wrong), 2 and 3 stayed.
    tile = np.array([[1, 1, 0],
                     [0, 0, 0],
                     [1, 1, 1],
                     [1, 0, 1]], dtype=bool)
    copy_tile = np.array([[0, 0, 0], [0, 0, 0], [1, 1, 1], [1, 1, 0]], dtype=bool)
    got = step_figures(tile, copy_tile)
    # steps after a right one (window, step → step + 1): (0, 0→1) right, (0, 1→2) wrong,
    # (2, 0→1) right, (2, 1→2) right, (3, 0→1) wrong: 3 of 5
    assert got["follow_tile_acc_given_prev"] == pytest.approx(3 / 5)
    assert got["follow_tile_acc_first_moved"] == pytest.approx(1 / 2)  # windows 0 ✓, 1 ✗
    assert got["follow_tile_acc_first_stayed"] == pytest.approx(1.0)  # windows 2 ✓, 3 ✓


def test_step_figures_are_none_where_no_window_qualifies():
    tile = np.zeros((2, 3), dtype=bool)  # never right: nothing to condition on
    got = step_figures(tile, np.ones((2, 3), dtype=bool))  # nobody moved
    assert got["follow_tile_acc_given_prev"] is None
    assert got["follow_tile_acc_first_moved"] is None
    assert got["follow_tile_acc_first_stayed"] == 0.0


# ---------------------------------------------------------------- the timing check

def test_shift_window_delays_or_advances_the_actions_with_no_op_padding():
    acts = torch.tensor([[[1, 0], [2, 1], [3, 0], [4, 1]]])  # (B=1, T=4, A=2)
    late = torch.tensor([[[0, 0], [1, 0], [2, 1], [3, 0]]])  # a′_t = a_{t−1}
    early = torch.tensor([[[2, 1], [3, 0], [4, 1], [0, 0]]])  # a′_t = a_{t+1}
    assert torch.equal(shift_window(acts, 1), late)
    assert torch.equal(shift_window(acts, -1), early)


@pytest.fixture
def one_episode(tmp_path) -> str:
    """A one-episode built-in dataset (ep000000, random moves) as data.generate would write it."""
    root = str(tmp_path / "one")
    os.makedirs(root)
    ep = environment.rollout(environment.RandomPolicy(3), [SEED], SIZE, 24)
    data.write_episode(root, "ep000000", ep["frames"][0], ep["actions"][0], ep["rewards"][0])
    data.write_meta(root, {"format_version": 1, "generator": data.GENERATOR, "seed": 0,
                           "image_size": SIZE, "fps": 10, "episode_len": 24,
                           "action_components": environment.ACTION_COMPONENTS,
                           "tasks": environment.TASKS,
                           "split": {"train": [], "heldout": ["ep000000"]}})
    return root


def test_shifted_actions_give_other_frames_in_the_real_environment(one_episode):
    recorded = np.load(os.path.join(one_episode, "ep000000.npz"))
    acts = torch.from_numpy(recorded["actions"])[None]  # (1, T, A)
    t, H = 8, 8  # the last context frame, the generated frames after it
    plans = [shift_window(acts, by)[0, t:t + H].numpy() for by in (0, 1, -1)]  # (H, A) each
    true, late, early = data.simulate_future(one_episode, "ep000000", t, plans)
    np.testing.assert_array_equal(true, recorded["frames"][t + 1:t + 1 + H])
    assert not np.array_equal(late, true), "actions a frame late must give other frames"
    assert not np.array_equal(early, true), "actions a frame early must give other frames"


@pytest.fixture
def calm_world(monkeypatch):
    """The real environment without its chance events: the creature stays put and steals
    nothing, no tree regrows."""
    for name in ("P_CREATURE_MOVE", "P_STEAL", "P_REGROW"):
        monkeypatch.setattr(environment, name, 0.0)


def test_find_events_lists_the_cracks_fellings_and_table_of_a_scripted_episode(calm_world):
    """The place-table script fells two trees (three `use` presses each) and places a table. The
    events read off its frames must sit where the script says: a crack at the first press of each
    run of presses, a felling and a wood at the third, the table at the `place` action."""
    import play
    env = environment.Env(SIZE, episode_len=1 << 30)
    frames = [env.reset(play.world_seed(1, 0))]
    script = play.plan_script(frames[0], "place_table")
    for a in script:
        frames.append(env.step(a)[0])
    use = [bool(a[1]) for a in script]
    run = [0] * len(script)  # presses in a row up to and including step t
    for t, u in enumerate(use):
        run[t] = (run[t - 1] + 1 if t else 1) if u else 0
    want = {"crack": [t for t in range(len(script)) if run[t] == 1],
            "fell": [t for t in range(len(script)) if run[t] == 3],
            "table": [t for t, a in enumerate(script) if a[2]],
            "wood": [t for t in range(len(script)) if run[t] == 3]}  # a felling adds a wood
    events = find_events(np.stack(frames), 0)
    got = {kind: [t for k, t, _ in events if k == kind] for kind in want}
    assert got == want and len(want["fell"]) == 2 and len(want["table"]) == 1, (
        f"expected events at script steps {want}, found {got}")


def test_find_events_places_a_move_on_the_agents_new_tile():
    """Random moves (some blocked): a move event at every step where the environment's own agent
    changed tile, at its new tile, and at no other step."""
    env = environment.Env(SIZE)
    frames, cells = [env.reset(SEED)], [env.agent]
    rng = np.random.default_rng(1)
    for _ in range(T - 1):
        frames.append(env.step(np.array([rng.integers(1, 5), 0, 0, 0]))[0])
        cells.append(env.agent)
    want = [(t, tuple(cells[t + 1])) for t in range(T - 1) if cells[t + 1] != cells[t]]
    got = [(t, tile) for kind, t, tile in find_events(np.stack(frames), 0) if kind == "move"]
    assert want and got == want, f"expected moves (step, new tile) {want}, found {got}"


def test_change_share_is_the_projection_on_the_real_change():
    before = np.zeros((4, 4, 3))
    after = before.copy()
    after[1, 2] = (200, 100, 0)  # one pixel changes
    half = (before + after) / 2
    elsewhere = before.copy()
    elsewhere[3, 3] = 255  # a change where the real one is not: no credit
    assert change_share(after, before, after) == pytest.approx(1.0)
    assert change_share(before, before, after) == pytest.approx(0.0)
    assert change_share(half, before, after) == pytest.approx(0.5)
    assert change_share(elsewhere, before, after) == pytest.approx(0.0)
