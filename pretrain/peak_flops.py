"""The MFU denominator: the declared per-device peak, else the published dense peak of this GPU, else none.

MFU is model FLOPs per second over the device's peak. On a GPU the peak is the vendor's *dense* (no 2:4 sparsity)
tensor-core figure for the training dtype; a 1024x1024 matmul timed at start reaches a fraction of it on an
H100/H200 and would overstate MFU several times over. An unknown GPU without ``train.peak_tflops`` gets no MFU
(one warning), never a number against the wrong peak. On the CPU there is no published figure: the best of a few
dense matmuls is measured and the metric says so (``mfu_vs_measured_matmul``).
"""

from __future__ import annotations

import re
import time
import warnings

import torch

# Dense TFLOP/s per GPU (bf16 and fp16 tensor cores; fp32 = non-tensor FP32, what torch uses for fp32 matmuls with
# TF32 off, its default). Sources: the NVIDIA datasheets — "NVIDIA H100 Tensor Core GPU" (SXM5 / PCIe / NVL; the
# datasheet's tensor figures are with sparsity, halved here), "NVIDIA H200 Tensor Core GPU" (SXM / NVL, same
# convention), "NVIDIA A100 Tensor Core GPU" (dense figures given; SXM and PCIe equal), "NVIDIA L4", "NVIDIA L40S",
# "NVIDIA A10", "NVIDIA Tesla V100" (SXM2 / PCIe; tensor cores fp16 only, no bf16), "NVIDIA HGX B200" (8-GPU
# totals with sparsity: / 8 / 2).
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 SXM": {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "fp32": 59.8},
    "H200 SXM": {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9},
    "H200 NVL": {"bf16": 835.5, "fp16": 835.5, "fp32": 59.8},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3},
    "L40S": {"bf16": 362.05, "fp16": 362.05, "fp32": 91.6},
    "A10": {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2},
    "V100 SXM2": {"fp16": 125.0, "fp32": 15.7},
    "V100 PCIe": {"fp16": 112.0, "fp32": 14.0},
    "B200": {"bf16": 2250.0, "fp16": 2250.0, "fp32": 75.0},
}

# torch.cuda.get_device_name() spellings -> table row; first match wins (PCIe/NVL before the SXM default).
_NAMES = [
    (r"H100.*(PCIe|PCIE)", "H100 PCIe"), (r"H100.*NVL", "H100 NVL"), (r"H100", "H100 SXM"),
    (r"H200.*NVL", "H200 NVL"), (r"H200", "H200 SXM"),
    (r"A100", "A100"), (r"\bL40S\b", "L40S"), (r"\bL4\b", "L4"), (r"\bA10(\s|$)", "A10"),
    (r"V100.*(PCIe|PCIE)", "V100 PCIe"), (r"V100", "V100 SXM2"), (r"\bB200\b", "B200"),
]
_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def table_row(device_name: str) -> str | None:
    """The :data:`PEAK_TFLOPS` row of a CUDA device name, or None for a GPU not in the table."""
    for pattern, row in _NAMES:
        if re.search(pattern, device_name):
            return row
    return None


def published_peak_flops(device_name: str, dtype: torch.dtype) -> float | None:
    """Published dense peak FLOP/s of ``device_name`` in ``dtype``; None when the GPU or the dtype is not listed."""
    row = table_row(device_name)
    tflops = PEAK_TFLOPS.get(row, {}).get(_DTYPES.get(dtype, ""))
    return None if tflops is None else tflops * 1e12


def measure_peak_flops(dtype: torch.dtype, n: int = 1024, repeats: int = 5, device: str = "cpu") -> float:
    """Dense matmul FLOP/s on ``device`` (the best of a few runs): the CPU's MFU denominator."""
    # Its own generator: it runs after a resume restored the RNG state, and a draw from the global stream here
    # made the first resumed step's MAE masks / dropout differ from the uninterrupted run's (issue #17).
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def mfu_peak(declared_tflops: float, device: torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    """(peak FLOP/s or None, where it came from) — the one place the MFU denominator is decided.

    Sources: ``declared`` (``train.peak_tflops``), ``published:<row>`` (a CUDA device in the table),
    ``measured_matmul`` (CPU), ``unknown`` (a CUDA device not in the table: no MFU, one warning)."""
    if declared_tflops:
        return declared_tflops * 1e12, "declared"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = published_peak_flops(name, dtype)
        if peak is None:
            warnings.warn(f"MFU not logged: no published dense {_DTYPES.get(dtype, dtype)} peak for {name!r}; "
                          "set train.peak_tflops to the device's peak TFLOP/s", stacklevel=2)
            return None, "unknown"
        return peak, f"published:{table_row(name)}"
    return measure_peak_flops(dtype), "measured_matmul"


def mfu_metrics(achieved_flops_per_s: float, peak: float | None, source: str) -> dict[str, float]:
    """The MFU metric under a name that says what it is measured against (none without a peak)."""
    if peak is None:
        return {}
    key = "mfu_vs_measured_matmul" if source == "measured_matmul" else "mfu"
    return {key: achieved_flops_per_s / peak}
