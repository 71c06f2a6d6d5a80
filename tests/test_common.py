"""Tests of common.py: each primitive against an independent, slow re-derivation (STYLE.md tiers 1-2)."""

import json
import math
import os
from dataclasses import dataclass

import pytest
import torch

import common
from common import (Attention, KVCache, RMSNorm, RunningRMS, SpaceTimeTransformer, apply_rope, attend,
                    rope_angles, rope_angles_2d, time_mask)

torch.set_num_threads(2)


# ---------------------------------------------------------------- RMSNorm, SwiGLU, RoPE

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
            rot = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
            out[s, 2 * i:2 * i + 2] = rot @ x[s, 2 * i:2 * i + 2]
    return out


def test_rope_matches_rotation_matrices():
    torch.manual_seed(0)
    x = torch.randn(6, 8)
    pos = torch.tensor([0, 1, 2, 5, 9, 100])
    torch.testing.assert_close(apply_rope(x, rope_angles(pos, 8)), slow_rope(x, pos), atol=1e-5, rtol=1e-5)


def test_rope_scores_depend_only_on_position_difference():
    torch.manual_seed(0)
    q, k = torch.randn(1, 16), torch.randn(1, 16)
    def score(pq, pk):
        return float(apply_rope(q, rope_angles(torch.tensor([pq]), 16)) @ apply_rope(k, rope_angles(torch.tensor([pk]), 16)).T)
    assert score(3, 1) == pytest.approx(score(10, 8), abs=1e-4)
    assert score(0, 0) == pytest.approx(score(57, 57), abs=1e-4)
    assert score(3, 1) != pytest.approx(score(3, 2), abs=1e-3)  # and it does depend on the difference


def test_rope_2d_depends_only_on_grid_offsets():
    torch.manual_seed(0)
    q, k = torch.randn(1, 16), torch.randn(1, 16)
    def score(rq, cq, rk, ck):
        aq = rope_angles_2d(torch.tensor([rq]), torch.tensor([cq]), 16)
        ak = rope_angles_2d(torch.tensor([rk]), torch.tensor([ck]), 16)
        return float(apply_rope(q, aq) @ apply_rope(k, ak).T)
    assert score(2, 3, 1, 1) == pytest.approx(score(5, 7, 4, 5), abs=1e-4)
    assert score(2, 3, 1, 1) != pytest.approx(score(2, 3, 1, 2), abs=1e-3)  # columns matter
    assert score(2, 3, 1, 1) != pytest.approx(score(2, 3, 2, 1), abs=1e-3)  # rows matter


# ---------------------------------------------------------------- attention: soft cap, GQA, masks

def slow_attention(q, k, v, mask, cap):
    """Per batch, per head, per query: explicit logits, soft cap, masked softmax. GQA by index."""
    B, Hq, S, Dh = q.shape
    Hk = k.shape[1]
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(Hq):
            hk = h // (Hq // Hk)
            for i in range(S):
                logits = torch.stack([q[b, h, i] @ k[b, hk, j] / math.sqrt(Dh) for j in range(k.shape[2])])
                if cap:
                    logits = cap * torch.tanh(logits / cap)
                if mask is not None:
                    m = mask.expand(B, Hq, S, k.shape[2])[b, h, i]
                    logits = logits.masked_fill(~m, float("-inf"))
                out[b, h, i] = logits.softmax(0) @ v[b, hk]
    return out


@pytest.mark.parametrize("Hq,Hk", [(4, 4), (4, 2), (4, 1)])
def test_attend_matches_slow_reference_with_gqa_and_mask(Hq, Hk):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, Hq, 5, 8), torch.randn(2, Hk, 5, 8), torch.randn(2, Hk, 5, 8)
    mask = torch.rand(1, 1, 5, 5) > 0.3
    mask[..., 0] = True  # every query sees at least one key
    torch.testing.assert_close(attend(q, k, v, mask, 50.0), slow_attention(q, k, v, mask, 50.0),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attend(q, k, v, mask, 0.0), slow_attention(q, k, v, mask, 0.0),
                               atol=1e-5, rtol=1e-5)


def test_soft_cap_bounds_logits_and_agrees_with_sdpa_when_it_cannot_bind():
    torch.manual_seed(0)
    q, k, v = 100 * torch.randn(1, 2, 4, 8), 100 * torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    cap = 5.0
    # With a cap, no two attention weights differ by more than exp(2·cap): logits lie in (−cap, cap).
    logits = cap * torch.tanh((q @ k.transpose(-1, -2)) / math.sqrt(8) / cap)
    weights = logits.softmax(-1)
    ratio = weights.max(-1).values / weights.min(-1).values  # per query row
    assert float(ratio.max()) <= math.exp(2 * cap) * (1 + 1e-4)
    torch.testing.assert_close(attend(q, k, v, None, cap), weights @ v, atol=1e-5, rtol=1e-5)
    # Without the cap these logits are huge and attention is one-hot; the capped output differs.
    assert not torch.allclose(attend(q, k, v, None, cap), attend(q, k, v, None, 0.0), atol=1e-2)
    # With small logits and a huge cap, the explicit path equals the fused SDPA path.
    qs, ks = q / 100, k / 100
    torch.testing.assert_close(attend(qs, ks, v, None, 1e6), attend(qs, ks, v, None, 0.0), atol=1e-5, rtol=1e-5)


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


