"""Tests of models.py: the trained models shipped in models/ (export, reload, their figures)."""

import json
import os

import pytest
import torch

import models
from conftest import run

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)


@pytest.fixture(scope="module")
def smoke_runs(smoke_tokenizer, tmp_path_factory):
    """tokenizer (the session's) → dynamics → agent → imagine at --preset smoke, as a user runs
    them, in one folder of run folders."""
    runs = tmp_path_factory.mktemp("models") / "runs"
    tok = smoke_tokenizer[1]
    run("dynamics.py", "--preset", "smoke", "--tokenizer", tok, "--out", str(runs / "dynamics"),
        "--eval-seqs", "0")
    run("agent.py", "--preset", "smoke", "--dynamics", str(runs / "dynamics" / "ckpt.pt"),
        "--out", str(runs / "agent"), "--no-baselines", "--eval-episodes", "0")
    run("imagine.py", "--preset", "smoke", "--agent", str(runs / "agent" / "ckpt.pt"),
        "--out", str(runs / "imagine"), "--eval-episodes", "0")
    os.symlink(os.path.dirname(tok), runs / "tokenizer")
    return runs


def test_export_writes_float16_weights_that_reproduce_the_run_and_load_safely(smoke_runs,
                                                                             tmp_path):
    out = str(tmp_path / "models")
    record = models.export(str(smoke_runs), out)
    for name in models.FILES:  # loadable without pickled code, weights in float16
        ckpt = torch.load(os.path.join(out, name), map_location="cpu", weights_only=True)
        assert all(v.dtype == torch.float16 for v in ckpt["model"].values()
                   if v.is_floating_point())
        assert "optimizer" not in ckpt
    run32, run16 = record["float32_run"], record["float16_export"]
    assert abs(run32["tokenizer_psnr"] - run16["tokenizer_psnr"]) < 0.05
    assert abs(run32["agent_action_nll"] - run16["agent_action_nll"]) < 0.01
    assert json.load(open(os.path.join(out, "figures.json")))["float16_export"] == run16
    assert models.check(out) == {k: (v, v) for k, v in run16.items()}


def test_shipped_models_find_their_tokenizer_from_any_working_directory(smoke_runs, tmp_path):
    out = tmp_path / "models"
    models.export(str(smoke_runs), str(out))
    stdout = run(os.path.abspath("play.py"), "--dynamics", str(out / "dynamics.pt"), "--keys",
                 "up", "--out", str(tmp_path / "play"), cwd=str(tmp_path))
    assert "played 1 frames" in stdout


def test_check_fails_when_a_model_no_longer_reproduces_its_figures(smoke_runs, tmp_path):
    out = str(tmp_path / "models")
    models.export(str(smoke_runs), out)
    path = os.path.join(out, "dynamics.pt")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt["model"] = {k: v * 1.5 if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    torch.save(ckpt, path)
    with pytest.raises(SystemExit, match="dynamics_next_frame_psnr"):
        models.check(out)


def test_the_shipped_cpu_models_load_and_reproduce_their_recorded_figures():
    """models/cpu/ as committed: loadable with weights_only=True, the same figures."""
    out = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models",
                       "cpu")
    result = models.check(out)
    assert set(result) == {"tokenizer_psnr", "dynamics_next_frame_psnr", "agent_action_nll"}
