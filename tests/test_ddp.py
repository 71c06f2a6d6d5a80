"""Data parallelism under torchrun (common.py "Data parallelism"), on CPU with the gloo backend.

G ranks × B/G rows must train exactly like 1 rank × B rows (up to the order of float sums): every
rank draws the global batch from the same (seed, step) streams and keeps its own rows, and the
gradients are averaged after backward. The runs are real `torchrun` launches of the stage scripts
with 2 processes, so the process group, the rank-0 guards and resume are what a user runs.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import common
from conftest import ROOT, run

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)


def torchrun(ranks: int, *args):
    """`torchrun --standalone --nproc_per_node ranks *args` in the repository, one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={ranks}", *args]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, f"{' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def max_difference(path_a: str, path_b: str, key: str = "model") -> float:
    a = torch.load(path_a, weights_only=True)[key]
    b = torch.load(path_b, weights_only=True)[key]
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Smoke data and a smoke tokenizer (no LPIPS: its backbone is not what is tested here)."""
    tmp = tmp_path_factory.mktemp("ddp")
    data_dir, tok = str(tmp / "data"), str(tmp / "tok")
    run("data.py", "--preset", "smoke", "--out", data_dir)
    run("tokenizer.py", "--preset", "smoke", "--data", data_dir, "--out", tok,
        "--lpips-weight", "0")
    return tmp, data_dir, os.path.join(tok, "ckpt.pt")


def test_two_ranks_tokenizer_step_equals_one_rank_with_the_whole_batch(smoke):
    """One step, global batch 2: 2 ranks × 1 row give the weights of 1 rank × 2 rows."""
    tmp, data_dir, _ = smoke
    args = ["tokenizer.py", "--preset", "smoke", "--data", data_dir, "--lpips-weight", "0",
            "--steps", "1", "--stop-at", "1"]  # step 1 is the last: it saves, then stops
    run(*args, "--out", str(tmp / "tok1"))
    torchrun(2, *args, "--out", str(tmp / "tok2"))
    diff = max_difference(str(tmp / "tok1" / "ckpt.pt"), str(tmp / "tok2" / "ckpt.pt"))
    assert diff < 1e-5, diff


def test_two_ranks_dynamics_steps_equal_one_rank_with_the_whole_batch(smoke):
    """Two steps (the second a long batch of 2 rows) with every row bootstrapped (--flow-frac 0):
    the half-step passes under no_grad run on each rank's rows, and the weights still match."""
    tmp, _, tok = smoke
    args = ["dynamics.py", "--preset", "smoke", "--tokenizer", tok, "--eval-seqs", "0",
            "--flow-frac", "0", "--steps", "2", "--stop-at", "2"]
    run(*args, "--out", str(tmp / "dyn1"))
    torchrun(2, *args, "--out", str(tmp / "dyn2"))
    diff = max_difference(str(tmp / "dyn1" / "ckpt.pt"), str(tmp / "dyn2" / "ckpt.pt"))
    assert diff < 1e-5, diff


@pytest.fixture(scope="module")
def resumed_two_rank_run(smoke):
    """A 2-rank dynamics smoke run interrupted at step 3 and resumed to 6, and the same run
    uninterrupted on 1 rank. Returns the two run folders."""
    tmp, _, tok = smoke
    args = ["dynamics.py", "--preset", "smoke", "--tokenizer", tok, "--eval-seqs", "0"]
    two, one = str(tmp / "two_ranks"), str(tmp / "one_rank")
    torchrun(2, *args, "--out", two, "--stop-at", "3")
    torchrun(2, *args, "--out", two, "--resume")
    run(*args, "--out", one)
    return two, one


def test_two_rank_run_resumed_equals_the_uninterrupted_one_rank_run(resumed_two_rank_run):
    two, one = resumed_two_rank_run
    a, b = os.path.join(two, "ckpt.pt"), os.path.join(one, "ckpt.pt")
    assert torch.load(a, weights_only=True)["step"] == 6
    assert max_difference(a, b) < 1e-5
    assert max_difference(a, b, "ema") < 1e-5


def test_two_rank_run_logs_each_step_once_and_writes_the_summary(resumed_two_rank_run):
    """Only rank 0 logs: metrics.jsonl holds each log step once, as a single process's does."""
    two, one = resumed_two_rank_run
    steps = {}
    for run_dir in (two, one):
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            steps[run_dir] = [json.loads(line)["step"] for line in f]
    assert steps[two] == steps[one] == [2, 4, 6]
    with open(os.path.join(two, "summary.json")) as f:
        assert json.load(f)["steps"] == 6


def test_a_batch_the_ranks_cannot_split_evenly_is_refused(monkeypatch):
    monkeypatch.setattr(common, "world_size", lambda: 2)
    assert common.check_batch("--batch", 4) == 2
    with pytest.raises(ValueError, match="--batch 3 is the global batch .* divisible by the 2"):
        common.check_batch("--batch", 3)


def test_shard_gives_each_rank_its_own_rows(monkeypatch):
    monkeypatch.setattr(common, "world_size", lambda: 2)
    x = torch.arange(8).view(4, 2)
    monkeypatch.setattr(common, "rank", lambda: 1)
    assert torch.equal(common.shard({"x": x, "none": None})["x"], x[2:])
    monkeypatch.setattr(common, "rank", lambda: 0)
    assert torch.equal(common.shard(x), x[:2])


def test_the_stages_that_are_not_data_parallel_refuse_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="agent.py runs in one process"):
        common.single_process_only("agent.py")
