"""Bring your own video, end to end: a dataset recorded from a gymnasium-style environment by the
recipe of docs/own_data.md, and one imported from ffmpeg-named frames, each passes
`data.py --check` and trains the tokenizer and the dynamics at the smoke preset; and the stages'
messages about what is missing name commands that work as written. data.py's own checks:
tests/test_data.py."""

import os
import re
from dataclasses import asdict

import numpy as np
import pytest
from PIL import Image

import agent
import common
import data
import dynamics
import tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Discrete:
    """gymnasium.spaces.Discrete in miniature: n actions, sample() draws one."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.rng = n, np.random.default_rng(seed)

    def sample(self) -> int:
        return int(self.rng.integers(self.n))


class SquareEnv:
    """A gymnasium-style environment (reset, step, render, action_space): a white 4×4 square on a
    dark 32×32 field, moved 4 pixels by the action (0 stay, 1 left, 2 right, 3 up, 4 down);
    reward 1 the first time it enters the top-left corner; truncated after 16 steps."""
    MOVES = [(0, 0), (0, -4), (0, 4), (-4, 0), (4, 0)]  # (dy, dx) per action

    def __init__(self):
        self.action_space = Discrete(len(self.MOVES))

    def reset(self, seed=None):
        self.pos = np.random.default_rng(seed).integers(0, 8, 2) * 4  # (y, x) of the square
        self.t, self.paid = 0, False
        return self.render(), {}

    def step(self, action: int):
        self.pos = np.clip(self.pos + self.MOVES[action], 0, 28)
        self.t += 1
        reward = float(not self.paid and not self.pos.any())  # the corner, once
        self.paid = self.paid or reward > 0
        return self.render(), reward, False, self.t >= 16, {}

    def render(self) -> np.ndarray:
        frame = np.full((32, 32, 3), 40, np.uint8)  # (H, W, 3)
        y, x = self.pos
        frame[y:y + 4, x:x + 4] = 255
        return frame


def readme_recipe() -> str:
    """The python block of docs/own_data.md (linked from the README), as a user copies it."""
    with open(os.path.join(ROOT, "docs", "own_data.md")) as f:
        section = f.read()
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    return code


def train_smoke(root: str, out: str, *flags: str) -> dict:
    """The tokenizer, then the dynamics, at the smoke preset on dataset `root`: their summaries."""
    tok = tokenizer.train(common.parse_args(tokenizer.Args, tokenizer.PRESETS, [
        "--preset", "smoke", "--data", root, "--out", os.path.join(out, "tokenizer"), *flags]))
    dyn = dynamics.train(common.parse_args(dynamics.Args, dynamics.PRESETS, [
        "--preset", "smoke", "--tokenizer", os.path.join(out, "tokenizer", "ckpt.pt"),
        "--out", os.path.join(out, "dynamics")]))
    return {"tokenizer": tok, "dynamics": dyn}


def errors_of(root: str) -> list[str]:
    """The check's errors (its alignment probe is tested on its own, below)."""
    return [text for level, text in data.check_dataset(root, probe=False) if level == "error"]


# ---------------------------------------------------------------- a gymnasium-style environment

@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> str:
    """The recipe of docs/own_data.md run as written (env = SquareEnv()), in an empty folder."""
    cwd = tmp_path_factory.mktemp("gym")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        exec(readme_recipe(), {"env": SquareEnv()})
    return str(cwd / "data" / "mygame")


def test_recipe_writes_the_contract_arrays(recorded):
    episode = next(data.iter_episodes(recorded, "all"))
    T = len(episode["frames"])
    assert episode["actions"].shape == (T, 1) and episode["rewards"].shape == (T, 1)
    assert episode["rewards"][0, 0] == 0  # row 0: nothing was entered yet


def test_recipe_dataset_passes_the_check(recorded):
    assert errors_of(recorded) == []


def test_recipe_actions_are_found_at_their_true_alignment(recorded):
    labeled = [e for e in data.iter_episodes(recorded, "all")][:16]
    told = data.alignment_probe(labeled, data.load_meta(recorded)["action_components"])
    means = {shift: float(v.mean()) for shift, v in told.items()}
    assert max(means, key=means.get) == 0, means


def test_recipe_dataset_trains_at_the_smoke_preset(recorded, tmp_path, one_thread):
    summaries = train_smoke(recorded, str(tmp_path), "--image-size", "64")
    assert summaries["tokenizer"]["latent_cache_frames"] > 0
    assert "action_shuffle_gap_db" in summaries["dynamics"]  # the actions reached the model


# ---------------------------------------------------------------- frames named by ffmpeg (%d.png)

