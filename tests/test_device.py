"""conch.device: the device, the dtype (bf16 on CPUs that compute it natively) and the free threads."""

import os

import pytest
import torch

from conch import device as dev
from conch.errors import ConchError


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cpu_only(monkeypatch, keep_threads):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setenv("CONCH_THREADS", "1")


@pytest.mark.parametrize("native", [True, False])
def test_cpu_dtype_follows_what_the_cpu_computes_natively(cpu_only, monkeypatch, native):
    monkeypatch.delenv("CONCH_CPU_DTYPE", raising=False)
    monkeypatch.setattr(dev, "cpu_has_bf16", lambda: native)
    device = dev.pick_device()
    assert device.device == "cpu"
    assert device.dtype == (torch.bfloat16 if native else torch.float32)
    assert ("natively" in device.why) == native and ("no native" in device.why) == (not native)
    assert str(device).startswith("cpu (bfloat16)" if native else "cpu (float32)")


def test_conch_cpu_dtype_overrides_and_a_bad_value_is_one_sentence(cpu_only, monkeypatch):
    monkeypatch.setattr(dev, "cpu_has_bf16", lambda: True)
    monkeypatch.setenv("CONCH_CPU_DTYPE", "fp32")
    assert dev.pick_device().dtype == torch.float32
    monkeypatch.setattr(dev, "cpu_has_bf16", lambda: False)
    monkeypatch.setenv("CONCH_CPU_DTYPE", "bf16")
    device = dev.pick_device()
    assert device.dtype == torch.bfloat16 and "emulates" in device.why
    monkeypatch.setenv("CONCH_CPU_DTYPE", "half")
    with pytest.raises(ConchError, match="CONCH_CPU_DTYPE='half' must be one of auto, bf16, fp32"):
        dev.pick_device()


def test_the_bf16_check_asks_torch():
    expected = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert dev.cpu_has_bf16() == bool(expected)


def test_explicit_threads_and_a_bad_conch_threads(monkeypatch, keep_threads):
    monkeypatch.setenv("CONCH_THREADS", "1")
    assert dev.set_threads() == 1 == torch.get_num_threads()
    assert dev.set_threads(1) == 1
    monkeypatch.setenv("CONCH_THREADS", "two")
    with pytest.raises(ConchError, match="CONCH_THREADS='two' must be a whole number"):
        dev.set_threads()


def _times(*windows, cores=2):
    """Fake (total, idle, own) readings: each window is (other processes' busy cores, own busy cores)."""
    readings, total, idle, own = [(0, 0, 0)], 0, 0, 0
    for others, mine in windows:
        total, idle, own = total + 1.0 * cores, idle + (cores - others - mine), own + mine
        readings.append((total, idle, own))
    return iter(readings).__next__


def test_busy_cores_ignores_a_burst_but_sees_a_steady_load(monkeypatch):
    monkeypatch.setattr(dev.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(dev.time, "sleep", lambda s: None)
    burst = _times((2.0, 0), (2.0, 0), (0.0, 0))  # another process busy at the start only
    assert dev.busy_cores(2, windows=3, sample=burst) == 0.0
    steady = _times((1.0, 0), (1.0, 0), (1.0, 0))
    assert dev.busy_cores(2, windows=3, sample=steady) == pytest.approx(1.0)
    own = _times((0.0, 2.0), (0.0, 2.0), (0.0, 2.0))  # only this process is busy: nothing to leave free
    assert dev.busy_cores(2, windows=3, sample=own) == 0.0


def test_threads_follow_the_free_cores(monkeypatch, keep_threads):
    monkeypatch.delenv("CONCH_THREADS", raising=False)
    monkeypatch.setattr(dev.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(dev, "busy_cores", lambda cores: 1.0)
    assert dev.set_threads() == 1
    monkeypatch.setattr(dev, "busy_cores", lambda cores: 0.2)
    assert dev.set_threads() == 2


def test_real_readings_are_sane():
    total, idle, own = dev.cpu_times()
    assert total >= idle >= 0 and own >= 0
    assert 0.0 <= dev.busy_cores(os.cpu_count() or 1, windows=1, seconds=0.05) <= (os.cpu_count() or 1)


def _watch(*windows, every=3.0):
    """A CoreWatch fed the fake readings of ``_times`` one a second, deciding every ``every`` seconds."""
    ticks = iter(range(100))
    return dev.CoreWatch(every=every, min_window=0.5, sample=_times(*windows), clock=lambda: float(next(ticks)))


def test_threads_follow_the_free_cores_during_a_run(monkeypatch):
    monkeypatch.delenv("CONCH_THREADS", raising=False)
    monkeypatch.setattr(dev.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(dev.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    quiet = (0.0, 1.0)  # (others, this process) in a window
    assert dev.loads_between([(0, 0, 0), (0, 0, 0)]) == []  # the counters did not move: no window
    assert dev.follow_free_cores(1, [0.0, 0.0, 0.0]) == 2  # the other job finished
    assert dev.follow_free_cores(1, [0.0, 1.0, 0.0]) == 1  # busy in one window: not free on end, stay
    assert dev.follow_free_cores(1, [0.02, 0.0, 0.03]) == 2  # a quiet machine's background (measured: 0.00-0.02)
    assert dev.follow_free_cores(1, [0.6, 0.0, 0.0]) == 1  # more than half a core taken in one window: stay
    assert dev.follow_free_cores(2, [0.02, 0.03, 0.01]) == 2
    assert dev.follow_free_cores(2, [1.0, 1.0, 1.0]) == 1  # another job took a core back in every window: give it back
    assert dev.follow_free_cores(2, [1.0, 0.0, 0.0]) == 2  # a burst: keep both
    assert dev.follow_free_cores(2, []) == 2  # no readings: keep

    # during training: one reading a step (no waiting), a decision once `every` seconds have passed
    watch = _watch(quiet, quiet, quiet)
    assert [watch.threads(1) for _ in range(3)] == [1, 1, 2]  # the 3rd step (t=3 s) decides from 2 quiet windows
    watch = _watch(*[(1.0, 1.0)] * 3)
    assert [watch.threads(2) for _ in range(3)] == [2, 2, 1]
    watch = _watch(quiet, (1.0, 1.0), quiet)
    assert [watch.threads(1) for _ in range(3)] == [1, 1, 1]
    monkeypatch.setenv("CONCH_THREADS", "1")
    assert dev.follow_free_cores(1, [0.0, 0.0]) == 1  # fixed by the user
    assert [_watch(quiet, quiet, quiet, quiet).threads(1) for _ in range(1)] == [1]
