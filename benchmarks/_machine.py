"""The machine description printed next to every benchmark figure."""

import platform


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what platform knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


def bf16_capability() -> str:
    """What the CPU offers bfloat16: the AVX512_BF16 and AMX flags of /proc/cpuinfo (Linux), and the SIMD level
    PyTorch's CPU kernels were dispatched to (torch.backends.cpu.get_cpu_capability)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = set(next(line.split(":", 1)[1].split() for line in fh if line.startswith("flags")))
    except (OSError, StopIteration):
        flags = None
    import torch

    cap = torch.backends.cpu.get_cpu_capability()
    if flags is None:
        return f"CPU flags unknown, torch CPU capability {cap}"
    have = [f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"bf16: {' '.join(have).upper() or 'no native bf16 (no AVX512_BF16 / AMX)'}, torch CPU capability {cap}"
