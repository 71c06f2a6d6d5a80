"""Tests of the moving-pixel figures and the collapse alarm (tokenizer_eval.py, dynamics_eval.py).

A pixel changes when the real frame differs from the previous one by more than 8/255; PSNR is
then scored on the changed pixels and on the static rest. The alarm must fire on a model whose
frames do not move where the real ones do, and stay quiet on one that follows them.
"""

import math

import numpy as np
import torch
import torch.nn as nn

import dynamics
import tokenizer_eval as te
import dynamics_eval as de


def one_pixel_moves():
    """Two 4×4 grey frames (2, 4, 4, 3): a white pixel moves from (1, 1) to (1, 2)."""
    frames = torch.full((2, 4, 4, 3), 0.5)
    frames[0, 1, 1] = 1.0
    frames[1, 1, 2] = 1.0
    return frames


def moving_square_videos(n: int, T: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    """n videos (n, T, H, W, 3) uint8: a random static background of 4-pixel tiles and a white
    2×2 square that moves one pixel right per frame (1.6 % of the pixels change per frame)."""
    g = np.random.default_rng(seed)
    tiles = g.integers(0, 200, (n, size // 4, size // 4, 3))
    background = tiles.repeat(4, 1).repeat(4, 2)  # (n, H, W, 3)
    video = np.repeat(background[:, None], T, 1).astype(np.uint8)  # (n, T, H, W, 3)
    for t in range(T):
        video[:, t, 6:8, 3 + t:5 + t] = 255
    return torch.from_numpy(video)


class Loader:
    """Stands in for data.SequenceDataset: `rng` and sample(B)["frames"]."""

    def __init__(self):
        self.rng = np.random.default_rng(0)

    def sample(self, batch_size: int) -> dict:
        return {"frames": moving_square_videos(batch_size, seed=int(self.rng.integers(1000)))}


class IdentityTokenizer(nn.Module):
    """Latents are the pixels themselves: a perfect reconstruction."""

    def encode(self, frames):
        x = frames.float() / 255  # (B, T, H, W, 3)
        return x.flatten(2, 3)  # (B, T, H·W, 3)

    def decode(self, z):
        B, T, N, C = z.shape
        side = math.isqrt(N)
        return z.reshape(B, T, side, side, C)  # (B, T, H, W, 3)


class FrozenDecoderTokenizer(IdentityTokenizer):
    """A decoder that ignores its latents: the same grey frame for every input."""

    def decode(self, z):
        B, T, N, C = z.shape
        side = math.isqrt(N)
        return torch.full((B, T, side, side, C), 0.4)  # (B, T, H, W, 3)


class FirstFrameTokenizer(IdentityTokenizer):
    """Latents that never change: every frame is encoded as the window's first frame. The
    background is reproduced exactly, the moving square stays where it started."""

    def encode(self, frames):
        z = super().encode(frames)  # (B, T, H·W, 3)
        return z[:, :1].expand_as(z)  # (B, T, H·W, 3)


def tokenizer_figures(model):
    return te.moving_pixel_figures(model, Loader(), batches=2, batch_size=3, device="cpu",
                                   seed=0)


# ---------------------------------------------------------------- the changed-pixel mask


def test_changed_mask_marks_where_the_pixel_left_and_where_it_arrived():
    frames = one_pixel_moves()
    want = torch.zeros(4, 4, dtype=torch.bool)
    want[1, 1] = want[1, 2] = True
    assert torch.equal(te.changed_mask(frames[0], frames[1]), want)


def test_changed_mask_ignores_changes_within_the_threshold():
    prev = torch.full((1, 2, 3), 0.5)
    cur = prev.clone()
    cur[0, 0, 1] += 7 / 255  # noise: below 8/255
    cur[0, 1, 2] += 9 / 255  # a change, in one channel only
    assert te.changed_mask(prev, cur).tolist() == [[False, True]]


# ---------------------------------------------------------------- PSNR on changed / static pixels


def test_masked_psnr_scores_the_changed_and_the_static_pixels_apart():
    frames = one_pixel_moves()
    target = frames[1]
    pred = target.clone()
    pred[1, 1] = 0.75  # the pixel the object left: error 0.25 in every channel
    pred[3, 3, 0] += 0.1  # one static pixel: error 0.1 in one channel
    changed = te.changed_mask(frames[0], target)
    # changed: MSE = 0.25² / 2 pixels; static: MSE = (0.1² / 3 channels) / 14 pixels
    assert math.isclose(float(te.masked_psnr(pred, target, changed)),
                        10 * math.log10(2 / 0.25 ** 2), rel_tol=1e-5)
    assert math.isclose(float(te.masked_psnr(pred, target, ~changed)),
                        10 * math.log10(3 * 14 / 0.1 ** 2), rel_tol=1e-5)


def test_masked_psnr_pools_the_squared_error_over_images():
    target = torch.zeros(2, 2, 2, 3)
    pred = target.clone()
    pred[0, 0, 0] = 0.2  # image 0: one masked pixel, squared error 0.04
    mask = torch.zeros(2, 2, 2, dtype=torch.bool)
    mask[0, 0, 0] = True
    mask[1, :, 1] = True
    mask[1, 0, 0] = True  # image 1: three exact masked pixels
    # the mean over the 4 masked pixels is 0.01: 20 dB (a mean of per-image PSNRs would be 57 dB)
    assert math.isclose(float(te.masked_psnr(pred, target, mask)), 20.0, rel_tol=1e-5)


def test_masked_psnr_per_horizon_is_nan_where_nothing_changed():
    true = torch.zeros(1, 2, 2, 2, 3)  # (B, H, H_px, W_px, 3)
    mask = torch.zeros(1, 2, 2, 2, dtype=torch.bool)
    mask[0, 1, 0, 0] = True  # only horizon 2 has a changed pixel
    db = te.masked_psnr(true + 0.1, true, mask, dims=(0, 2, 3))
    assert math.isnan(db[0]) and math.isclose(float(db[1]), 20.0, rel_tol=1e-5)


# ---------------------------------------------------------------- the collapse alarm, tokenizer


def test_tokenizer_alarm_fires_when_the_decoder_ignores_its_latents():
    assert tokenizer_figures(FrozenDecoderTokenizer())["collapse_alarm"] is True


def test_tokenizer_alarm_fires_when_the_latents_never_change():
    out = tokenizer_figures(FirstFrameTokenizer())
    assert out["collapse_alarm"] is True and out["motion_ratio_latent"] == 0.0


def test_tokenizer_alarm_stays_quiet_on_a_perfect_reconstruction():
    out = tokenizer_figures(IdentityTokenizer())
    assert out["collapse_alarm"] is False
    assert out["motion_recall_recon"] == 1.0 and math.isclose(out["motion_ratio_latent"], 1.0)


def test_tokenizer_figures_score_the_copy_baseline_on_the_changed_pixels():
    out = tokenizer_figures(FirstFrameTokenizer())
    # the copy is exact on the static pixels and wrong where the square moved
    assert out["copy_psnr_static_db"] == 100.0 and out["copy_psnr_changed_db"] < 20.0
    assert math.isclose(out["changed_pixel_frac"], 4 / 256)


# ---------------------------------------------------------------- the collapse alarm, dynamics


def rollouts(generated: str, ceiling: str):
    """dynamics.evaluate's rollouts for 2 context + 3 generated frames of the moving square;
    `generated`/`ceiling` = "true" (follows the video) or "frozen" (repeats the last context
    frame). Returns (rollouts, reconstruction, args)."""
    true = moving_square_videos(2, T=5).float() / 255  # (B, T, H_px, W_px, 3)
    frozen = true[:, 1:2].expand(-1, 3, -1, -1, -1)  # (B, H, H_px, W_px, 3)
    pick = {"true": true[:, 2:], "frozen": frozen}
    recon = torch.cat([true[:, :2], pick[ceiling]], 1)  # (B, T, H_px, W_px, 3)
    ro = {"true": true, "pixels": {"k4": pick[generated]}}
    return ro, recon, dynamics.Args(eval_context=2, eval_horizon=3, sample_k=4)


def test_dynamics_alarm_fires_on_rollouts_that_repeat_the_context():
    out = de.moving_pixel_scores(*rollouts("frozen", "true"))
    assert out["collapse_alarm"] is True and out["motion_recall_k4"] == 0.0


def test_dynamics_alarm_fires_when_the_tokenizer_ceiling_does_not_move():
    out = de.moving_pixel_scores(*rollouts("true", "frozen"))
    assert out["collapse_alarm"] is True and out["motion_recall_tokenizer_ceiling"] == 0.0


def test_dynamics_alarm_stays_quiet_on_rollouts_that_follow_the_video():
    out = de.moving_pixel_scores(*rollouts("true", "true"))
    assert out["collapse_alarm"] is False and out["motion_recall_k4"] == 1.0


def test_dynamics_changed_pixel_psnr_of_a_frozen_rollout_is_the_repeat_last_baselines():
    frozen = de.moving_pixel_scores(*rollouts("frozen", "true"))
    assert frozen["psnr_changed_k4_per_horizon"] == frozen["psnr_changed_repeat_last_per_horizon"]


def test_dynamics_changed_pixel_psnr_tells_a_frozen_rollout_from_a_good_one():
    frozen = de.moving_pixel_scores(*rollouts("frozen", "true"))
    good = de.moving_pixel_scores(*rollouts("true", "true"))
    # frozen: exact on the first step's static pixels, wrong wherever the square moved
    assert frozen["psnr_static_k4_per_horizon"][0] == 100.0 and frozen["psnr_changed_k4"] < 20.0
    assert good["psnr_changed_k4"] == 100.0


# ---- sprite_recall: which kinds of tile a reconstruction keeps (built-in world) ------------------


def frames_with_cracks():
    """Real 32×32 frames of one world in which the agent mines a tree: (T, H, W, 3) uint8, and
    the same frames with every crack painted over by the plain sprite of its terrain."""
    import environment as env
    e = env.Env(32, episode_len=1 << 30)
    frames = [e.reset(env.episode_seed(0, "eval", 0))]
    tree = tuple(np.argwhere(e.grid == env.TREE)[0])
    e.agent, e.facing = (tree[0], tree[1] - 1), 3  # stand left of the tree, facing it
    if e.agent == e.creature or e.grid[e.agent] not in env.WALKABLE:
        e.grid[e.agent] = env.GRASS
        e.creature = tuple(np.argwhere(e.grid == env.GRASS)[-1])
    for _ in range(env.HARDNESS[env.TREE]):
        frames.append(e.step([0, 1, 0, 0])[0])
    frames = np.stack(frames)
    painted = frames.copy()
    bank, s = env._sprites(32), 4
    app = env.decode_frames(frames)["app"]
    for t, r, c in np.argwhere(app >= env.CRACK_APP):
        plain = env.MINABLE[(app[t, r, c] - env.CRACK_APP) // 4]
        painted[t, r * s:(r + 1) * s, c * s:(c + 1) * s] = bank["tiles"][plain]
    return frames, painted


def test_sprite_recall_is_one_for_the_real_frames_themselves():
    frames, _ = frames_with_cracks()
    out = te.sprite_recall(frames.astype(float), frames.astype(float))
    assert out["sprite_recall_crack"] == 1.0 and out["sprite_recall_terrain"] == 1.0


def test_sprite_recall_sees_a_reconstruction_that_drops_the_cracks():
    frames, painted = frames_with_cracks()
    out = te.sprite_recall(frames.astype(float), painted.astype(float))
    assert out["sprite_recall_crack"] == 0.0
    assert out["sprite_recall_terrain"] == 1.0 and out["sprite_recall_agent"] == 1.0


def test_sprite_recall_is_empty_for_frames_of_another_world():
    noise = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype(float)
    assert te.sprite_recall(noise, noise) == {}


def test_sprite_recall_sees_a_count_drawn_one_too_low():
    """Two wood drawn as one: the slot still holds something, but the count is wrong."""
    import environment as env
    e = env.Env(32, episode_len=1 << 30)
    e.reset(env.episode_seed(0, "eval", 0))
    e.inv[env.WOOD] = 2
    two = e.render()[None]  # (1, H, W, 3)
    e.inv[env.WOOD] = 1
    one = e.render()[None]
    out = te.sprite_recall(two.astype(float), one.astype(float))
    assert out["sprite_recall_inventory_over_one"] == 0.0
    assert te.sprite_recall(two.astype(float), two.astype(float))[
        "sprite_recall_inventory_over_one"] == 1.0
