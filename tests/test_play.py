"""Tests of play.py (§4.2: playing inside the world model, the interaction test), one behaviour
each. The world-model passes are checked against an uncached recompute; the script planner
against the real environment; the command line end to end at --preset smoke."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import agent as ag
import common
import dynamics as dy
import environment as env
import play
import tokenizer as tk
from conftest import run

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)

CLASSES = [n for _, n in env.ACTION_COMPONENTS]  # the built-in world's actions


def tiny_world(seed=0, window=8):
    """A random 32×32 tokenizer and a random dynamics model over its packed latents."""
    torch.manual_seed(seed)
    tok = tk.Tokenizer(image_size=32, patch=8, width=32, depth=2, heads=2, n_latents=8,
                       latent_dim=4, window=4).eval()
    dyn = dy.DynamicsModel(latent_tokens=4, latent_dim=8, action_classes=CLASSES, dim=32,
                           depth=4, heads=4, kv_heads=2, registers=2, context=window,
                           mlp_ratio=2.0, k_max=64).eval()
    return tok, dyn


def test_parse_keys_reads_names_combinations_repeats_and_agent_turns():
    got = play.parse_keys("right*2 up+use, place craft noop agent*2")
    want = [[4, 0, 0, 0], [4, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0],
            None, None]
    assert [None if g is None else g.tolist() for g in got] == want


@pytest.mark.parametrize("script, says", [("jump", "unknown key 'jump'"),
                                          ("up+left", "two moves"),
                                          ("use*0", "n ≥ 1")])
def test_parse_keys_rejects_bad_scripts_with_an_example(script, says):
    with pytest.raises(SystemExit) as e:
        play.parse_keys(script)
    assert says in str(e.value) and "--keys \"" in str(e.value)


def test_dream_cached_steps_equal_an_uncached_recompute():
    """Dream (KV caches, one frame at a time) against the same process recomputed from scratch:
    the whole history at τ_ctx through the model at every denoising step, the same noise."""
    tok, dyn = tiny_world()
    k, T_c = 2, 3
    envs, frames, acts = play.real_start([play.world_seed(0, i) for i in range(2)], 32, T_c)
    steps = np.array([[[4, 0, 0, 0], [0, 1, 0, 0]], [[1, 0, 0, 0], [0, 0, 1, 0]]])  # (B, 2, A)
    dream = play.Dream(dyn, tok, k, 0.9, seed=5, device="cpu")
    dream.start(frames, acts)
    got = []
    for t in range(steps.shape[1]):
        dream.step(steps[:, t])
        got.append(dream.z)
    # the reference: the same generator draws in the same order, nothing cached
    gen = torch.Generator().manual_seed(5)
    tau_c = dy.context_signal_level(0.9, 64)
    with torch.no_grad():
        clean = tk.pack(tok.encode(torch.from_numpy(frames)))  # (B, T_c, N_z, C_z)
        # a_t is taken at frame t: the player's first key replaces the last context action
        # (the trailing zeros are never read: the last frame's action leads past the end)
        all_acts = torch.cat([torch.from_numpy(acts[:, :-1]), torch.from_numpy(steps),
                              torch.zeros_like(torch.from_numpy(steps[:, :1]))], 1)  # (B, T, A)
        prev, valid = dy.shift_actions(all_acts)  # a_{t−1} at frame t
        history = []
        for t in range(T_c):
            noise = torch.randn(clean[:, t:t + 1].shape, generator=gen)
            history.append(dy.corrupt(noise, clean[:, t:t + 1], tau_c))
        want = []
        for t in range(T_c, T_c + steps.shape[1]):
            def f(z, tau, d):
                x = torch.cat(history + [z], 1)  # (B, t + 1, N_z, C_z)
                taus = torch.full(x.shape[:2], tau_c)
                taus[:, -1] = tau
                ds = torch.full(x.shape[:2], 1 / 64)
                ds[:, -1] = d
                return dyn(x, taus, ds, prev[:, :t + 1], valid[:, :t + 1])[:, -1:]
            z = dy.sample_frame(f, torch.randn(clean[:, :1].shape, generator=gen), k)
            want.append(z)
            history.append(dy.corrupt(torch.randn(z.shape, generator=gen), z, tau_c))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_dream_is_the_same_with_the_agent_token():
    """The world tokens never see the agent token: an agent checkpoint dreams the same frames."""
    tok, dyn = tiny_world()
    agent = ag.AgentModel(dyn, n_tasks=len(env.TASKS), head_hidden=16, mtp=2, bins=255).eval()
    _, frames, acts = play.real_start([play.world_seed(0, 0)], 32, 2)
    out = []
    for model in (dyn, agent):
        dream = play.Dream(model, tok, 4, 0.9, seed=3, device="cpu")
        shown = [dream.start(frames, acts)] + [dream.step(np.array([[m, 0, 0, 0]]))
                                                for m in (1, 4, 0)]
        out.append(np.stack(shown))
    np.testing.assert_array_equal(out[0], out[1])


def test_agent_acts_in_the_dream_with_valid_actions():
    tok, dyn = tiny_world()
    agent = ag.AgentModel(dyn, n_tasks=len(env.TASKS), head_hidden=16, mtp=2, bins=255).eval()
    _, frames, acts = play.real_start([play.world_seed(0, 0)], 32, 2)
    dream = play.Dream(agent, tok, 4, 0.9, seed=3, device="cpu")
    dream.start(frames, acts)
    for _ in range(3):
        a = dream.act()
        assert a.shape == (1, len(CLASSES)) and ((a >= 0) & (a < CLASSES)).all()
        dream.step(a)


@pytest.fixture
def calm_world(monkeypatch):
    """The real environment without its chance events: the creature stays put and steals
    nothing, no tree regrows."""
    for name in ("P_CREATURE_MOVE", "P_STEAL", "P_REGROW"):
        monkeypatch.setattr(env, name, 0.0)


@pytest.mark.parametrize("task", list(play.TASKS))
def test_planned_scripts_reach_their_task_in_a_calm_real_world(calm_world, task):
    """Without chance events, every planned script does what it says in the real environment,
    and task_done reads it off the frame (and not off the frame before the script)."""
    for i in range(20):
        e = env.Env(32, episode_len=1 << 30)
        first = e.reset(play.world_seed(1, i))
        script = play.plan_script(first, task)
        assert script is not None
        for a in script:
            last = e.step(a)[0]
        assert play.task_done(first[None], last[None], task)[0], f"world {i}: {task} failed"
        assert not play.task_done(first[None], first[None], task)[0]


@pytest.mark.parametrize("task", list(play.TASKS))
def test_the_player_who_sees_the_frames_reaches_its_task_in_a_calm_real_world(calm_world, task):
    """Closed loop: player_action on each real frame reaches the task within the open-loop
    script's length (the closed-loop test allows twice that), then idles."""
    for i in range(20):
        e = env.Env(32, episode_len=1 << 30)
        first = now = e.reset(play.world_seed(1, i))
        budget = len(play.plan_script(first, task))
        for _ in range(budget):
            now = e.step(play.player_action(now, first, task))[0]
        assert play.task_done(first[None], now[None], task)[0], f"world {i}: {task} failed"
        assert (play.player_action(now, first, task) == play.NOOP).all()


