"""Accelerator paths that can be checked on a CPU: device selection (mps, cuda) and the dtype
fallback, the fused soft-capped attention against the explicit form, and gpu_check.py's tiny mode.
"""

import json

import pytest
import torch

import common
from conftest import run

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)


def test_auto_picks_cuda_then_mps_then_cpu():
    assert common.device_name("auto", cuda_ok=True, mps_ok=True) == "cuda"
    assert common.device_name("auto", cuda_ok=False, mps_ok=True) == "mps"
    assert common.device_name("auto", cuda_ok=False, mps_ok=False) == "cpu"


def test_an_absent_mps_falls_back_to_cpu_with_a_message(capsys):
    assert common.device_name("mps", cuda_ok=True, mps_ok=False) == "cpu"
    assert "--device mps is not available" in capsys.readouterr().out


def test_an_absent_cuda_falls_back_to_cpu_with_a_message(capsys):
    assert common.device_name("cuda:1", cuda_ok=False, mps_ok=True) == "cpu"
    assert "--device cuda:1 is not available" in capsys.readouterr().out


def test_pick_device_on_a_mac_without_mps_runs_on_cpu(monkeypatch):
    """torch reports no mps (an x86 build, an old macOS): --device mps still gives a run."""
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(common, "_COMPUTE", {"dtype": None, "peaks": {}})
    monkeypatch.setattr(common, "matmul_peaks", lambda device: {"fp32": 1.0, "bf16": 1.0})
    assert common.pick_device("mps", "fp32").type == "cpu"


def test_torchrun_on_mps_stops_with_a_message(monkeypatch):
    """A Mac has one GPU, and gloo cannot all-reduce mps tensors: say so before any work."""
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(common, "world_size", lambda: 2)
    with pytest.raises(SystemExit, match="torchrun on mps"):
        common.pick_device("mps", "fp32")


def test_bf16_asked_for_where_the_probe_could_not_multiply_bf16_gives_fp32(capsys):
    """mps before macOS 14 has no bf16 matmul: the probe records peak 0 and fp32 is used."""
    assert common.choose_dtype("bf16", "mps", {"fp32": 1e12, "bf16": 0.0}) == "fp32"
    assert "cannot multiply bf16" in capsys.readouterr().out
    assert common.choose_dtype("bf16", "mps", {"fp32": 1e12, "bf16": 2e12}) == "bf16"


def test_auto_dtype_on_mps_is_fp32():
    assert common.choose_dtype("auto", "mps", {"fp32": 1e12, "bf16": 4e12}) == "fp32"


