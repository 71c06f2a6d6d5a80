"""dynamics_ladder.py: the controls that say where the world model loses the action signal.

    python -m pytest tests/test_ladder.py
"""

import json
import os

import pytest
import torch

import dynamics as dy
import dynamics_ladder as ladder
from conftest import run

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)


def test_det_inputs_hold_the_previous_frame_at_each_step():
    """Teacher forcing: frame t's tokens hold z_{t−1}, frame 0's hold zeros (hand-written)."""
    clean = torch.arange(3.0).view(1, 3, 1, 1).expand(1, 3, 2, 2)  # frame t is all t
    inputs = ladder.det_inputs(clean)
    assert inputs[0, :, 0, 0].tolist() == [0.0, 0.0, 1.0]


def test_untrained_pixel_cnn_is_the_copy_baseline():
    """Its output layer starts at zero, so before training it repeats the last frame."""
    model = ladder.PixelCNN([5, 2], width=8)
    prev2, prev1 = torch.rand(2, 8, 8, 3), torch.rand(2, 8, 8, 3)
    out = model(prev2, prev1, torch.tensor([[1, 0], [4, 1]]))
    torch.testing.assert_close(out, prev1)


def test_pixel_cnn_output_depends_on_the_action():
    torch.manual_seed(0)
    model = ladder.PixelCNN([5], width=8)
    torch.nn.init.normal_(model.out.weight)  # as if trained: the output layer is not zero
    prev2, prev1 = torch.rand(1, 8, 8, 3), torch.rand(1, 8, 8, 3)
    with torch.no_grad():
        a = model(prev2, prev1, torch.tensor([[0]]))
        b = model(prev2, prev1, torch.tensor([[3]]))
    assert float((a - b).abs().max()) > 1e-4


def test_pixel_rollout_reads_only_the_context_frames():
    """Open loop: changing the true frames after the context must not change the rollout."""
    torch.manual_seed(0)
    model = ladder.PixelCNN([5], width=8)
    torch.nn.init.normal_(model.out.weight, std=0.1)
    frames, acts = torch.rand(2, 6, 8, 8, 3), torch.randint(0, 5, (2, 6, 1))
    future_changed = frames.clone()
    future_changed[:, 3:] = torch.rand(2, 3, 8, 8, 3)
    a = ladder.pixel_rollout(model, frames, acts, 3, 3)
    b = ladder.pixel_rollout(model, future_changed, acts, 3, 3)
    torch.testing.assert_close(a, b)


def test_det_rollout_reads_only_the_context():
    torch.manual_seed(0)
    model = dy.DynamicsModel(4, 6, [5], dim=32, depth=4, heads=4, kv_heads=2, registers=2,
                             context=8).eval()
    ctx, acts = torch.tanh(torch.randn(2, 3, 4, 6)), torch.randint(0, 5, (2, 6, 1))
    z = ladder.det_rollout(model, ctx, acts, 3)
    assert z.shape == (2, 3, 4, 6) and float(z.abs().max()) <= 1


def routed_outputs(clean):
    torch.manual_seed(0)
    model = dy.DynamicsModel(4, 6, [5], dim=32, depth=4, heads=4, kv_heads=2, registers=2,
                             context=8).eval()
    acts = torch.zeros(1, clean.shape[1], 1, dtype=torch.long)
    with torch.no_grad():
        return ladder.routed_forward(model, clean, acts, 58 / 64, torch.Generator().manual_seed(3))


def test_routed_prediction_of_frame_t_reads_the_frames_before_t_only():
    """latent_routed: frame t is predicted from pure noise and the history frames j < t; its own
    clean latents (the target) and later frames never reach it."""
    clean = torch.tanh(torch.randn(1, 4, 4, 6))
    later, earlier = clean.clone(), clean.clone()
    later[:, 2:] = -later[:, 2:]  # frames 2, 3 changed
    earlier[:, 1] = -earlier[:, 1]  # frame 1 changed
    base, a, b = routed_outputs(clean), routed_outputs(later), routed_outputs(earlier)
    torch.testing.assert_close(base[:, :3], a[:, :3])  # frames 0–2 do not see frame 2 on
    assert (base[:, 2] - b[:, 2]).abs().max() > 1e-4  # frame 2 sees frame 1


def test_shuffled_actions_keep_the_context_and_swap_the_future():
    acts = torch.arange(8).view(2, 4, 1)  # window 0: 0 1 2 3, window 1: 4 5 6 7
    out = ladder.shuffled_actions(acts, Tc=2)  # from the action leading into frame 2 (index 1)
    assert out[:, :, 0].tolist() == [[0, 5, 6, 7], [4, 1, 2, 3]]


@pytest.fixture(scope="module")
def smoke_rungs(tmp_path_factory, smoke_tokenizer):
    """Both rungs trained at the smoke preset on the shared smoke tokenizer (tests/conftest.py),
    as a user would run them."""
    tmp = tmp_path_factory.mktemp("ladder")
    _, tok = smoke_tokenizer
    out = {}
    for rung in ladder.RUNGS:
        folder = str(tmp / rung)
        run("dynamics_ladder.py", rung, "--preset", "smoke", "--tokenizer", tok,
            "--out", folder, "--eval-seqs", "4")
        out[rung] = folder
    return out


@pytest.mark.parametrize("rung", list(ladder.RUNGS))
def test_smoke_rung_writes_the_ladder_figures(smoke_rungs, rung):
    with open(os.path.join(smoke_rungs[rung], "summary.json")) as f:
        s = json.load(f)
    for key in ("psnr_model", "psnr_repeat_last", "one_step_psnr", "action_shuffle_gap_db",
                "psnr_changed_model", "psnr_changed_repeat_last", "tile_acc_model_first"):
        assert key in s, key


def test_table_prints_a_row_per_run(smoke_rungs):
    runs = ",".join(smoke_rungs.values())
    out = run("dynamics_ladder.py", "table", runs)
    assert len([line for line in out.splitlines() if "rollout" in line]) == len(smoke_rungs)
