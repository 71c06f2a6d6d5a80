"""Shared test plumbing: the repository root, running a stage script as a user would, one thread."""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, cwd=ROOT):
    """`python *args` in the repository; fails with the script's output.

    One thread: the smoke models are tiny, and two threads on a busy 2-core machine thrash
    (×5 slower).
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, f"{' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture
def one_thread():
    """The models in the tests are tiny: one thread is faster than two. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smoke_tokenizer(tmp_path_factory):
    """Smoke data and a smoke tokenizer trained once for the whole test session, as a user would
    (no LPIPS: its backbone is not what these tests check). Returns (data folder, checkpoint).
    Tests write their own runs into folders of their own; these two stay read-only."""
    tmp = tmp_path_factory.mktemp("smoke_tokenizer")
    data_dir, tok = str(tmp / "data"), str(tmp / "tok")
    run("data.py", "--preset", "smoke", "--out", data_dir)
    run("tokenizer.py", "--preset", "smoke", "--data", data_dir, "--out", tok,
        "--lpips-weight", "0")
    return data_dir, os.path.join(tok, "ckpt.pt")