def test_tree_marks_see_a_crack_and_a_felling_in_a_real_chop(calm_world):
    """A real chop (a planned script): a crack is seen and the last frame has one tree fewer; the
    same world idling: neither."""
    e = env.Env(32, episode_len=1 << 30)
    first = e.reset(play.world_seed(1, 0))
    chop = np.stack([e.step(a)[0] for a in play.plan_script(first, "chop_tree")])[None]
    idle = np.repeat(first[None, None], len(chop[0]), 1)  # (1, L, H, W, 3)
    end = np.array([len(chop[0]) - 1])
    assert [m.tolist() for m in play.tree_marks(first[None], chop, end)] == [[True], [True]]
    assert [m.tolist() for m in play.tree_marks(first[None], idle, end)] == [[False], [False]]


def layout_world(agent, facing, trees, wood=0):
    """A grass world with the agent at `agent` facing 0…3 (up, down, left, right), trees at the
    listed tiles, the creature in the bottom-right corner, `wood` in the inventory: its frame."""
    e = env.Env(32, episode_len=1 << 30)
    e.reset(0)
    e.grid[:] = env.GRASS
    for cell in trees:
        e.grid[cell] = env.TREE
    e.agent, e.facing, e.creature = agent, facing, (env.ROWS - 1, env.COLS - 1)
    e.inv = [0] * len(env.INVENTORY)
    e.inv[env.WOOD] = wood
    e.progress, e.mining = 0, None
    return e.render()


