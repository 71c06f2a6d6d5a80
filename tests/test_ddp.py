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
def smoke(tmp_path_factory, smoke_tokenizer):
    """A folder for this module's runs, and the shared smoke data and tokenizer (conftest.py)."""
    return (tmp_path_factory.mktemp("ddp"), *smoke_tokenizer)


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


def test_two_rank_agent_run_resumed_equals_one_rank_with_the_whole_batch(smoke,
                                                                         resumed_two_rank_run):
    """agent.py, global batch 4 (2 uniform + 2 task-relevant rows): 2 ranks, interrupted after
    step 1 and resumed to step 2, against 1 rank for 2 steps. Each rank holds one row of each
    kind, and its BC and reward terms are masked means over unequal target counts (rank_weight
    makes them add up to the global mean: without it the weights differ by ~3e-4)."""
    tmp = smoke[0]
    _, dyn = resumed_two_rank_run
    args = ["agent.py", "--preset", "smoke", "--dynamics", os.path.join(dyn, "ckpt.pt"),
            "--eval-episodes", "0", "--steps", "2"]
    two, one = str(tmp / "agent_two"), str(tmp / "agent_one")
    torchrun(2, *args, "--out", two, "--stop-at", "1")
    torchrun(2, *args, "--out", two, "--resume")
    run(*args, "--out", one)
    assert max_difference(os.path.join(two, "ckpt.pt"), os.path.join(one, "ckpt.pt")) < 1e-5


def test_a_batch_the_ranks_cannot_split_evenly_is_refused(monkeypatch):
    monkeypatch.setattr(common, "world_size", lambda: 2)
    assert common.check_batch("--batch", 4) == 2
    with pytest.raises(ValueError, match="--batch = 3 rows .* divisible by the 2 ranks"):
        common.check_batch("--batch", 3)


def test_shard_gives_each_rank_every_second_row(monkeypatch):
    monkeypatch.setattr(common, "world_size", lambda: 2)
    x = torch.arange(8).view(4, 2)
    monkeypatch.setattr(common, "rank", lambda: 1)
    assert torch.equal(common.shard({"x": x, "none": None})["x"], x[[1, 3]])
    monkeypatch.setattr(common, "rank", lambda: 0)
    assert torch.equal(common.shard(x), x[[0, 2]])


def test_shard_gives_each_rank_its_share_of_each_part_of_a_batch(monkeypatch):
    """agent.py's batch: 4 uniform rows, then 2 relevant ones; each of 2 ranks gets 2 + 1."""
    monkeypatch.setattr(common, "world_size", lambda: 2)
    relevant = torch.tensor([False] * 4 + [True] * 2)
    for r in (0, 1):
        monkeypatch.setattr(common, "rank", lambda: r)
        assert common.shard(relevant).tolist() == [False, False, True]


def test_rank_weight_is_one_in_a_single_process():
    assert common.rank_weight(torch.tensor(7)) == 1.0


def test_imagine_refuses_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="imagine.py runs in one process"):
        common.single_process_only("imagine.py")


def test_rank0_first_runs_the_block_on_rank_0_before_the_others(monkeypatch):
    """The two ranks' passes through `with rank0_first()`, as each sees them: rank 0 runs the
    block, then meets rank 1 at the barrier; rank 1 waits there first, then runs it."""
    events = []
    monkeypatch.setattr(common.dist, "barrier", lambda: events.append("barrier"))
    monkeypatch.setattr(common, "world_size", lambda: 2)
    for r in (0, 1):
        monkeypatch.setattr(common, "rank", lambda: r)
        with common.rank0_first():
            events.append(f"block on rank {r}")
    assert events == ["block on rank 0", "barrier", "barrier", "block on rank 1"]
