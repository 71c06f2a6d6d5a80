"""Tests of common.py: each primitive against an independent, slow re-derivation.

Exercise (README "Equation map and exercises") and its grading command:
    §3.4  time_mask, KVCache (the cache logic of SpaceTimeTransformer.forward)
          python -m pytest tests/test_common.py -k "time_mask or kv_cache"
"""

import json
import math
import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import common
from common import (Attention, KVCache, RMSNorm, RunningRMS, SpaceTimeTransformer, apply_rope,
                    attend, rope_angles, rope_angles_2d, time_mask)

torch.set_num_threads(2)


# ---------------------------------------------------------------- RMSNorm, RoPE

def test_rmsnorm_matches_formula():
    torch.manual_seed(0)
    norm = RMSNorm(8)
    norm.weight.data = torch.randn(8)
    x = torch.randn(3, 5, 8)
    slow = torch.empty_like(x)
    for i in range(3):
        for j in range(5):
            v = x[i, j]
            slow[i, j] = v / math.sqrt(sum(float(e) ** 2 for e in v) / 8 + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), slow, atol=1e-5, rtol=1e-5)


def slow_rope(x, positions, base=10000.0):
    """Rotate each channel pair with an explicit 2x2 rotation matrix, position by position."""
    S, Dh = x.shape
    out = torch.empty_like(x)
    for s in range(S):
        for i in range(Dh // 2):
            theta = float(positions[s]) * base ** (-2 * i / Dh)
            rot = torch.tensor([[math.cos(theta), -math.sin(theta)],
                                [math.sin(theta), math.cos(theta)]])
            out[s, 2 * i:2 * i + 2] = rot @ x[s, 2 * i:2 * i + 2]
    return out


def test_rope_matches_rotation_matrices():
    torch.manual_seed(0)
    x = torch.randn(6, 8)
    pos = torch.tensor([0, 1, 2, 5, 9, 100])
    got = apply_rope(x, rope_angles(pos, 8))
    torch.testing.assert_close(got, slow_rope(x, pos), atol=1e-5, rtol=1e-5)


def rope_score(q, k, pq, pk):
    """⟨rope(q, pq), rope(k, pk)⟩ for 1-D positions."""
    aq, ak = rope_angles(torch.tensor([pq]), 16), rope_angles(torch.tensor([pk]), 16)
    return float(apply_rope(q, aq) @ apply_rope(k, ak).T)


def test_rope_scores_depend_only_on_position_difference():
    torch.manual_seed(0)
    q, k = torch.randn(1, 16), torch.randn(1, 16)
    assert rope_score(q, k, 3, 1) == pytest.approx(rope_score(q, k, 10, 8), abs=1e-4)
    assert rope_score(q, k, 0, 0) == pytest.approx(rope_score(q, k, 57, 57), abs=1e-4)


def test_rope_scores_change_with_the_position_difference():
    torch.manual_seed(0)
    q, k = torch.randn(1, 16), torch.randn(1, 16)
    assert rope_score(q, k, 3, 1) != pytest.approx(rope_score(q, k, 3, 2), abs=1e-3)


def rope_2d_score(q, k, rq, cq, rk, ck):
    aq = rope_angles_2d(torch.tensor([rq]), torch.tensor([cq]), 16)
    ak = rope_angles_2d(torch.tensor([rk]), torch.tensor([ck]), 16)
    return float(apply_rope(q, aq) @ apply_rope(k, ak).T)


def test_rope_2d_depends_only_on_grid_offsets():
    torch.manual_seed(0)
    q, k = torch.randn(1, 16), torch.randn(1, 16)
    assert rope_2d_score(q, k, 2, 3, 1, 1) == pytest.approx(rope_2d_score(q, k, 5, 7, 4, 5),
                                                            abs=1e-4)


@pytest.mark.parametrize("key", [(1, 2), (2, 1)], ids=["columns", "rows"])
def test_rope_2d_sees_both_grid_axes(key):
    torch.manual_seed(0)
    q, k = torch.randn(1, 16), torch.randn(1, 16)
    assert rope_2d_score(q, k, 2, 3, 1, 1) != pytest.approx(rope_2d_score(q, k, 2, 3, *key),
                                                            abs=1e-3)


# ---------------------------------------------------------------- attention: soft cap, GQA

def slow_attention(q, k, v, mask, cap):
    """Per batch, per head, per query: explicit logits, soft cap, masked softmax. GQA by index."""
    B, Hq, S, Dh = q.shape
    Hk = k.shape[1]
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(Hq):
            hk = h // (Hq // Hk)
            for i in range(S):
                logits = torch.stack([q[b, h, i] @ k[b, hk, j] / math.sqrt(Dh)
                                      for j in range(k.shape[2])])
                if cap:
                    logits = cap * torch.tanh(logits / cap)
                if mask is not None:
                    m = mask.expand(B, Hq, S, k.shape[2])[b, h, i]
                    logits = logits.masked_fill(~m, float("-inf"))
                out[b, h, i] = logits.softmax(0) @ v[b, hk]
    return out


@pytest.mark.parametrize("cap", [50.0, 0.0], ids=["capped", "fused"])
@pytest.mark.parametrize("Hq,Hk", [(4, 4), (4, 2), (4, 1)])
def test_attend_matches_slow_reference_with_gqa_and_mask(Hq, Hk, cap):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, Hq, 5, 8), torch.randn(2, Hk, 5, 8), torch.randn(2, Hk, 5, 8)
    mask = torch.rand(1, 1, 5, 5) > 0.3
    mask[..., 0] = True  # every query sees at least one key
    torch.testing.assert_close(attend(q, k, v, mask, cap), slow_attention(q, k, v, mask, cap),
                               atol=1e-5, rtol=1e-5)