@pytest.mark.parametrize("facing, trees, wood, task, key", [
    (3, [(2, 3)], 0, "chop_tree", [0, 1, 0, 0]),     # facing the tree: use
    (0, [(2, 3)], 0, "chop_tree", [4, 0, 0, 0]),     # beside it, facing up: turn right
    (3, [(2, 5)], 0, "chop_tree", [4, 0, 0, 0]),     # two tiles away: step right
    (3, [(2, 5)], 2, "place_table", [0, 0, 1, 0]),   # wood for a table, grass ahead: place
    (3, [(2, 5)], 1, "place_table", [4, 0, 0, 0]),   # one wood short: walk to the tree
])
def test_player_action_against_hand_laid_worlds(facing, trees, wood, task, key):
    start = layout_world((2, 2), facing, trees, wood=0)
    frame = layout_world((2, 2), facing, trees, wood=wood)
    if task == "place_table":  # the wood was there at the start: placing is what remains
        start = frame
    assert play.player_action(frame, start, task).tolist() == key


def test_task_done_counts_wood_and_tables_gained_since_the_start():
    e = env.Env(32, episode_len=1 << 30)
    start = e.reset(play.world_seed(0, 0))[None]
    e.inv[env.WOOD] = 1
    wood = e.render()[None]
    assert play.task_done(start, wood, "chop_tree")[0]
    assert not play.task_done(wood, wood, "chop_tree")[0]  # wood all along is no success
    assert not play.task_done(start, wood, "place_table")[0]
    e.grid[tuple(np.argwhere(e.grid == env.GRASS)[0])] = env.TABLE
    table = e.render()[None]
    assert play.task_done(wood, table, "place_table")[0]
    assert not play.task_done(table, table, "place_table")[0]


def test_shows_table_cost_reads_the_wood_count_on_screen():
    e = env.Env(32, episode_len=1 << 30)
    e.reset(play.world_seed(0, 0))
    counts = range(env.MAX_COUNT + 1)
    frames = []
    for n in counts:
        e.inv[env.WOOD] = n
        frames.append(e.render())
    shown = play.shows_table_cost(np.stack(frames))
    assert shown.tolist() == [n >= env.TABLE_COST for n in counts]


# ---- The command line at --preset smoke ----------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_dynamics(smoke_tokenizer, tmp_path_factory):
    """A smoke world model on the session's smoke tokenizer (tests/conftest.py)."""
    out = str(tmp_path_factory.mktemp("play") / "dyn")
    run("dynamics.py", "--preset", "smoke", "--tokenizer", smoke_tokenizer[1], "--out", out,
        "--eval-seqs", "0")
    return os.path.join(out, "ckpt.pt")


def test_scripted_play_writes_a_gif_of_dream_and_real_side_by_side(smoke_dynamics, tmp_path):
    gif = str(tmp_path / "p.gif")
    out = run("play.py", "--preset", "smoke", "--dynamics", smoke_dynamics, "--keys",
              "right use*2", "--real", "--gif", gif, "--scale", "2")
    im = Image.open(gif)
    assert im.n_frames == 1 + 3  # the dream's start frame, then one per key
    assert im.size == ((32 + 1 + 32) * 2, 32 * 2)  # dream | gap | real, scaled by 2
    assert "frames/s" in out and "inventory in the real environment" in out


