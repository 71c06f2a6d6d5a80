"""Tests of environment.py: seeding, rendering and decoding, speed, the players and `evaluate`.
The data contract's indexing (which frame an action and a reward belong to) is pinned in
tests/test_data.py."""

import time

import numpy as np
import pytest

import environment

NOOP = np.zeros(4, np.int64)  # (A,) no move, no buttons
INVENTORY = [3, 2, 1, 0, 1, 1, 0]  # wood, stone, iron, diamond, three pickaxes


# ---------------------------------------------------------------- seeding

def test_same_seed_gives_the_same_episode():
    seeds = [environment.episode_seed(0, "eval", i) for i in range(3)]
    a = environment.rollout(environment.RandomPolicy(7), seeds, 32, 40)
    b = environment.rollout(environment.RandomPolicy(7), seeds, 32, 40)
    for k in ("frames", "actions", "rewards"):
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"{k} differ between two seeded runs")


def test_different_seeds_give_different_worlds():
    seeds = [environment.episode_seed(0, "eval", i) for i in range(3)]
    a = environment.rollout(environment.RandomPolicy(7), seeds, 32, 2)
    c = environment.rollout(environment.RandomPolicy(7), [s + 1 for s in seeds], 32, 2)
    assert not np.array_equal(a["frames"][:, 0], c["frames"][:, 0])


def test_world_randomness_is_part_of_the_seed():
    """The creature and the regrowing trees draw from the episode's generator: the same seed and
    the same actions give the same future, frame for frame."""
    env1, env2 = environment.Env(32), environment.Env(32)
    env1.reset(1)
    env2.reset(1)
    for _ in range(30):
        f1, *_ = env1.step(NOOP)
        f2, *_ = env2.step(NOOP)
    np.testing.assert_array_equal(f1, f2)


def test_episode_seed_streams_never_coincide():
    data_seeds = {environment.episode_seed(0, "data", i) for i in range(100)}
    eval_seeds = {environment.episode_seed(0, "eval", i) for i in range(100)}
    assert not data_seeds & eval_seeds, "evaluation worlds must not be dataset worlds"


# ---------------------------------------------------------------- rendering and decoding

def rendered(size: int) -> tuple:
    """(env, frame) of a fixed world with the inventory INVENTORY."""
    env = environment.Env(size)
    env.reset(5)
    env.inv = list(INVENTORY)
    return env, env.render()


@pytest.mark.parametrize("size", [32, 64])
def test_frame_is_uint8_image_size_square(size):
    _, frame = rendered(size)
    assert frame.shape == (size, size, 3) and frame.dtype == np.uint8


@pytest.mark.parametrize("size", [32, 64])
def test_inventory_change_touches_only_the_strip(size):
    env, frame = rendered(size)
    env.inv[0] = 1
    changed = np.nonzero((env.render() != frame).any(-1))[0]  # changed pixel rows
    assert changed.min() >= size * 7 // 8, "inventory change should only touch the bottom row"


@pytest.mark.parametrize("size", [32, 64])
def test_each_unit_of_a_material_repaints_its_whole_slot(size):
    """The count is the shade of the whole slot, so that one wood against two (the cost of a
    table) differs in every pixel of the slot, not in a few the tokenizer can drop."""
    slots = environment._sprites(size)["slots"]  # (8, MAX_COUNT + 1, s, s, 3)
    inner = slots[:4, :, :, :-1]  # the 4 materials, without the dark gap column on the right
    step = (inner[:, 1:] != inner[:, :-1]).any(-1)  # (4, MAX_COUNT, s, s − 1)
    assert step.all()


@pytest.mark.parametrize("size", [32, 64])
def test_decode_frames_reads_the_inventory(size):
    _, frame = rendered(size)
    np.testing.assert_array_equal(environment.decode_frames(frame[None])["inv"][0], INVENTORY)


def test_both_sizes_decode_to_the_same_world():
    """The 32×32 and 64×64 renderings are drawn natively, but show the same tiles."""
    small = environment.decode_frames(rendered(32)[1][None])["app"]
    large = environment.decode_frames(rendered(64)[1][None])["app"]
    np.testing.assert_array_equal(small, large)


def test_decode_frames_rejects_frames_env_did_not_render():
    noise = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="does not match any sprite"):
        environment.decode_frames(noise)


