"""Tests of common.py's speed mechanism: the compute-dtype decision, autocast following it, the
FLOP count and MFU arithmetic, and forced bf16 training. No timed assertions: the probe's
timings are given to the decision, never measured here."""

import json
import math
import os
import types

import pytest
import torch

import common
from conftest import run


@pytest.fixture
def restore_dtype():
    """Tests that set the process-wide compute dtype put the old decision back."""
    saved = dict(common._COMPUTE)
    yield
    common._COMPUTE.clear()
    common._COMPUTE.update(saved)


# ---------------------------------------------------------------- the dtype decision

@pytest.mark.parametrize("want, device, peaks, cuda_bf16, expected", [
    ("auto", "cpu", {"fp32": 80e9, "bf16": 195e9}, False, "bf16"),  # bf16 units: 2.4×
    ("auto", "cpu", {"fp32": 80e9, "bf16": 104e9}, False, "bf16"),  # exactly 1.3×
    ("auto", "cpu", {"fp32": 80e9, "bf16": 100e9}, False, "fp32"),  # 1.25×: not worth the casts
    ("auto", "cpu", {"fp32": 80e9, "bf16": 20e9}, False, "fp32"),  # emulated bf16: slower
    ("auto", "cuda", {"fp32": 80e9, "bf16": 20e9}, True, "bf16"),  # CUDA: bf16 where supported
    ("auto", "cuda", {"fp32": 80e9, "bf16": 200e9}, False, "fp32"),  # an old GPU without bf16
    ("auto", "mps", {"fp32": 80e9, "bf16": 200e9}, False, "fp32"),
    ("fp32", "cpu", {"fp32": 80e9, "bf16": 195e9}, False, "fp32"),  # the flag wins
    ("bf16", "cpu", {"fp32": 80e9, "bf16": 20e9}, False, "bf16"),
])
def test_choose_dtype_from_given_probe_timings(want, device, peaks, cuda_bf16, expected):
    assert common.choose_dtype(want, device, peaks, cuda_bf16) == expected


def test_choose_dtype_rejects_an_unknown_dtype():
    with pytest.raises(AssertionError, match="--dtype"):
        common.choose_dtype("fp16", "cpu", {"fp32": 1.0, "bf16": 2.0})


def test_the_probe_leaves_the_seeded_random_stream_alone():
    """The stages seed torch, then probe: the probe must not shift the model initialisation."""
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    peaks = common.matmul_peaks(torch.device("cpu"), shapes=((8, 8, 8),), rounds=1, reps=1)
    assert torch.equal(torch.rand(4), expected)
    assert peaks["fp32"] > 0 and peaks["bf16"] > 0


def test_autocast_follows_the_decision(restore_dtype):
    lin = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8)
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        common._COMPUTE["dtype"] = dtype
        assert common.compute_dtype() == dtype
        with common.autocast("cpu"):
            assert lin(x).dtype == torch_dtype


def test_attention_softmax_stays_fp32_under_bf16(restore_dtype):
    """common.attend casts the capped logits to fp32 before the softmax, also under autocast:
    the result matches the fp32 attention to bf16 precision of its inputs, not worse."""
    common._COMPUTE["dtype"] = "bf16"
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, 5, 8).unbind(0)  # (B, H, S, Dh) each
    ref = common.attend(q, k, v, None, 50.0)
    with common.autocast("cpu"):
        out = common.attend(q, k, v, None, 50.0)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


# ---------------------------------------------------------------- FLOPs and MFU

def test_flop_meter_counts_a_hand_counted_linear_layer_once():
    """y = x Wᵀ with x (16, 8), W (4, 8): forward 2·16·8·4 = 1024 FLOPs; backward dL/dW = dyᵀ x,
    another 1024 (x needs no gradient: no dL/dx). The meter stops at the first opt.step()."""
    lin = torch.nn.Linear(8, 4, bias=False)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    meter = common.FlopMeter(opt)
    for _ in range(3):
        loss = lin(torch.randn(16, 8)).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert meter.flops == 2 * 16 * 8 * 4 * 2
    x = torch.randn(16, 8, requires_grad=True)  # now dL/dx too: 3 matmuls of 1024
    opt2 = torch.optim.SGD(lin.parameters(), lr=0.1)
    meter2 = common.FlopMeter(opt2)
    lin(x).sum().backward()
    opt2.step()
    assert meter2.flops == 3 * 1024