def large_logits():
    torch.manual_seed(0)
    return 100 * torch.randn(1, 2, 4, 8), 100 * torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)


def test_soft_cap_bounds_the_attention_weight_ratio():
    # With a cap no two attention weights differ by more than exp(2·cap): logits in (−cap, cap).
    q, k, v = large_logits()
    cap = 5.0
    logits = cap * torch.tanh((q @ k.transpose(-1, -2)) / math.sqrt(8) / cap)
    weights = logits.softmax(-1)
    ratio = weights.max(-1).values / weights.min(-1).values  # per query row
    assert float(ratio.max()) <= math.exp(2 * cap) * (1 + 1e-4)
    torch.testing.assert_close(attend(q, k, v, None, cap), weights @ v, atol=1e-5, rtol=1e-5)


def test_soft_cap_changes_attention_with_large_logits():
    # Without the cap these logits are huge and attention is one-hot; the capped output differs.
    q, k, v = large_logits()
    assert not torch.allclose(attend(q, k, v, None, 5.0), attend(q, k, v, None, 0.0), atol=1e-2)


def test_explicit_attention_equals_fused_sdpa_when_the_cap_cannot_bind():
    q, k, v = large_logits()
    q, k = q / 100, k / 100  # small logits, huge cap
    torch.testing.assert_close(attend(q, k, v, None, 1e6), attend(q, k, v, None, 0.0),
                               atol=1e-5, rtol=1e-5)


