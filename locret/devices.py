"""Default device and dtype: what runs fastest where the user is."""
from pathlib import Path

import torch

from .errors import LocretError


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str) -> str:
    """`device` if this machine has it (cpu:0 as cpu), else one clear error."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise LocretError(f"unknown device {device!r} (use cpu or cuda)") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise LocretError(f"--device {device}: no CUDA GPU is available here (use --device cpu)")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise LocretError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    if parsed.type not in ("cpu", "cuda"):
        raise LocretError(f"--device {device} is not supported (use cpu or cuda)")
    if parsed.type == "cpu" and parsed.index not in (None, 0):
        raise LocretError(f"--device {device}: the CPU has no device index (use --device cpu)")
    return "cpu" if parsed.type == "cpu" else device  # cpu:0 is cpu


def cpu_has_native_bf16() -> bool:
    """Without AVX512-BF16 or AMX, CPU bf16 matmuls are emulated, several times slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_dtype(device: str) -> str:
    """bfloat16 on GPUs and CPUs that run it natively, else float32 (GPUs without bf16: float16)."""
    if torch.device(device).type == "cpu":
        return "bfloat16" if cpu_has_native_bf16() else "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
