"""The MFU denominator (pretrain/peak_flops.py): declared, published per GPU, measured only on the CPU."""

from __future__ import annotations

import warnings

import pytest
import torch

from medfm.pretrain import peak_flops
from medfm.pretrain.peak_flops import mfu_metrics, mfu_peak, published_peak_flops

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.parametrize("name,dtype,tflops", [
    ("NVIDIA H100 80GB HBM3", BF16, 989.4), ("NVIDIA H100 PCIe", BF16, 756.0), ("NVIDIA H100 NVL", BF16, 835.5),
    ("NVIDIA H200", BF16, 989.4), ("NVIDIA H200 NVL", BF16, 835.5), ("NVIDIA H100 80GB HBM3", FP32, 66.9),
    ("NVIDIA A100-SXM4-80GB", BF16, 312.0), ("NVIDIA A100 80GB PCIe", FP16, 312.0), ("NVIDIA L4", BF16, 121.0),
    ("NVIDIA L40S", BF16, 362.05), ("NVIDIA A10", BF16, 125.0), ("Tesla V100-SXM2-32GB", FP16, 125.0),
    ("Tesla V100-PCIE-16GB", FP32, 14.0), ("NVIDIA B200", BF16, 2250.0),
])
def test_published_dense_peaks_by_device_name(name, dtype, tflops):
    assert published_peak_flops(name, dtype) == pytest.approx(tflops * 1e12)


@pytest.mark.parametrize("name,dtype", [("NVIDIA A10G", BF16), ("NVIDIA L40", BF16), ("Tesla V100-SXM2-16GB", BF16),
                                        ("NVIDIA GeForce RTX 4090", BF16), ("NVIDIA H100 80GB HBM3", torch.float64)])
def test_unlisted_devices_and_dtypes_have_no_peak(name, dtype):
    assert published_peak_flops(name, dtype) is None


def test_cuda_never_divides_by_a_measured_matmul(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a timed matmul is not a GPU's peak")

    monkeypatch.setattr(peak_flops, "measure_peak_flops", refuse)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    peak, source = mfu_peak(0.0, torch.device("cuda", 0), BF16)
    assert peak == pytest.approx(989.4e12) and source == "published:H200 SXM"
    assert mfu_metrics(494.7e12, peak, source) == {"mfu": pytest.approx(0.5)}
    assert mfu_peak(400.0, torch.device("cuda", 0), BF16) == (400e12, "declared")


def test_unknown_gpu_logs_no_mfu_with_one_warning(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Mystery 9000")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peak, source = mfu_peak(0.0, torch.device("cuda", 0), BF16)
    assert (peak, source) == (None, "unknown") and len(caught) == 1 and "train.peak_tflops" in str(caught[0].message)
    assert mfu_metrics(1e12, peak, source) == {}


def test_cpu_mfu_is_labelled_as_against_a_measured_matmul():
    peak, source = mfu_peak(0.0, torch.device("cpu"), FP32)
    assert source == "measured_matmul" and peak > 0
    assert set(mfu_metrics(peak / 4, peak, source)) == {"mfu_vs_measured_matmul"}
