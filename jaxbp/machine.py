"""What machine a measurement ran on: the CPU's model, caches and SIMD extensions, as Linux says.

The fastest formulation depends on the machine (`jaxbp.tune`), so the benchmark records these
with every run and the tuning cache keys its entries by them.
"""

from __future__ import annotations

import functools
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time
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


@functools.cache
def simd_flags(root: str = "/") -> frozenset[str]:
    """The SIMD extensions of `cpu_features` ("avx2", "avx512f", ...) as a set, read once: the
    formulation rules that differ between CPUs key on them (`jaxbp.formulations`)."""
    return frozenset(cpu_features(root)["cpu_simd"].split())


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


# The helper's half of `CoreRoundTrip`: pinned to its core, it answers each odd value written into
# the shared 8 bytes with the next even one, as many times as each line on stdin asks. While it
# spins it looks every 2^20 spins whether its parent is still there: a parent killed mid-burst
# would otherwise leave it spinning on a core for good.
_HELPER_SCRIPT = """
import mmap, os, sys
os.sched_setaffinity(0, {int(sys.argv[1])})
parent = os.getppid()
with open(sys.argv[2], "r+b") as f:
    ball = memoryview(mmap.mmap(f.fileno(), 8)).cast("q")
for line in sys.stdin:
    print("ready", flush=True)
    for i in range(int(line)):
        spins = 0
        while ball[0] != 2 * i + 1:
            spins += 1
            if spins & 0xFFFFF == 0 and os.getppid() != parent:
                sys.exit(1)
        ball[0] = 2 * i + 2
"""


class CoreRoundTrip:
    """How far apart two cores are: the time for a value written on one to be seen, and answered,
    on the other, through 8 bytes of shared memory, by two Python processes spinning on it.

    On a virtual machine the host may run the vCPUs on cores that share a cache at some times and
    not at others. On the 2-core AMD EPYC of experiments/PERFORMANCE.md ("Why the two-core time has
    two levels") a cache line's round trip timed in C was about 65 ns most of the time and about
    470 ns at others; timed here (Python's loop adds its own cost) the medians were about 600-800
    ns at the lower level and 800-1300 at the higher, and the multithreaded update step ran
    1.3-1.5x slower at the higher level while work on one core did not change. Recording it beside
    a timing says which level the timing ran at.

    A helper process, pinned to the second core, answers; the calling thread is pinned to the
    first core while it times and then given its cores back. Linux only; two usable cores or more.

        with CoreRoundTrip() as trip:
            ns = trip.measure()
    """

    @staticmethod
    def available() -> bool:
        """Whether a round trip can be timed here: Linux, and two usable cores or more."""
        return hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2

    def __init__(self, cores: tuple[int, int] | None = None):
        if not hasattr(os, "sched_setaffinity"):
            raise ValueError("cores: timing a round trip between cores needs os.sched_setaffinity (Linux)")
        usable = sorted(os.sched_getaffinity(0))
        cores = tuple(usable[:2]) if cores is None else cores
        if (
            not isinstance(cores, (tuple, list))
            or len(cores) != 2
            or any(isinstance(c, bool) or not isinstance(c, int) or c not in usable for c in cores)
            or cores[0] == cores[1]
        ):
            raise ValueError(f"cores must be two different usable cores among {usable}, got {cores!r}")
        self.cores = tuple(cores)
        # In memory where Linux has it: a page of a disk-backed file could be written back mid-burst.
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self._file = tempfile.NamedTemporaryFile(prefix="jaxbp_core_trip_", dir=shm)
        self._file.write(bytes(8))
        self._file.flush()
        self._map = mmap.mmap(self._file.fileno(), 8)
        self._ball = memoryview(self._map).cast("q")
        self._helper = subprocess.Popen(
            [sys.executable, "-c", _HELPER_SCRIPT, str(self.cores[1]), self._file.name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def measure(self, trips: int = 2000, bursts: int = 5) -> float:
        """The median over `bursts` bursts of each burst's mean round trip, in ns, over `trips`."""
        if isinstance(trips, bool) or not isinstance(trips, int) or trips < 1:
            raise ValueError(f"trips must be a positive int, got {trips!r}")
        if isinstance(bursts, bool) or not isinstance(bursts, int) or bursts < 1:
            raise ValueError(f"bursts must be a positive int, got {bursts!r}")
        mask = os.sched_getaffinity(0)  # this thread's
        os.sched_setaffinity(0, {self.cores[0]})
        try:
            return statistics.median(self._burst(trips) for _ in range(bursts))
        finally:
            os.sched_setaffinity(0, mask)

    def _gone(self) -> RuntimeError:
        return RuntimeError(f"the round-trip helper exited ({self._helper.poll()})")

    def _burst(self, trips: int) -> float:
        ball = self._ball
        ball[0] = 0  # even: the helper, blocked on stdin, waits for 1
        try:
            self._helper.stdin.write(f"{trips}\n")
            self._helper.stdin.flush()
        except OSError:  # a broken pipe: it died
            raise self._gone() from None
        if self._helper.stdout.readline() != "ready\n":
            raise self._gone()
        start = time.perf_counter()
        for i in range(trips):
            ball[0] = 2 * i + 1
            spins = 0
            while ball[0] != 2 * i + 2:
                spins += 1
                if spins & 0xFFFFF == 0 and self._helper.poll() is not None:
                    raise self._gone()
        return (time.perf_counter() - start) / trips * 1e9

    def close(self) -> None:
        """End the helper (killed if it does not end on its own: stuck mid-burst) and free the memory."""
        if self._helper.poll() is None:
            try:
                self._helper.stdin.close()
                self._helper.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self._helper.kill()
                self._helper.wait()
        self._helper.stdout.close()
        self._ball.release()
        self._map.close()
        self._file.close()

    def __enter__(self) -> CoreRoundTrip:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
