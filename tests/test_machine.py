"""jaxbp.machine: the CPU's caches and SIMD extensions read from Linux's files (here a fake tree)."""

import os
import subprocess
import sys
import time

import pytest

from jaxbp import machine


def test_cpu_features_read_linux_caches_and_flags(tmp_path):
    cache = tmp_path / "sys/devices/system/cpu/cpu0/cache"
    for i, (level, kind, size) in enumerate(
        [(1, "Data", "32K"), (1, "Instruction", "32K"), (2, "Unified", "512K")]
    ):
        (cache / f"index{i}").mkdir(parents=True)
        for name, value in (("level", level), ("type", kind), ("size", size)):
            (cache / f"index{i}" / name).write_text(f"{value}\n")
    (cache / "index3").mkdir()  # a cache Linux does not describe is skipped
    (tmp_path / "proc").mkdir()
    info = "vendor_id\t: AuthenticAMD\ncpu family\t: 23\nmodel\t\t: 49\nmodel name\t: X\n"
    (tmp_path / "proc/cpuinfo").write_text(info + "flags\t\t: fpu sse avx2 fma\nbugs\t: none\n")
    assert machine.cpu_features(str(tmp_path)) == {
        "cpu_caches": "L1d 32K, L1i 32K, L2 512K",
        "cpu_simd": "avx2 fma",
        "cpu_model": "AuthenticAMD family 23 model 49",
    }
    assert machine.simd_flags(str(tmp_path)) == frozenset({"avx2", "fma"})  # what the rules key on
    # Without the family (not every architecture's cpuinfo has one): no numbers.
    (tmp_path / "proc/cpuinfo").write_text("model name\t: X\nmodel\t\t: 49\n")
    assert machine.cpu_features(str(tmp_path))["cpu_model"] == ""
    empty = {"cpu_caches": "", "cpu_simd": "", "cpu_model": ""}
    assert machine.cpu_features(str(tmp_path / "nothing")) == empty


def test_usable_cores_are_the_affinity_mask_where_there_is_one():
    cores = machine.usable_cores()
    assert 1 <= cores <= os.cpu_count()
    if hasattr(os, "sched_getaffinity"):
        assert cores == len(os.sched_getaffinity(0))


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="pinning needs Linux")
def test_pin_cores_pins_the_first_n_usable_cores_and_names_the_argument_when_out_of_range():
    # In a subprocess: the mask is inherited by nothing else of the test run.
    code = (
        "import os; from jaxbp.machine import pin_cores, usable_cores; "
        "first = sorted(os.sched_getaffinity(0))[0]; "
        "print(pin_cores(1) == [first], usable_cores(), sorted(os.sched_getaffinity(0)) == [first])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "1", "True"]
    before = os.sched_getaffinity(0)
    for bad in (0, len(before) + 1, 1.0, True):
        with pytest.raises(ValueError, match=r"^cores must be an int between 1 and"):
            machine.pin_cores(bad)
    assert os.sched_getaffinity(0) == before  # a refused call pins nothing


TWO_CORES = machine.CoreRoundTrip.available()


@pytest.mark.skipif(not TWO_CORES, reason="a round trip between cores needs Linux and 2 usable cores")
def test_core_round_trip_times_a_pinned_helper_and_gives_the_thread_its_cores_back():
    before = os.sched_getaffinity(0)
    with machine.CoreRoundTrip() as trip:
        helper = trip._helper
        ns = trip.measure(trips=200, bursts=3)  # the helper answered: it had pinned itself first
        status = open(f"/proc/{helper.pid}/status").read()
        allowed = next(
            line.split()[1] for line in status.splitlines() if line.startswith("Cpus_allowed_list")
        )
        assert os.sched_getaffinity(0) == before  # this thread's cores, restored
        # A round trip is two cache-line transfers plus Python's loop: tens of ns at least, and on
        # the machines measured 0.5-1.4 us; a millisecond would mean the helper was not spinning.
        assert 10 < ns < 1e6
        with pytest.raises(ValueError, match=r"^trips must be a positive int, got 0"):
            trip.measure(trips=0)
        with pytest.raises(ValueError, match=r"^bursts must be a positive int, got True"):
            trip.measure(bursts=True)
    assert int(allowed) == trip.cores[1]  # the helper spun on the second core alone
    assert helper.returncode == 0  # and it ended when closed


@pytest.mark.skipif(not TWO_CORES, reason="a round trip between cores needs Linux and 2 usable cores")
def test_core_round_trip_names_the_cores_argument_when_they_are_not_two_usable_cores():
    usable = sorted(os.sched_getaffinity(0))
    for bad in ((usable[0],), (usable[0], usable[0]), (usable[0], max(usable) + 1), (True, usable[1])):
        with pytest.raises(ValueError, match=r"^cores must be two different usable cores among"):
            machine.CoreRoundTrip(bad)


@pytest.mark.skipif(not TWO_CORES, reason="a round trip between cores needs Linux and 2 usable cores")
def test_core_round_trip_reports_a_helper_that_died_instead_of_spinning_forever(monkeypatch):
    # Dead before a burst: refused at the burst's start.
    with machine.CoreRoundTrip() as trip:
        trip._helper.kill()
        trip._helper.wait()
        with pytest.raises(RuntimeError, match="the round-trip helper exited"):
            trip.measure(trips=10, bursts=1)
    # Dead in the middle of one (it says it is ready, then never answers): the spin notices.
    monkeypatch.setattr(
        machine, "_HELPER_SCRIPT", "import sys; sys.stdin.readline(); print('ready', flush=True)"
    )
    with machine.CoreRoundTrip() as trip:
        with pytest.raises(RuntimeError, match="the round-trip helper exited"):
            trip.measure(trips=10, bursts=1)


@pytest.mark.skipif(not TWO_CORES, reason="a round trip between cores needs Linux and 2 usable cores")
def test_core_round_trip_helper_ends_when_its_parent_dies_mid_burst():
    # A parent killed while its helper waits for the next value: the helper must not spin on.
    code = (
        "import os, sys; from jaxbp import machine; t = machine.CoreRoundTrip(); "
        "print(t._helper.pid, flush=True); t._helper.stdin.write('1000000\\n'); t._helper.stdin.flush(); "
        "t._helper.stdout.readline(); os._exit(0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    helper = int(out.stdout.split()[0])
    for _ in range(100):  # it checks its parent every 2^20 spins: well under a second
        if not os.path.exists(f"/proc/{helper}") or "zombie" in open(f"/proc/{helper}/status").read():
            break
        time.sleep(0.05)
    else:
        os.kill(helper, 9)
        pytest.fail("the helper kept spinning after its parent died")
