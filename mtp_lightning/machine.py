"""What a measurement ran on: one description, with one set of keys, for every JSON the project writes
(``bench``, ``bench-train``, a sweep's ``metrics.json``) and for ``trainer.precision=auto``'s choice.

Figures differ between CPUs that have native bf16 matrix units (AVX512-BF16, AMX) and CPUs that have
only AVX2, so the description names the CPU and which of those instruction sets it has.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


SIMD_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
"""The /proc/cpuinfo flags that change the speed of this project's kernels."""
FAST_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpuinfo() -> tuple[str, set[str]]:
    """(the CPU's model name, its flags) from /proc/cpuinfo's first processor; elsewhere the platform's
    name and no flags."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine() or "?"
    return name, set(fields.get("flags", "").split())


def cpu_has_fast_bf16() -> bool:
    return bool(_cpuinfo()[1] & set(FAST_BF16_FLAGS))


def describe_machine() -> dict:
    """cpu (model name), cpu_flags (those of ``SIMD_FLAGS`` it has), cores, threads (torch's), torch,
    python, load_average_1min, gpu (the CUDA device's name, or None)."""
    import torch  # here, not at the top: the sweep and the config checks import this module first

    name, flags = _cpuinfo()
    return {"cpu": name, "cpu_flags": [f for f in SIMD_FLAGS if f in flags], "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def machine_line(m: dict) -> str:
    """One line for reports: ``AMD EPYC 7B13 (avx2), 2 cores, 1 thread(s), torch 2.13.0, GPU: none``."""
    flags = f" ({', '.join(m['cpu_flags'])})" if m.get("cpu_flags") else ""
    return (f"{m['cpu']}{flags}, {m['cores']} cores, {m['threads']} thread(s), torch {m['torch']}, "
            f"GPU: {m['gpu'] or 'none'}")