def test_time_mask_matches_hand_written_table():
    # T = 5 frames, window C = 3: frame t sees frames t−2, t−1, t.
    expected = torch.tensor([
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 1, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(time_mask(5, 5, 3), expected)
    # Two new frames after three cached ones: the last two rows of the full table.
    assert torch.equal(time_mask(2, 5, 3), expected[3:])
    # Independent sequences (start frames) see only themselves.
    m = time_mask(5, 5, 3, independent=torch.tensor([False, True]))
    assert torch.equal(m[0, 0], expected) and torch.equal(m[1, 0], torch.eye(5, dtype=torch.bool))


# ---------------------------------------------------------------- the space/time transformer

def small_transformer(depth=8, window=4, n_kv_heads=2):
    torch.manual_seed(0)
    return SpaceTimeTransformer(dim=32, depth=depth, n_heads=4, n_kv_heads=n_kv_heads, window=window,
                                mlp_ratio=2.0).eval()


def test_every_fourth_layer_attends_over_time():
    model = small_transformer(depth=8)
    assert [b.is_time for b in model.blocks] == [False, False, False, True] * 2


def test_transformer_is_causal_in_time():
    model = small_transformer()
    x = torch.randn(2, 6, 5, 32)
    y = model(x)
    x2 = x.clone()
    x2[:, 3] += torch.randn(2, 5, 32)  # change frame 3
    y2 = model(x2)
    torch.testing.assert_close(y[:, :3], y2[:, :3], atol=0, rtol=0)  # frames 0..2 untouched
    assert not torch.allclose(y[:, 3:], y2[:, 3:])


def test_time_window_limits_what_a_frame_sees():
    model = small_transformer(depth=4, window=3)  # one time layer: frame t sees t−2 … t
    x = torch.randn(1, 6, 5, 32)
    x2 = x.clone()
    x2[:, 0] += 1.0
    y, y2 = model(x), model(x2)
    torch.testing.assert_close(y[:, 3:], y2[:, 3:], atol=0, rtol=0)  # frames ≥ 3 cannot see frame 0
    assert not torch.allclose(y[:, 2], y2[:, 2])  # frame 2 can


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


@pytest.mark.parametrize("T,window", [(3, 4), (10, 4), (9, 1)])
def test_kv_cache_equals_uncached_recompute(T, window):
    """Frame-by-frame with the cache == one pass over the whole sequence, also past the window."""
    model = small_transformer(depth=8, window=window)
    pos = torch.stack(torch.meshgrid(torch.arange(2), torch.arange(3), indexing="ij"), -1).view(6, 2)
    x = torch.randn(2, T, 6, 32)
    full = model(x, space_pos=pos)
    cache = KVCache(window)
    for t in range(T):
        probe = model(x[:, t:t + 1] * 0.5, space_pos=pos, cache=cache, commit=False)  # a denoising step
        assert cache.pos == t  # ... leaves the cache untouched
        step = model(x[:, t:t + 1], space_pos=pos, cache=cache, commit=True)
        torch.testing.assert_close(step[:, 0], full[:, t], atol=1e-5, rtol=1e-4)
        assert not torch.allclose(probe, step)
    assert cache.pos == T
    assert all(k.shape[2] == min(T, window - 1) for k, _ in cache.kv.values())


def test_kv_cache_handles_several_frames_per_call():
    model = small_transformer(depth=4, window=5)
    x = torch.randn(1, 7, 3, 32)
    full = model(x)
    cache = KVCache(5)
    first = model(x[:, :4], cache=cache, commit=True)
    rest = model(x[:, 4:], cache=cache, commit=True)
    torch.testing.assert_close(torch.cat([first, rest], 1), full, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- running-RMS normaliser

def test_running_rms_ema_floor_and_nonfinite_skip():
    norm = RunningRMS(decay=0.9, floor=1e-3)
    out = norm(torch.tensor(2.0))  # first update sets ms = 4
    assert norm.ms == pytest.approx(4.0) and float(out) == pytest.approx(1.0)
    norm(torch.tensor(1.0))  # ms = 0.9·4 + 0.1·1 = 3.7
    assert norm.ms == pytest.approx(3.7)
    norm(torch.tensor(float("nan")))
    norm(torch.tensor(float("inf")))
    assert norm.ms == pytest.approx(3.7) and norm.count == 2  # skipped
    tiny = RunningRMS(floor=1e-3)
    assert float(tiny(torch.tensor(1e-6))) == pytest.approx(1e-6 / 1e-3)  # floor stops division by ~0
    restored = RunningRMS()
    restored.load_state_dict(norm.state_dict())
    assert restored.state_dict() == norm.state_dict()


def test_running_rms_passes_gradient_through_loss_only():
    norm = RunningRMS()
    w = torch.tensor(3.0, requires_grad=True)
    norm(w ** 2).backward()  # loss 9, rms 9 → d(w²/9)/dw = 2w/9
    assert float(w.grad) == pytest.approx(6 / 9)


# ---------------------------------------------------------------- plumbing

@dataclass
class ToyArgs:
    preset: str = "default"  # which preset to start from
    steps: int = 100  # training steps
    lr: float = 1e-3  # learning rate
    frac: float = 0.3  # share of sequences (§3.4: 30 %)
    compile: bool = False  # use torch.compile
    out: str = "runs/toy"  # output folder


def test_parse_args_precedence_and_help(capsys):
    presets = {"smoke": {"steps": 5, "lr": 0.5}}
    assert common.parse_args(ToyArgs, presets, []) == ToyArgs()
    a = common.parse_args(ToyArgs, presets, ["--preset", "smoke", "--lr", "0.1", "--compile"])
    assert (a.steps, a.lr, a.compile, a.preset) == (5, 0.1, True, "smoke")  # explicit flag beats preset
    assert common.parse_args(ToyArgs, presets, ["--no-compile", "--out", "x"]).out == "x"
    assert common._field_help(ToyArgs)["steps"] == "training steps"
    with pytest.raises(SystemExit):
        common.parse_args(ToyArgs, presets, ["--preset", "nonexistent"])
    # --help prints every flag's help; a "%" in a help comment once crashed argparse's formatting.
    with pytest.raises(SystemExit) as exit_info:
        common.parse_args(ToyArgs, presets, ["--help"])
    assert exit_info.value.code == 0
    assert "30 %" in capsys.readouterr().out
    a = common.parse_args(ToyArgs, presets, ["--lr", "0.2"])
    assert a._given == {"lr"}  # what was typed (dynamics.py --eval-only uses it)


def test_checkpoint_roundtrip_and_clear_errors(tmp_path):
    path = str(tmp_path / "run" / "ckpt.pt")
    common.save_checkpoint(path, {"stage": "toy", "step": 3, "model": {"w": torch.ones(2)}})
    assert common.load_checkpoint(path, "toy", "python toy.py")["step"] == 3
    assert not [f for f in os.listdir(tmp_path / "run") if ".tmp" in f]  # no temp file left behind
    with pytest.raises(ValueError, match="expected a 'other' checkpoint"):
        common.load_checkpoint(path, "other", "python other.py")
    with pytest.raises(FileNotFoundError, match="python toy.py"):
        common.load_checkpoint(str(tmp_path / "missing.pt"), "toy", "python toy.py")
    with open(path, "r+b") as f:  # truncate: a crash in the middle of a non-atomic write
        f.truncate(20)
    with pytest.raises(RuntimeError, match="not a readable checkpoint"):
        common.load_checkpoint(path, "toy", "python toy.py")


def test_lr_schedule_warmup_then_cosine_to_ten_percent():
    lrs = [common.lr_at(s, 1.0, 10, 110) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warm-up
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.55)  # half-way: (0.1 + 1) / 2
    assert common.lr_at(110, 1.0, 10, 110) == pytest.approx(0.1)  # ends at 10 %
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone decay


def test_check_finite_and_metrics_log(tmp_path, capsys):
    common.check_finite(1, loss=torch.tensor(1.0))
    with pytest.raises(FloatingPointError, match="step 7"):
        common.check_finite(7, loss=torch.tensor(1.0), boot=torch.tensor(float("nan")))
    log = common.MetricsLog(str(tmp_path), total_steps=10)
    log.log(1, {"loss": 0.5}, frames_per_step=64)
    log.log(2, {"loss": 0.25}, frames_per_step=64)
    lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [l["loss"] for l in lines] == [0.5, 0.25] and "frames_per_s" in lines[1]
    assert "step 2/10 | loss 0.25" in capsys.readouterr().out


def test_which_layers_attend_over_time():
    """§3.4 "time attention every 4 layers": which layer of each group is --time-layer (hand-written table)."""
    table = {(8, 4, -1): [3, 7], (8, 4, 0): [0, 4], (4, 4, -1): [3], (4, 2, 0): [0, 2], (6, 3, 1): [1, 4]}
    for (depth, every, layer), expected in table.items():
        net = common.SpaceTimeTransformer(16, depth, 2, time_every=every, time_layer=layer)
        assert [i for i, b in enumerate(net.blocks) if b.is_time] == expected, (depth, every, layer)
