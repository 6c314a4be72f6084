"""What machine a measurement ran on: the CPU's model, caches and SIMD extensions, as Linux says.

The fastest formulation depends on the machine (`jaxbp.tune`), so the benchmark records these
with every run and the tuning cache keys its entries by them.
"""

from __future__ import annotations

import os
from pathlib import Path


def cpuinfo(root: str = "/") -> dict[str, str]:
    """cpu0's fields of Linux's /proc/cpuinfo under `root` ("model name", "flags", ...); empty
    where there is none to read."""
    fields: dict[str, str] = {}
    try:
        text = Path(root, "proc/cpuinfo").read_text()
    except (OSError, ValueError):  # unreadable, or not text
        return fields
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if fields:  # the blank line after cpu0's block
                break
            continue
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_features(root: str = "/") -> dict:
    """The CPU's caches (cpu0's, as Linux reports them under `root`: e.g. "L2 512K"), its SIMD
    extensions, on which the chunks' best working set and XLA's and oneDNN's kernels depend
    (the formulation rules were measured on an Intel Xeon whose caches were not recorded; an AMD
    EPYC with a 512K L2 had other best chunks), and its vendor, family and model numbers (e.g.
    "AuthenticAMD family 23 model 49", a Zen 2): two CPUs that share a model name ("AMD EPYC"
    under a hypervisor) differed in L3 and in which taps form was faster. Empty strings where
    Linux does not say."""
    caches = []
    for index in sorted(Path(root, "sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind, size = ((index / f).read_text().strip() for f in ("level", "type", "size"))
        except (OSError, ValueError):  # unreadable, or not text
            continue
        suffix = "" if kind in ("Unified", "") else kind[0].lower()  # L1d, L1i; L2, L3
        caches.append(f"L{level}{suffix} {size}")
    info = cpuinfo(root)
    flags = info.get("flags", "").split()
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    vendor, family, model = (info.get(k, "") for k in ("vendor_id", "cpu family", "model"))
    numbers = f"{vendor} family {family} model {model}" if family and model else ""
    return {"cpu_caches": ", ".join(caches), "cpu_simd": " ".join(simd), "cpu_model": numbers.strip()}


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask: taskset, a container's cpuset),
    else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def pin_cores(n: int) -> list[int]:
    """Pin this process to the first `n` of the cores it may run on, and return them. Call it
    before JAX starts its CPU client: XLA sizes its thread pool when the backend starts, and
    processes started later (the benchmark's peers) inherit the mask. The first `n` in Linux's
    numbering of logical CPUs: where a host numbers the two threads of a core next to each other,
    2 of them can be one physical core. Linux only."""
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("cores: pinning needs os.sched_setaffinity (Linux)")
    available = sorted(os.sched_getaffinity(0))
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(available):
        raise ValueError(f"cores must be an int between 1 and {len(available)} (the usable cores), got {n!r}")
    os.sched_setaffinity(0, available[:n])
    return available[:n]