def test_mfu_arithmetic():
    """mfu = flops_per_step · steps_per_s / peak: 3072 FLOP × 10 steps/s against 1.2e5 FLOP/s."""
    fig = common.mfu_figures(3072, 10.0, peak=1.2e5, dtype="bf16")
    assert fig["compute_dtype"] == "bf16" and fig["peak_flops"] == 1.2e5
    assert fig["flops_per_step"] == 3072 and math.isclose(fig["mfu"], 0.256)


def test_a_failed_first_step_does_not_leave_the_counter_on():
    """A run that dies in its first step leaves its meter counting; the next run's meter ends it
    (counting every later step would be slow, not wrong)."""
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    left_open = common.FlopMeter(opt)
    fresh = common.FlopMeter(opt)
    assert left_open.mode is None and left_open.flops is not None
    fresh.stop()
    assert common.FlopMeter._open is None


# ---------------------------------------------------------------- forced bf16 on a CPU

def test_forced_bf16_trains_a_smoke_tokenizer_and_dynamics(tmp_path):
    data_dir, tok, dyn = (str(tmp_path / name) for name in ("data", "tok", "dyn"))
    run("data.py", "--preset", "smoke", "--out", data_dir)
    out = run("tokenizer.py", "--preset", "smoke", "--data", data_dir, "--out", tok,
              "--lpips-weight", "0", "--dtype", "bf16")
    assert "compute dtype: bf16 (--dtype" in out and "| MFU " in out
    run("dynamics.py", "--preset", "smoke", "--tokenizer", os.path.join(tok, "ckpt.pt"),
        "--out", dyn, "--dtype", "bf16")
    for folder, figure in ((tok, "heldout_psnr_db"), (dyn, "psnr_k4")):
        s = json.load(open(os.path.join(folder, "summary.json")))
        assert s["compute_dtype"] == "bf16", folder
        assert s["flops_per_step"] > 0 and s["peak_flops"] > 0, folder
        assert 0 < s["mfu"] < 10 and math.isfinite(s[figure]), (folder, s["mfu"], s[figure])
    metrics = [json.loads(line) for line in open(os.path.join(dyn, "metrics.jsonl"))]
    assert all(math.isfinite(m["loss"]) for m in metrics if "loss" in m)


def test_speed_bench_runs_every_variant_at_the_smoke_preset(restore_dtype, capsys, one_thread):
    """speed_bench.py (the instrument behind docs/log.md's speed figures) end to end, eager only:
    a ratio and an MFU per variant, and the latent-cache comparison."""
    import speed_bench
    speed_bench.main(["--preset", "smoke", "--threads", "1", "--variants", "fp32,bf16",
                      "--rounds", "1", "--steps", "1", "--warmup", "1", "--cache-episodes", "1"])
    out = capsys.readouterr().out
    for line in ("tokenizer fp32", "tokenizer bf16", "dynamics  fp32", "dynamics  bf16"):
        assert line in out and "MFU" in out.split(line)[1].split("\n")[0], line
    assert "latent cache: fp32" in out and "max |z_bf16" in out


def test_resume_reuses_the_dtype_the_run_recorded(tmp_path, monkeypatch):
    """--resume with --dtype auto takes the run's recorded dtype, not a new probe's choice."""
    monkeypatch.setattr(common, "_COMPUTE", {"dtype": None, "peaks": {}})  # restored afterwards
    (tmp_path / "args.json").write_text(json.dumps({"dtype": "bf16"}))
    a = types.SimpleNamespace(device="cpu", dtype="auto", resume=True, out=str(tmp_path))
    common.pick_device_for_run(a)
    assert a.dtype == "bf16", f"the resumed run computes in {a.dtype}, it recorded bf16"
    assert common.compute_dtype() == "bf16"


def test_a_fresh_run_records_its_concrete_dtype(tmp_path, monkeypatch):
    """The probe's choice (or --dtype) goes back into the args that args.json and ckpt record."""
    monkeypatch.setattr(common, "_COMPUTE", {"dtype": None, "peaks": {}})  # restored afterwards
    a = types.SimpleNamespace(device="cpu", dtype="fp32", resume=False, out=str(tmp_path))
    common.pick_device_for_run(a)
    assert a.dtype == "fp32" == common.compute_dtype()