def test_environment_speed_is_measured():
    fps = environment.bench_env(64, steps=3000)
    print(f"\nenvironment 64×64: {fps:,.0f} frames/s on one core (rendering included)")
    assert fps > 0  # measured and printed, not asserted (CI machines vary)


# ---------------------------------------------------------------- players in the real environment

@pytest.fixture(scope="module")
def rates() -> dict:
    """Success per task of the random and the contractor players on 40 evaluation worlds."""
    t0 = time.time()
    out = {name: environment.evaluate(policy, episodes=40, seed=0, image_size=32)["success"]
           for name, policy in [("random", environment.RandomPolicy(0)),
                                ("contractor", environment.ContractorPolicy(0))]}
    print(f"\n{'task':<20s} random  contractor   ({time.time() - t0:.1f}s)")
    for k in environment.TASKS:
        print(f"{k:<20s} {out['random'][k]['rate']:6.2f}  {out['contractor'][k]['rate']:6.2f}")
    return out


def test_random_play_reaches_wood_sometimes_not_always(rates):
    assert 0 < rates["random"]["collect_wood"]["rate"] < 1


def test_random_play_never_reaches_iron_or_diamond(rates):
    assert rates["random"]["collect_iron"]["rate"] == 0
    assert rates["random"]["collect_diamond"]["rate"] == 0


@pytest.mark.parametrize("task", environment.TASKS[:4])
def test_contractors_beat_random_on_the_lower_rungs(rates, task):
    assert rates["contractor"][task]["rate"] > rates["random"][task]["rate"], task


def test_diamonds_stay_rare_for_contractors(rates):
    assert rates["contractor"]["collect_diamond"]["rate"] < 0.25


def test_success_stderr_is_the_binomial_one(rates):
    r = rates["random"]["collect_wood"]
    assert r["stderr"] == pytest.approx(np.sqrt(r["rate"] * (1 - r["rate"]) / 40))


def test_an_expert_climbs_the_whole_ladder():
    """The ladder is solvable within an episode: the scripted player at full diligence and
    ambition gets the diamond — the data's contractors are suboptimal by choice, not necessity."""
    expert = environment.ContractorPolicy(0, skill=1.0, ambition=7)
    result = environment.evaluate(expert, episodes=8, seed=1, image_size=32)
    assert result["success"]["collect_diamond"]["rate"] >= 0.75


def noop_policy(frames: np.ndarray) -> np.ndarray:
    return np.zeros((len(frames), 4), np.int64)  # (B, A)


def three_component_policy(frames: np.ndarray) -> np.ndarray:
    return np.zeros((len(frames), 3), np.int64)  # (B, 3): one component short


def facing_a_tree_frame():
    """A frame of a grass world with the agent at (2, 2) facing right at a tree at (2, 3)."""
    e = environment.Env(32)
    e.reset(0)
    e.grid[:] = environment.GRASS
    e.grid[2, 3] = environment.TREE
    e.agent, e.facing, e.creature = (2, 2), 3, (6, 7)
    e.inv = [0] * len(environment.INVENTORY)
    return e.render()


@pytest.mark.parametrize("still, want", [(1.0, [0, 1, 0, 0]), (0.0, [4, 1, 0, 0])])
def test_a_contractor_facing_a_tree_presses_use_alone_or_with_the_direction(still, want):
    """`still` = 1: use alone; 0: the direction key held with it (both mine the faced tree)."""
    player = environment.ContractorPolicy(0, skill=1.0, ambition=7)
    player.reset(1)
    player.profiles[0].update(still=still, mash=0.0)
    assert player.act(facing_a_tree_frame()[None])[0].tolist() == want


def test_evaluate_accepts_a_plain_callable():
    result = environment.evaluate(noop_policy, episodes=2, image_size=32, episode_len=16)
    assert result["return"]["mean"] == 0


def test_evaluate_rejects_actions_of_the_wrong_shape():
    with pytest.raises(ValueError, match="policy returned actions"):
        environment.evaluate(three_component_policy, episodes=1, image_size=32, episode_len=4)


# ---------------------------------------------------------------- command line

def test_eval_random_prints_every_task_for_three_players(capsys):
    environment.main(["--preset", "smoke", "--eval-random", "--eval-episodes", "2"])
    out = capsys.readouterr().out
    assert out.count("collect_diamond") == 3, out


def test_command_line_without_a_mode_says_which_to_choose():
    with pytest.raises(SystemExit, match="--bench or --eval-random"):
        environment.main([])