@pytest.fixture(scope="module")
def ffmpeg_frames(tmp_path_factory) -> dict:
    """Three episodes of SquareEnv saved as clip<e>/frame_1.png … frame_17.png (ffmpeg's
    `frame_%d.png`: no zero padding), then imported by data.py --from-frames."""
    tmp, env, episodes = tmp_path_factory.mktemp("ffmpeg"), SquareEnv(), []
    for e in range(3):
        frames = [env.reset(seed=e)[0]]
        for _ in range(16):
            frames.append(env.step(env.action_space.sample())[0])
        episodes.append(np.stack(frames))  # (17, 32, 32, 3)
        os.makedirs(tmp / "clips" / f"clip{e}")
        for t, frame in enumerate(frames):
            Image.fromarray(frame).save(tmp / "clips" / f"clip{e}" / f"frame_{t + 1}.png")
    out = str(tmp / "mine")
    data.main(["--from-frames", str(tmp / "clips"), "--out", out])
    return {"out": out, "episodes": episodes}


def test_ffmpeg_frames_import_in_numeric_order(ffmpeg_frames):
    imported = data.load_frames(os.path.join(ffmpeg_frames["out"], "ep000000.npz"))
    np.testing.assert_array_equal(imported, ffmpeg_frames["episodes"][0])


def test_ffmpeg_import_passes_the_check(ffmpeg_frames):
    assert errors_of(ffmpeg_frames["out"]) == []


def test_unlabeled_video_trains_and_says_which_figures_do_not_apply(ffmpeg_frames, tmp_path,
                                                                    capsys, one_thread):
    summaries = train_smoke(ffmpeg_frames["out"], str(tmp_path))
    printed = capsys.readouterr().out
    assert "action_shuffle_gap_db" not in summaries["dynamics"]
    assert "does not apply" in printed and not re.search(r"\bnan\b", printed)


# ---------------------------------------------------------------- messages name working commands

def test_missing_cpu_tokenizer_names_the_cpu_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for path in ("runs/cpu/tokenizer/ckpt.pt", os.path.abspath("runs/cpu/tokenizer/ckpt.pt")):
        with pytest.raises(FileNotFoundError, match="run `python tokenizer.py --preset cpu`"):
            tokenizer.load_tokenizer(path)


def test_truncated_parent_checkpoint_advice_keeps_the_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("runs/smoke/dynamics")
    with open("runs/smoke/dynamics/ckpt.pt", "wb") as f:
        f.write(b"PK\x03\x04 cut off")  # what an interrupted copy leaves
    with pytest.raises(RuntimeError, match="run `python dynamics.py --preset smoke` again"):
        agent.load_dynamics("runs/smoke/dynamics/ckpt.pt")


def test_image_size_mismatch_names_both_ways_out(recorded, tmp_path):
    args = common.parse_args(tokenizer.Args, tokenizer.PRESETS, [
        "--preset", "smoke", "--data", recorded, "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="holds 64×64 frames") as err:
        tokenizer.train(args)
    assert "Pass --image-size 64" in str(err.value)
    assert "(`python data.py --preset smoke`)" in str(err.value)  # a 32×32 dataset of its preset


def test_custom_run_folder_advice_repeats_the_run_flags(tmp_path):
    run_dir = str(tmp_path / "tok")
    args = common.parse_args(tokenizer.Args, tokenizer.PRESETS,
                             ["--preset", "smoke", "--data", "data/mine", "--out", run_dir])
    os.makedirs(run_dir)
    common.write_json(os.path.join(run_dir, "args.json"), asdict(args) | {"dtype": "fp32"})
    with pytest.raises(FileNotFoundError) as err:
        tokenizer.load_tokenizer(os.path.join(run_dir, "ckpt.pt"))
    assert f"python tokenizer.py --preset smoke --data data/mine --out {run_dir}" in str(err.value)


@pytest.mark.parametrize("stage, flags", [(tokenizer, ["--steps", "0"]),
                                          (dynamics, ["--steps", "-5"]),
                                          (tokenizer, ["--batch-size", "0"]),
                                          (dynamics, ["--batch-long", "-1"]),
                                          (agent, ["--lr", "0"])])
def test_bad_numbers_stop_a_stage_before_it_starts(stage, flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        common.parse_args(stage.Args, stage.PRESETS, ["--preset", "smoke", *flags])
    assert exit_info.value.code == 2 and "it must be" in capsys.readouterr().err


def test_tokenizer_resume_keeps_each_logged_step_once(tmp_path, one_thread):
    """Stopped at step 4 after the checkpoint of step 3, then resumed: step 4 is logged once."""
    argv = ["--preset", "smoke", "--data", os.path.join(ROOT, "data", "smoke"),
            "--out", str(tmp_path), "--eval-every", "3"]
    data.ensure_dataset(argv[3])
    tokenizer.train(common.parse_args(tokenizer.Args, tokenizer.PRESETS, [*argv, "--stop-at", "4"]))
    tokenizer.train(common.parse_args(tokenizer.Args, tokenizer.PRESETS, [*argv, "--resume"]))
    with open(tmp_path / "metrics.jsonl") as f:
        logged = [line for line in f if '"mse"' in line]  # the training lines, not the evals
    steps = [int(re.search(r'"step": (\d+)', line).group(1)) for line in logged]
    assert steps == sorted(set(steps)), steps

