"""Accelerator paths that can be checked on a CPU: device selection (mps, cuda) and the dtype
fallback, the fused soft-capped attention against the explicit form, and gpu_check.py's tiny mode.
"""

import json
import os

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


def test_bf16_asked_for_where_the_probe_could_not_multiply_bf16_gives_fp32(capsys):
    """mps before macOS 14 has no bf16 matmul: the probe records peak 0 and fp32 is used."""
    assert common.choose_dtype("bf16", "mps", {"fp32": 1e12, "bf16": 0.0}) == "fp32"
    assert "cannot multiply bf16" in capsys.readouterr().out
    assert common.choose_dtype("bf16", "mps", {"fp32": 1e12, "bf16": 2e12}) == "bf16"


def test_auto_dtype_on_mps_is_fp32():
    assert common.choose_dtype("auto", "mps", {"fp32": 1e12, "bf16": 4e12}) == "fp32"


@pytest.mark.parametrize("mask_kind", ["none", "causal", "per_sequence"])
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
    assert common.FUSED_ATTENTION["on"] is None  # None: fused on CUDA only


def test_gpu_check_smoke_writes_every_figure_of_its_json(tmp_path):
    """gpu_check.py's tiny CPU mode: the same code paths as the GPU run, every figure present."""
    out = str(tmp_path / "gpu_check.json")
    run("gpu_check.py", "--preset", "smoke", "--out", out)
    with open(out) as f:
        r = json.load(f)
    for stage in ("tokenizer", "dynamics"):
        for key in ("steps_per_s", "frames_per_s", "mfu", "peak_mem_gb", "flops_per_step"):
            assert r[stage][key] > 0, (stage, key)
    assert r["dynamics"]["extrapolated_wall_min_steps_10000"] == pytest.approx(
        10000 / r["dynamics"]["steps_per_s"] / 60)
    g = r["generation"]
    assert g["gen_k"] == 4 and g["gen_fps_batch1"] > 0 and g["gen_largest_batch"] == 4
    assert r["fused_attention_max_abs_diff"] < 1e-4