def test_gqa_with_all_kv_heads_is_plain_multi_head_attention():
    """Attention(n_kv_heads = n_heads) equals a hand-written MHA with the same weights."""
    torch.manual_seed(0)
    attn = Attention(dim=16, n_heads=4, n_kv_heads=4, soft_cap=0.0)
    x = torch.randn(2, 5, 16)
    out, _ = attn(x, None, None)
    q = attn.wq(x).view(2, 5, 4, 4).transpose(1, 2)
    k, v = attn.wkv(x).view(2, 5, 2, 4, 4).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    ref = attn.wo(slow_attention(q, k, v, None, 0.0).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- §3.4 time mask (exercise)

# T = 5 frames, window C = 3: frame t sees frames t−2, t−1, t (itself included).
WINDOWED = torch.tensor([
    # key frame 0 1 2 3 4
    [1, 0, 0, 0, 0],  # query frame 0
    [1, 1, 0, 0, 0],
    [1, 1, 1, 0, 0],
    [0, 1, 1, 1, 0],
    [0, 0, 1, 1, 1],
], dtype=torch.bool)


def as_text(mask):
    return "\n".join(" ".join("1" if v else "." for v in row) for row in mask.tolist())


def check_time_mask(got, want, what):
    assert torch.is_tensor(got) and got.dtype == torch.bool, (
        "expected a bool mask (True = may attend), got "
        f"{got.dtype if torch.is_tensor(got) else type(got).__name__}")
    assert got.shape == want.shape, f"{what}: expected shape {tuple(want.shape)}, got {got.shape}"
    assert torch.equal(got, want), (
        f"{what}\nrow = query frame, column = key frame, 1 = may attend; a query sees itself and "
        f"the C − 1 frames before it\nexpected:\n{as_text(want)}\ngot:\n{as_text(got)}")


def test_time_mask_matches_hand_written_table():
    check_time_mask(time_mask(5, 5, 3), WINDOWED, "5 frames, window C = 3")


def test_time_mask_for_frames_after_a_cache_is_the_last_rows():
    # Two new frames after three cached ones: the last two rows of the full table.
    check_time_mask(time_mask(2, 5, 3), WINDOWED[3:],
                    "2 new frames (queries 3, 4) after 3 cached ones, window C = 3")


def test_time_mask_with_window_one_is_the_diagonal():
    check_time_mask(time_mask(4, 4, 1), torch.eye(4, dtype=torch.bool), "window C = 1")


def test_time_mask_independent_sequences_see_only_themselves():
    # §3.4 "start frames": a sequence marked independent is a batch of separate images.
    m = time_mask(5, 5, 3, independent=torch.tensor([False, True]))
    assert m.shape == (2, 1, 5, 5), f"expected (B, 1, T_q, T_k) = (2, 1, 5, 5), got {m.shape}"
    check_time_mask(m[0, 0], WINDOWED, "sequence 0 (not independent)")
    check_time_mask(m[1, 0], torch.eye(5, dtype=torch.bool), "sequence 1 (independent)")


# ---------------------------------------------------------------- the space/time transformer

def small_transformer(depth=8, window=4, n_kv_heads=2):
    torch.manual_seed(0)
    return SpaceTimeTransformer(dim=32, depth=depth, n_heads=4, n_kv_heads=n_kv_heads,
                                window=window, mlp_ratio=2.0).eval()


def test_every_fourth_layer_attends_over_time():
    model = small_transformer(depth=8)
    assert [b.is_time for b in model.blocks] == [False, False, False, True] * 2


@pytest.mark.parametrize("depth,every,layer,expected", [
    (8, 4, -1, [3, 7]), (8, 4, 0, [0, 4]), (4, 4, -1, [3]), (4, 2, 0, [0, 2]), (6, 3, 1, [1, 4])])
def test_which_layers_attend_over_time(depth, every, layer, expected):
    """§3.4 "time attention every 4 layers": which layer of each group is --time-layer."""
    net = common.SpaceTimeTransformer(16, depth, 2, time_every=every, time_layer=layer)
    assert [i for i, b in enumerate(net.blocks) if b.is_time] == expected


def test_transformer_is_causal_in_time():
    model = small_transformer()
    x = torch.randn(2, 6, 5, 32)
    x2 = x.clone()
    x2[:, 3] += torch.randn(2, 5, 32)  # change frame 3
    y, y2 = model(x), model(x2)
    torch.testing.assert_close(y[:, :3], y2[:, :3], atol=0, rtol=0)  # frames 0..2 untouched
    assert not torch.allclose(y[:, 3:], y2[:, 3:])


def test_time_window_limits_what_a_frame_sees():
    model = small_transformer(depth=4, window=3)  # one time layer: frame t sees t−2 … t
    x = torch.randn(1, 6, 5, 32)
    x2 = x.clone()
    x2[:, 0] += 1.0
    y, y2 = model(x), model(x2)
    torch.testing.assert_close(y[:, 3:], y2[:, 3:], atol=0, rtol=0)  # frames ≥ 3 miss frame 0
    assert not torch.allclose(y[:, 2], y2[:, 2])  # frame 2 sees it


def test_space_mask_blocks_token_groups():
    model = small_transformer()
    x = torch.randn(1, 2, 4, 32)
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[:2, 2:] = False  # tokens 0,1 must not see tokens 2,3 (in any layer, incl. via time)
    x2 = x.clone()
    x2[:, :, 2:] += 1.0
    y, y2 = model(x, space_mask=mask), model(x2, space_mask=mask)
    torch.testing.assert_close(y[:, :, :2], y2[:, :, :2], atol=0, rtol=0)
    assert not torch.allclose(y[:, :, 2:], y2[:, :, 2:])


def test_independent_sequences_equal_single_frames():
    model = small_transformer()
    x = torch.randn(2, 4, 5, 32)
    y = model(x, independent=torch.tensor([True, False]))
    for t in range(4):
        torch.testing.assert_close(y[0, t], model(x[:1, t:t + 1])[0, 0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(y[1, 3], model(x[1:2, 3:4])[0, 0], atol=1e-4)


def test_slots_before_time_from_skip_the_time_layers():
    """time_from = f: in a time layer slots < f pass unchanged, slots ≥ f attend over time exactly
    as they would with every slot taking part (time attention links a slot only to itself)."""
    kw = dict(depth=1, time_every=1, window=4)
    part = common.SpaceTimeTransformer(32, n_heads=2, time_from=2, **kw)
    every = common.SpaceTimeTransformer(32, n_heads=2, **kw)
    every.load_state_dict(part.state_dict())
    x = torch.randn(2, 5, 6, 32)
    y = part(x)
    torch.testing.assert_close(y[:, :, :2], part.norm(x[:, :, :2]), atol=0, rtol=0)
    torch.testing.assert_close(y[:, :, 2:], every(x)[:, :, 2:], atol=1e-6, rtol=1e-5)


def test_a_slot_outside_time_attention_does_not_see_its_own_past():
    """The tokenizer's read-out tokens (slots < time_from) learn nothing from their own past
    frames: changing only those slots in frame 0 leaves later frames of a one-time-layer model
    unchanged, while the same change to a time slot reaches them."""
    model = common.SpaceTimeTransformer(32, depth=1, n_heads=2, time_every=1, window=4,
                                        time_from=2)
    x = torch.randn(1, 4, 6, 32)
    outside, inside = x.clone(), x.clone()
    outside[:, 0, :2] += 1.0
    inside[:, 0, 2:] += 1.0
    torch.testing.assert_close(model(outside)[:, 1:], model(x)[:, 1:], atol=0, rtol=0)
    assert not torch.allclose(model(inside)[:, 1:], model(x)[:, 1:])


@pytest.mark.parametrize("layer,time_from,layout", [
    (0, 0, False), (-1, 0, False), (0, 2, False), (0, 0, True)])
def test_keep_last_equals_the_last_frames_of_the_full_pass(layer, time_from, layout):
    """keep_last: the other frames give keys and values in the last time layer and stop there.
    The kept frames' outputs and every gradient must equal those of the full pass (time layer
    first or last, slots outside time attention, the two-stream layout of --ctx-stream)."""
    torch.manual_seed(0)
    model = SpaceTimeTransformer(dim=32, depth=4, n_heads=4, n_kv_heads=2, window=4,
                                 mlp_ratio=2.0, time_every=4, time_layer=layer,
                                 time_from=time_from)
    x = torch.randn(2, 6, 5, 32)
    kw = {}
    if layout:  # frames 0–2 a history stream of frames 3–5
        from dynamics import two_stream_layout
        kw["time_layout"] = two_stream_layout(3, 4, torch.tensor([False, True]), 5, None)
    full = model(x, **kw)[:, 3:]  # the last 3 of 6 frames (the loss frames of the layout)
    grads_full = torch.autograd.grad(full.square().sum(), list(model.parameters()))
    kept = model(x, keep_last=3, **kw)
    grads_kept = torch.autograd.grad(kept.square().sum(), list(model.parameters()))
    assert kept.shape == (2, 3, 5, 32), f"keep_last=3 must return 3 frames, got {kept.shape}"
    torch.testing.assert_close(kept, full, atol=1e-5, rtol=1e-4)
    for g_kept, g_full in zip(grads_kept, grads_full):
        torch.testing.assert_close(g_kept, g_full, atol=1e-5, rtol=1e-4)


def test_keep_last_zero_writes_the_same_cache():
    """A context committed with keep_last=0 (its outputs unread) leaves the frame after it the
    same as a full commit does."""
    model = small_transformer(depth=8, window=4)
    x = torch.randn(2, 5, 6, 32)
    caches = KVCache(4), KVCache(4)
    model(x[:, :4], space_pos=GRID, cache=caches[0], commit=True)
    model(x[:, :4], space_pos=GRID, cache=caches[1], commit=True, keep_last=0)
    assert caches[1].pos == 4, f"keep_last=0 must still advance cache.pos to 4, got {caches[1].pos}"
    after = [model(x[:, 4:], space_pos=GRID, cache=c) for c in caches]
    torch.testing.assert_close(after[1], after[0], atol=0, rtol=0)


# ---------------------------------------------------------------- §3.4 KV cache (exercise)

GRID = torch.stack(torch.meshgrid(torch.arange(2), torch.arange(3), indexing="ij"), -1).view(6, 2)


@pytest.mark.parametrize("T,window", [(3, 4), (10, 4), (9, 1)])
def test_kv_cache_frame_by_frame_equals_one_pass(T, window):
    """Frame by frame with the cache == one pass over the whole sequence, also past the window."""
    model = small_transformer(depth=8, window=window)
    x = torch.randn(2, T, 6, 32)
    full = model(x, space_pos=GRID)
    cache = KVCache(window)
    for t in range(T):
        step = model(x[:, t:t + 1], space_pos=GRID, cache=cache, commit=True)
        assert torch.allclose(step[:, 0], full[:, t], atol=1e-5, rtol=1e-4), (
            f"frame {t} (window C = {window}) differs from the uncached pass: a frame must see "
            f"the cached keys/values of the C − 1 frames before it, at RoPE positions that "
            f"continue from cache.pos")


def test_kv_cache_uncommitted_step_leaves_the_context_unchanged():
    """commit=False (a denoising step) must neither store its keys nor advance the position."""
    model = small_transformer(depth=8, window=4)
    x = torch.randn(2, 6, 6, 32)
    full = model(x, space_pos=GRID)
    cache = KVCache(4)
    for t in range(6):
        probe = model(x[:, t:t + 1] * 0.5, space_pos=GRID, cache=cache, commit=False)
        assert cache.pos == t, f"commit=False moved cache.pos from {t} to {cache.pos}"
        step = model(x[:, t:t + 1], space_pos=GRID, cache=cache, commit=True)
        assert torch.allclose(step[:, 0], full[:, t], atol=1e-5, rtol=1e-4), (
            f"frame {t}: after an uncommitted step the committed one must equal the uncached pass")
        assert not torch.allclose(probe, step)


def test_kv_cache_position_counts_committed_frames():
    model = small_transformer(depth=4, window=3)
    cache = KVCache(3)
    model(torch.randn(1, 4, 6, 32), space_pos=GRID, cache=cache, commit=True)
    model(torch.randn(1, 1, 6, 32), space_pos=GRID, cache=cache, commit=True)
    assert cache.pos == 5, f"cache.pos should be the index of the next frame (5), got {cache.pos}"


def test_kv_cache_handles_several_frames_per_call():
    model = small_transformer(depth=4, window=5)
    x = torch.randn(1, 7, 3, 32)
    full = model(x)
    cache = KVCache(5)
    first = model(x[:, :4], cache=cache, commit=True)
    rest = model(x[:, 4:], cache=cache, commit=True)
    assert torch.allclose(torch.cat([first, rest], 1), full, atol=1e-5, rtol=1e-4), (
        "4 frames then 3 frames through the cache must equal one pass over the 7 frames")


@pytest.mark.parametrize("T,window", [(3, 4), (10, 4), (9, 1)])
def test_cached_keys_are_trimmed_to_the_window(T, window):
    """Memory: the cache keeps only the C − 1 frames a later frame can see (an optimisation)."""
    model = small_transformer(depth=8, window=window)
    cache = KVCache(window)
    for t in range(T):
        model(torch.randn(2, 1, 6, 32), space_pos=GRID, cache=cache, commit=True)
    assert all(k.shape[2] == min(T, window - 1) for k, _ in cache.kv.values())


# ---------------------------------------------------------------- running-RMS normaliser

def test_running_rms_first_update_normalises_to_one():
    norm = RunningRMS(decay=0.9, floor=1e-3)
    out = norm(torch.tensor(2.0))  # the first update sets ms = 4
    assert norm.ms == pytest.approx(4.0) and float(out) == pytest.approx(1.0)


def test_running_rms_is_an_ema_of_the_squared_loss():
    norm = RunningRMS(decay=0.9, floor=1e-3)
    norm(torch.tensor(2.0))
    norm(torch.tensor(1.0))  # ms = 0.9·4 + 0.1·1 = 3.7
    assert norm.ms == pytest.approx(3.7)


def test_running_rms_skips_non_finite_losses():
    norm = RunningRMS(decay=0.9, floor=1e-3)
    norm(torch.tensor(2.0))
    norm(torch.tensor(float("nan")))
    norm(torch.tensor(float("inf")))
    assert norm.ms == pytest.approx(4.0) and norm.count == 1


def test_running_rms_floor_stops_division_by_almost_zero():
    norm = RunningRMS(floor=1e-3)
    assert float(norm(torch.tensor(1e-6))) == pytest.approx(1e-6 / 1e-3)


def test_running_rms_state_dict_roundtrip():
    norm = RunningRMS(decay=0.9, floor=1e-3)
    norm(torch.tensor(2.0))
    norm(torch.tensor(1.0))
    restored = RunningRMS()
    restored.load_state_dict(norm.state_dict())
    assert restored.state_dict() == norm.state_dict()


def test_running_rms_passes_gradient_through_loss_only():
    norm = RunningRMS()
    w = torch.tensor(3.0, requires_grad=True)
    norm(w ** 2).backward()  # loss 9, rms 9 → d(w²/9)/dw = 2w/9
    assert float(w.grad) == pytest.approx(6 / 9)


# ---------------------------------------------------------------- plumbing: arguments

@dataclass
class ToyArgs:
    preset: str = "default"  # which preset to start from
    steps: int = 100  # training steps
    lr: float = 1e-3  # learning rate
    frac: float = 0.3  # share of sequences (§3.4: 30 %)
    compile: bool = False  # use torch.compile
    out: str = "runs/toy"  # output folder


TOY_PRESETS = {"smoke": {"steps": 5, "lr": 0.5}}


def test_parse_args_without_flags_gives_the_defaults():
    assert common.parse_args(ToyArgs, TOY_PRESETS, []) == ToyArgs()


def test_parse_args_explicit_flag_beats_preset_beats_default():
    a = common.parse_args(ToyArgs, TOY_PRESETS, ["--preset", "smoke", "--lr", "0.1"])
    assert (a.steps, a.lr, a.preset) == (5, 0.1, "smoke")


def test_parse_args_bool_and_string_flags():
    assert common.parse_args(ToyArgs, TOY_PRESETS, ["--compile"]).compile is True
    a = common.parse_args(ToyArgs, TOY_PRESETS, ["--no-compile", "--out", "x"])
    assert a.compile is False and a.out == "x"


def test_field_help_reads_the_trailing_comment():
    assert common._field_help(ToyArgs)["steps"] == "training steps"


def test_parse_args_rejects_an_unknown_preset():
    with pytest.raises(SystemExit):
        common.parse_args(ToyArgs, TOY_PRESETS, ["--preset", "nonexistent"])


def test_help_prints_percent_signs(capsys):
    # A "%" in a help comment once crashed argparse's formatting.
    with pytest.raises(SystemExit) as exit_info:
        common.parse_args(ToyArgs, TOY_PRESETS, ["--help"])
    assert exit_info.value.code == 0
    assert "30 %" in capsys.readouterr().out


def test_parse_args_records_the_flags_typed():
    assert common.parse_args(ToyArgs, TOY_PRESETS, ["--lr", "0.2"])._given == {"lr"}


@pytest.mark.parametrize("flag, value, valid", [("--steps", "0", "≥ 1"), ("--steps", "-5", "≥ 1"),
                                                ("--lr", "0", "> 0")])
def test_parse_args_rejects_a_number_out_of_range_naming_the_range(capsys, flag, value, valid):
    with pytest.raises(SystemExit) as exit_info:
        common.parse_args(ToyArgs, TOY_PRESETS, [flag, value])
    assert exit_info.value.code == 2  # argparse's status for a bad command line
    error = capsys.readouterr().err
    assert f"argument {flag}:" in error and f"it must be {valid}" in error


@dataclass
class ZeroArgs:
    every: int = 5  # steps between evaluations; 0 = none
    batch: int = 4  # sequences per batch


def test_a_count_may_be_zero_only_when_its_help_says_what_zero_means():
    assert common.parse_args(ZeroArgs, {}, ["--every", "0"]).every == 0
    with pytest.raises(SystemExit):
        common.parse_args(ZeroArgs, {}, ["--batch", "0"])


@pytest.mark.parametrize("stage", ["tokenizer", "dynamics", "agent", "imagine", "data"])
def test_every_preset_of_every_stage_is_in_range(stage):
    module = __import__(stage)
    for preset in ["default", *module.PRESETS]:
        common.parse_args(module.Args, module.PRESETS, ["--preset", preset])


def test_help_with_a_preset_shows_the_preset_values(capsys):
    with pytest.raises(SystemExit):
        common.parse_args(ToyArgs, TOY_PRESETS, ["--preset", "smoke", "--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: 5 with --preset smoke; 100 without)" in shown


def test_help_without_a_preset_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        common.parse_args(ToyArgs, TOY_PRESETS, ["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "training steps (default: 100)" in shown and "with --preset" not in shown


# ---------------------------------------------------------------- plumbing: commands in messages

@dataclass
class StageArgs:
    preset: str = "default"  # which preset
    data: str = "data/big"  # dataset
    out: str = "runs/stage"  # run folder
    steps: int = 100  # training steps
    dtype: str = "auto"  # compute dtype
    resume: bool = False  # continue the run in --out


STAGE_PRESETS = {"cpu": {"data": "data/small", "out": "runs/cpu/stage", "steps": 5}}


def test_command_for_a_preset_run_folder_names_the_preset():
    assert (common.command_for("stage.py", StageArgs, STAGE_PRESETS, "runs/cpu/stage")
            == "python stage.py --preset cpu")


def test_command_for_an_absolute_path_still_finds_the_preset():
    run_dir = os.path.abspath("runs/cpu/stage")
    assert common.command_for("stage.py", StageArgs, STAGE_PRESETS, run_dir).endswith("cpu")


def test_command_for_a_run_folder_repeats_its_own_flags(tmp_path):
    run_dir = str(tmp_path / "mine")
    os.makedirs(run_dir)
    recorded = {"preset": "cpu", "data": "data/mine", "out": run_dir, "steps": 5, "dtype": "fp32"}
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        json.dump(recorded, f)
    assert (common.command_for("stage.py", StageArgs, STAGE_PRESETS, run_dir)
            == f"python stage.py --preset cpu --data data/mine --out {run_dir}")


def test_command_for_a_run_older_than_a_flag_gives_the_flag_its_default(tmp_path):
    run_dir = str(tmp_path / "old")  # written before `steps` existed: it ran with the default
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        json.dump({"preset": "cpu", "data": "data/small", "out": run_dir}, f)
    assert (common.command_for("stage.py", StageArgs, STAGE_PRESETS, run_dir)
            == f"python stage.py --preset cpu --steps 100 --out {run_dir}")


# ---------------------------------------------------------------- plumbing: Ctrl-C

def interrupted(monkeypatch, capsys, argv: list[str], writes: str = "") -> tuple[int, str]:
    """common.run_main on a main that writes a checkpoint at step 3 to `writes` (unless empty),
    then is interrupted by Ctrl-C: (exit status, what it printed)."""
    def main():
        if writes:
            common.save_checkpoint(writes, {"stage": "toy", "step": 3})
        raise KeyboardInterrupt
    monkeypatch.setattr("sys.argv", ["stage.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        common.run_main(main, StageArgs, STAGE_PRESETS)
    return exit_info.value.code, capsys.readouterr().out


def test_ctrl_c_after_a_checkpoint_gives_the_resume_command(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    code, said = interrupted(monkeypatch, capsys, ["--preset", "cpu", "--out", out],
                             writes=os.path.join(out, "ckpt.pt"))
    assert code == 130 and "(step 3)" in said
    assert f"python stage.py --preset cpu --out {out} --resume" in said


def test_ctrl_c_before_a_checkpoint_says_there_is_nothing_to_resume(tmp_path, monkeypatch,
                                                                    capsys):
    code, said = interrupted(monkeypatch, capsys, ["--out", str(tmp_path / "run")])
    assert code == 130 and "nothing to resume" in said and "--resume" not in said


def test_ctrl_c_ignores_a_checkpoint_older_than_the_run(tmp_path, monkeypatch, capsys):
    """A fresh run stopped before its first checkpoint must not offer an older run's."""
    out = str(tmp_path / "run")
    common.save_checkpoint(os.path.join(out, "ckpt.pt"), {"stage": "toy", "step": 3})
    os.utime(os.path.join(out, "ckpt.pt"), (1, 1))  # written long before this run started
    assert "nothing to resume" in interrupted(monkeypatch, capsys, ["--out", out])[1]


def test_ctrl_c_of_a_resumed_run_offers_its_checkpoint_again(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    common.save_checkpoint(os.path.join(out, "ckpt.pt"), {"stage": "toy", "step": 3})
    os.utime(os.path.join(out, "ckpt.pt"), (1, 1))
    said = interrupted(monkeypatch, capsys, ["--out", out, "--resume"])[1]
    assert f"python stage.py --out {out} --resume\n" in said  # --resume once


# ---------------------------------------------------------------- plumbing: checkpoints

@pytest.fixture
def toy_checkpoint(tmp_path):
    path = str(tmp_path / "run" / "ckpt.pt")
    common.save_checkpoint(path, {"stage": "toy", "step": 3, "model": {"w": torch.ones(2)}})
    return path


def test_checkpoint_roundtrip(toy_checkpoint):
    assert common.load_checkpoint(toy_checkpoint, "toy", "python toy.py")["step"] == 3


def test_checkpoint_save_leaves_no_temp_file(toy_checkpoint):
    assert not [f for f in os.listdir(os.path.dirname(toy_checkpoint)) if ".tmp" in f]


def test_checkpoint_of_another_stage_gives_a_clear_error(toy_checkpoint):
    with pytest.raises(ValueError, match="expected a 'other' checkpoint"):
        common.load_checkpoint(toy_checkpoint, "other", "python other.py")


def test_missing_checkpoint_names_the_command_that_writes_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="python toy.py"):
        common.load_checkpoint(str(tmp_path / "missing.pt"), "toy", "python toy.py")


def test_truncated_checkpoint_gives_a_clear_error(toy_checkpoint):
    with open(toy_checkpoint, "r+b") as f:  # a crash in the middle of a non-atomic write
        f.truncate(20)
    with pytest.raises(RuntimeError, match="not a readable checkpoint"):
        common.load_checkpoint(toy_checkpoint, "toy", "python toy.py")


# ---------------------------------------------------------------- plumbing: schedule, logging

def test_lr_warms_up_linearly():
    lrs = [common.lr_at(s, 1.0, 10, 110) for s in range(10)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)


def test_lr_decays_by_cosine_to_ten_percent():
    lrs = [common.lr_at(s, 1.0, 10, 110) for s in range(10, 111)]
    assert lrs[0] == pytest.approx(1.0) and lrs[50] == pytest.approx(0.55)  # half-way
    assert lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone


def test_check_finite_passes_finite_losses():
    common.check_finite(1, loss=torch.tensor(1.0))


def test_check_finite_stops_on_nan_naming_the_step():
    with pytest.raises(FloatingPointError, match="step 7"):
        common.check_finite(7, loss=torch.tensor(1.0), boot=torch.tensor(float("nan")))


def test_metrics_log_appends_jsonl(tmp_path):
    log = common.MetricsLog(str(tmp_path), total_steps=10)
    log.log(1, {"loss": 0.5}, frames_per_step=64)
    log.log(2, {"loss": 0.25}, frames_per_step=64)
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [line["loss"] for line in lines] == [0.5, 0.25] and "frames_per_s" in lines[1]


def test_metrics_log_after_resume_holds_each_step_once(tmp_path):
    """An interrupted run logged step 4 after its last checkpoint (step 3); the resumed run logs
    step 4 again: the log keeps one step 4."""
    log = common.MetricsLog(str(tmp_path), total_steps=10)
    for step in (2, 3, 4):
        log.log(step, {"loss": 1.0})
    log = common.MetricsLog(str(tmp_path), total_steps=10, resume=True, start_step=3)
    log.log(4, {"loss": 0.5})
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    assert steps == [2, 3, 4]


def test_metrics_log_after_resume_drops_a_line_cut_off_by_a_crash(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write('{"step": 2, "loss": 1.0}\n{"step": 3, "lo')
    common.MetricsLog(str(tmp_path), total_steps=10, resume=True, start_step=3)
    assert open(tmp_path / "metrics.jsonl").read() == '{"step": 2, "loss": 1.0}\n'


def test_metrics_log_prints_one_grepable_line(tmp_path, capsys):
    log = common.MetricsLog(str(tmp_path), total_steps=10)
    log.log(2, {"loss": 0.25})
    assert "step 2/10 | loss 0.25" in capsys.readouterr().out


# ---- bootstrap_ci: the intervals of the results tables ------------------------------------------


def test_bootstrap_ci_of_one_seed_matches_the_binomial_interval():
    """One seed of 400 worlds at p = 0.3: the interval is the normal approximation's
    p ± 1.96·√(p(1 − p)/n) = 0.3 ± 0.045, within bootstrap noise."""
    hits = np.zeros(400)
    hits[:120] = 1
    ci = common.bootstrap_ci([hits], n_boot=4000)
    half = 1.96 * np.sqrt(0.3 * 0.7 / 400)
    assert ci["mean"] == pytest.approx(0.3)
    assert ci["lo"] == pytest.approx(0.3 - half, abs=0.01)
    assert ci["hi"] == pytest.approx(0.3 + half, abs=0.01)


def test_bootstrap_ci_widens_with_the_spread_between_seeds():
    """Two seeds at 10 % and 50 %: pooled as one seed of 400 worlds the interval is narrow; the
    two-level bootstrap also resamples the seeds, so the interval spans most of 10–50 %."""
    a, b = np.zeros(200), np.zeros(200)
    a[:20], b[:100] = 1, 1
    pooled = common.bootstrap_ci([np.concatenate([a, b])])
    two_level = common.bootstrap_ci([a, b])
    assert two_level["mean"] == pytest.approx(pooled["mean"])
    assert two_level["hi"] - two_level["lo"] > 3 * (pooled["hi"] - pooled["lo"])


def test_bootstrap_ci_of_a_paired_difference_is_zero_for_identical_outcomes():
    rng = np.random.default_rng(0)
    hits = [rng.random(100) < 0.4 for _ in range(3)]
    assert common.bootstrap_ci(hits, paired=hits) == {"mean": 0.0, "lo": 0.0, "hi": 0.0}


def test_bootstrap_ci_of_a_paired_difference_separates_a_clear_gain():
    """Policy A wins on 30 of 100 worlds where B fails, in each of 3 seeds, and never loses."""
    b = [np.zeros(100) for _ in range(3)]
    a = [np.r_[np.ones(30), np.zeros(70)] for _ in range(3)]
    ci = common.bootstrap_ci(a, paired=b)
    assert ci["mean"] == pytest.approx(0.3) and ci["lo"] > 0.2