def test_without_a_display_play_says_so_and_shows_the_script_command(smoke_dynamics, tmp_path):
    environ = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    r = subprocess.run([sys.executable, "play.py", "--preset", "smoke", "--dynamics",
                        smoke_dynamics, "--out", str(tmp_path)], cwd=os.path.dirname(
                            os.path.dirname(os.path.abspath(__file__))),
                       capture_output=True, text=True, env={**environ, "MPLBACKEND": "agg"})
    assert r.returncode != 0 and "no display" in r.stderr and "--keys" in r.stderr


@pytest.fixture(scope="module")
def interaction(smoke_dynamics, tmp_path_factory):
    """`python play.py --interaction` on the smoke world model: its interaction.json."""
    out = tmp_path_factory.mktemp("interaction")
    run("play.py", "--preset", "smoke", "--dynamics", smoke_dynamics, "--interaction",
        "--out", str(out))
    return json.load(open(out / "interaction.json"))


def test_interaction_test_writes_both_tasks(interaction):
    result = interaction
    for task in play.TASKS:
        for r in (result["tasks"][task], result["closed_loop"][task]):  # open and closed loop
            assert r["worlds"] + r["no_plan"] == 4
            assert 0 <= r["dream_success"] <= 1 and 0 <= r["real_success"] <= 1
            assert 0 <= r["tokenizer_success"] <= 1


def test_interaction_test_reads_the_table_cost_off_the_frame_before_the_place_press(
        interaction):
    """Every real world where the table stands had the 2 wood on screen one frame before: read
    any later (after the press spends them) and this fails."""
    r = interaction["tasks"]["place_table"]
    shown = r["wood_for_table_shown"]
    assert shown["real"] >= r["real_success"] > 0
    assert all(0 <= shown[k] <= 1 for k in ("tokenizer", "dream"))


def test_window_keys_make_frames_and_take_control_back_from_the_agent(monkeypatch, tmp_path):
    """The window's key handling on a non-interactive canvas: a key press makes a frame with
    its action, Tab hands control to the agent (the timer then steps with the agent's action),
    any key takes it back, and the GIF holds every frame shown."""
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt
    from matplotlib.backend_bases import FigureCanvasBase, KeyEvent

    class Timer:  # the timer of a real backend, fired by hand
        def __init__(self):
            self.callbacks = []

        def add_callback(self, f):
            self.callbacks.append(f)

        def start(self):
            timers.append(self)

    timers = []
    monkeypatch.setattr(FigureCanvasBase, "new_timer", lambda self, *a, **k: Timer())
    tok, dyn = tiny_world()
    agent = ag.AgentModel(dyn, n_tasks=len(env.TASKS), head_hidden=16, mtp=2, bins=255).eval()
    dream = play.Dream(agent, tok, 2, 0.9, seed=0, device="cpu")
    actions = []
    step = dream.step
    monkeypatch.setattr(dream, "step", lambda a: actions.append(a[0].tolist()) or step(a))

    def show():
        canvas = plt.gcf().canvas
        for key in ("right", "tab", None, "e", None, "escape"):
            if key is None:  # a timer tick
                timers[0].callbacks[0]()
                continue
            for name in ("key_press_event", "key_release_event"):
                canvas.callbacks.process(name, KeyEvent(name, canvas, key))

    monkeypatch.setattr(plt, "show", show)
    a = common.parse_args(play.Args, play.PRESETS,
                          ["--preset", "smoke", "--gif", str(tmp_path / "w.gif")])
    play.play_window(a, dream, 32)
    assert len(actions) == 3  # right; the agent's action on the tick; use (and no agent after it)
    assert actions[0] == [4, 0, 0, 0] and actions[2] == [0, 1, 0, 0]
    assert Image.open(tmp_path / "w.gif").n_frames == 1 + 3