@pytest.mark.parametrize("mask_kind", ["none", "causal", "per_sequence"])
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # on purpose
def test_flex_attention_with_the_soft_cap_equals_the_explicit_form(monkeypatch, mask_kind):
    """The fused path (FlexAttention, the CUDA default) against the explicit softmax(cap·tanh)
    form, with GQA, a KV-cache-shaped causal mask and per-sequence (start-frame) masks. Forward
    only: FlexAttention has no CPU backward (gpu_check.py compares the gradients on a GPU)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 5, 8, generator=g) * 4  # large logits, so the cap is active
    k, v = torch.randn(3, 2, 7, 8, generator=g) * 4, torch.randn(3, 2, 7, 8, generator=g)
    mask = {"none": None, "causal": common.time_mask(5, 7, 4),
            "per_sequence": common.time_mask(5, 7, 4, torch.tensor([False, True, False]))}[
        mask_kind]
    outs = []
    for fused in (False, True):
        monkeypatch.setitem(common.FUSED_ATTENTION, "on", fused)
        outs.append(common.attend(q, k, v, mask, soft_cap=5.0))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(outs[0], common.attend(q, k, v, mask, soft_cap=0.0), atol=1e-3)


def test_the_explicit_attention_stays_the_cpu_default():
    assert common.FUSED_ATTENTION["on"] is None  # None: automatic, on the "auto_on" devices
    assert common.FUSED_ATTENTION["auto_on"] == ("cuda",)


def test_automatic_fused_attention_that_cannot_run_falls_back_to_the_explicit_form(monkeypatch,
                                                                                  capsys):
    """A CUDA machine whose torch has no FlexAttention (torch < 2.5) or no Triton: the run goes
    on with the explicit form and says why, once (here the CPU plays that device)."""
    monkeypatch.setitem(common.FUSED_ATTENTION, "on", None)
    monkeypatch.setitem(common.FUSED_ATTENTION, "auto_on", ("cpu",))

    def no_kernel(*args):
        raise RuntimeError("Cannot find a working triton installation")
    monkeypatch.setattr(common, "flex_attend", no_kernel)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 3, 8, generator=g) * 4 for _ in range(3))
    out = common.attend(q, k, v, None, soft_cap=5.0)
    assert "fused attention is not available here (RuntimeError: Cannot find" in \
        capsys.readouterr().out
    assert common.FUSED_ATTENTION["on"] is False
    torch.testing.assert_close(out, common.attend(q, k, v, None, soft_cap=5.0))


def test_forced_fused_attention_that_cannot_run_raises(monkeypatch):
    """gpu_check.py forces it on: there a failing kernel is the finding, not a fallback."""
    monkeypatch.setitem(common.FUSED_ATTENTION, "on", True)

    def no_kernel(*args):
        raise RuntimeError("no kernel")
    monkeypatch.setattr(common, "flex_attend", no_kernel)
    q = torch.randn(1, 1, 2, 8)
    with pytest.raises(RuntimeError, match="no kernel"):
        common.attend(q, q, q, None, soft_cap=5.0)


def test_bf16_asked_for_where_torch_has_no_autocast_gives_fp32(capsys):
    """mps with torch < 2.5: torch.autocast would warn and compute in fp32 anyway."""
    peaks = {"fp32": 1e12, "bf16": 2e12}
    assert common.choose_dtype("bf16", "mps", peaks, autocast_ok=False) == "fp32"
    assert "no autocast on mps" in capsys.readouterr().out


def test_peak_memory_on_mps_is_what_metal_holds_for_torch(monkeypatch):
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 3 * 2 ** 30)
    assert common.peak_memory_gb(torch.device("mps")) == 3.0


@pytest.mark.parametrize("platform, maxrss", [("linux", 2 * 2 ** 20), ("darwin", 2 * 2 ** 30)])
def test_peak_resident_memory_reads_the_platform_unit(monkeypatch, platform, maxrss):
    """getrusage's ru_maxrss is in KiB on Linux and in bytes on macOS: 2 GiB either way."""
    import resource
    monkeypatch.setattr(common.sys, "platform", platform)
    monkeypatch.setattr(resource, "getrusage", lambda who: type("R", (), {"ru_maxrss": maxrss}))
    assert common.peak_memory_gb(torch.device("cpu")) == 2.0


def test_gpu_check_smoke_writes_every_figure_of_its_json(tmp_path):
    """gpu_check.py's tiny CPU mode: the same code paths as the GPU run, every figure present."""
    out = str(tmp_path / "gpu_check.json")
    run("gpu_check.py", "--preset", "smoke", "--out", out)
    with open(out) as f:
        r = json.load(f)
    for part in (r["tokenizer"], r["dynamics"], r["dynamics"]["short"], r["dynamics"]["long"],
                 r["agent"]):
        for key in ("steps_per_s", "frames_per_s", "mfu", "peak_mem_gb", "flops_per_step"):
            assert part[key] > 0, key
    dyn = r["dynamics"]
    assert 0 < dyn["long_steps_of_10000"] < 10000
    assert dyn["extrapolated_wall_min_steps_10000"] == pytest.approx(
        10000 / dyn["steps_per_s"] / 60)
    g = r["generation"]
    assert g["gen_k"] == 4 and g["gen_fps_batch1"] > 0 and g["gen_largest_batch"] == 4
    assert r["attention"]["fused_max_abs_diff"] < 1e-4
    assert r["attention"]["dynamics_short_steps_per_s_explicit"] > 0
    assert set(r["targets"]) == {"dynamics_10k_wall_min", "peak_mem_gb", "gen_fps_batch1",
                                 "dynamics_mfu"}
    assert r["fused_attention_on"] is False  # a CPU: the explicit form


def test_the_flop_counted_step_runs_the_explicit_attention(monkeypatch):
    """torch's FlopCounterMode cannot trace FlexAttention (TypeError): while a FlopMeter counts
    a stage's first step, attention takes the explicit form, whose matmuls it counts."""
    monkeypatch.setitem(common.FUSED_ATTENTION, "on", True)
    q = torch.randn(1, 2, 4, 8)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    meter = common.FlopMeter(opt)
    out = common.attend(q, q, q, common.time_mask(4, 4, 4), soft_cap=5.0)
    meter.stop()
    assert meter.flops == 2 * (2 * 1 * 2 * 4 * 4 * 8)  # q·kᵀ and p·v
    monkeypatch.setitem(common.FUSED_ATTENTION, "on", False)
    torch.testing.assert_close(out, common.attend(q, q, q, common.time_mask(4, 4, 4), 5.0))
