"""The one place where the device, the number format (dtype) and the CPU threads are chosen.

``pick_device()``: bfloat16 on a GPU that has it (Ampere and newer), float16 on older GPUs; on a
CPU, bfloat16 where the CPU computes it natively (AVX512-BF16 or AMX: torch's oneDNN backend says
so) and float32 elsewhere. Every choice comes with its reason in one line. ``CONCH_CPU_DTYPE``
(``auto`` | ``bf16`` | ``fp32``) overrides the CPU's choice, e.g. ``fp32`` to compare with an
older run. Training keeps its LoRA weights in float32 either way (autocast computes in bf16).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import psutil

from .errors import ConchError

CPU_DTYPES = ("auto", "bf16", "fp32")


@dataclass
class Device:
    device: str  # "cuda", "mps" or "cpu"
    dtype: "torch.dtype"  # noqa: F821
    why: str

    def __str__(self) -> str:
        return f"{self.device} ({str(self.dtype).replace('torch.', '')}): {self.why}"


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (oneDNN's check: AVX512-BF16, AMX, or Arm's BF16).

    Without it torch still runs bfloat16 on the CPU, but emulated and slower than float32."""
    import torch

    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_dtype_setting() -> str:
    value = (os.environ.get("CONCH_CPU_DTYPE") or "auto").strip().lower()
    if value not in CPU_DTYPES:
        raise ConchError(f"CONCH_CPU_DTYPE={value!r} must be one of {', '.join(CPU_DTYPES)}; fix it or unset it.")
    return value


def pick_device() -> Device:
    """bf16 on GPUs that support it, fp16 on older GPUs; on a CPU bf16 where it is native, else fp32."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        if torch.cuda.is_bf16_supported():
            return Device("cuda", torch.bfloat16, f"{name} supports bfloat16")
        return Device("cuda", torch.float16, f"{name} has no bfloat16, using float16")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return Device("mps", torch.float16, "Apple GPU (MPS)")
    threads = set_threads()
    setting, native = cpu_dtype_setting(), cpu_has_bf16()
    if setting == "fp32":
        return Device("cpu", torch.float32, f"no GPU found, float32 on {threads} CPU threads (CONCH_CPU_DTYPE=fp32)")
    if setting == "bf16":
        return Device("cpu", torch.bfloat16, f"no GPU found, bfloat16 on {threads} CPU threads (CONCH_CPU_DTYPE=bf16"
                      + ("" if native else "; this CPU emulates it, slower than float32") + ")")
    if native:
        return Device("cpu", torch.bfloat16, f"no GPU found; this CPU computes bfloat16 natively (AVX512-BF16/AMX), "
                      f"bfloat16 on {threads} CPU threads")
    return Device("cpu", torch.float32,
                  f"no GPU found; this CPU has no native bfloat16, float32 on {threads} CPU threads")


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def set_threads(n: int | None = None) -> int:
    """Use only the cores that are free: oversubscribed threads run about 10x slower.

    ``n``, else ``CONCH_THREADS``, else measured: the cores this process may use minus the cores
    that *other* processes keep busy (this process's own use is subtracted). The machine is
    sampled over a few short windows and the quietest one counts, so a burst of another process
    (an import, a short test) does not pin a whole training run to one thread; a process that is
    busy all the time is seen in every window. At least one thread.
    """
    import torch

    if n is None and os.environ.get("CONCH_THREADS"):
        value = os.environ["CONCH_THREADS"]
        if not value.strip().isdigit() or int(value) < 1:
            raise ConchError(f"CONCH_THREADS={value!r} must be a whole number of threads, 1 or more; "
                             "fix it or unset it to use the free cores.")
        n = int(value)
    if n is None:
        cores = usable_cores()
        n = max(1, min(cores, round(cores - busy_cores(cores))))
    torch.set_num_threads(int(n))
    return int(n)


def cpu_times() -> tuple[float, float, float]:
    """(all CPU seconds, idle seconds, seconds of this process), from psutil."""
    machine = psutil.cpu_times()
    own = psutil.Process().cpu_times()
    busy_fields = ("user", "nice", "system", "irq", "softirq", "steal")
    total = sum(getattr(machine, f, 0.0) for f in busy_fields) + machine.idle + getattr(machine, "iowait", 0.0)
    return total, machine.idle + getattr(machine, "iowait", 0.0), own.user + own.system


def other_loads(windows: int = 3, seconds: float = 0.1, sample=cpu_times) -> list[float]:
    """The cores other processes used in each of ``windows`` windows of ``seconds`` ([] where the counters
    cannot be read)."""
    try:
        readings = [sample()]
        for _ in range(windows):
            time.sleep(seconds)
            readings.append(sample())
    except (OSError, ValueError, IndexError, psutil.Error):
        return []
    return loads_between(readings)


def loads_between(readings: list[tuple[float, float, float]]) -> list[float]:
    """The cores other processes used between consecutive ``cpu_times()`` readings."""
    machine_cores = os.cpu_count() or 1
    loads = []
    for (total0, idle0, own0), (total1, idle1, own1) in zip(readings, readings[1:]):
        elapsed = total1 - total0
        if elapsed <= 0:
            continue
        loads.append(max(0.0, (elapsed - (idle1 - idle0) - (own1 - own0)) / elapsed * machine_cores))
    return loads


def busy_cores(cores: int, windows: int = 3, seconds: float = 0.1, sample=cpu_times) -> float:
    """How many cores other processes are using: the least over ``windows`` windows of ``seconds``
    each (0 where the counters cannot be read)."""
    loads = other_loads(windows, seconds, sample)
    return min(min(loads), cores) if loads else 0.0


def follow_free_cores(threads: int, loads: list[float]) -> int:
    """The threads to use now, given the cores other processes used in recent windows: more once they left cores
    free in every window (a test run or another notebook finished), fewer as soon as they take cores back even at
    their quietest (oversubscribed threads run about 10x slower); ``CONCH_THREADS`` fixes the number."""
    if os.environ.get("CONCH_THREADS") or not loads:
        return threads
    cores = usable_cores()
    if cores - min(loads) < threads - 0.5:  # others need some of our cores in every window
        return max(1, round(cores - min(loads)))
    # free in every window, to within half a core: a quiet machine is never exactly idle (its daemons, the
    # counters' 10 ms ticks read 0.01-0.03 cores), and waiting for exactly 0 kept a run on 1 thread for good
    free = round(cores - max(loads))
    return min(cores, free) if free > threads else threads


class CoreWatch:
    """Follows the free cores during a long CPU run without pausing it: ``threads()`` is called at every training
    step and takes one counter reading (microseconds); every ``every`` seconds it decides from the windows between
    the readings (``follow_free_cores``). Waiting for fresh windows instead (``other_loads``: 2 s of sleep every half
    minute) stopped the training for 6 % of its time."""

    def __init__(self, every: float = 30.0, min_window: float = 0.5, sample=cpu_times, clock=time.monotonic):
        self.every, self.min_window, self.sample, self.clock = every, min_window, sample, clock
        self.readings: list[tuple[float, tuple]] = []
        self.decided = clock()

    def threads(self, current: int) -> int:
        now = self.clock()
        try:
            reading = self.sample()
        except (OSError, ValueError, psutil.Error):
            return current
        if not self.readings or now - self.readings[-1][0] >= self.min_window:
            self.readings.append((now, reading))
        if now - self.decided < self.every:
            return current
        loads = loads_between([r for _, r in self.readings])
        self.readings, self.decided = self.readings[-1:], now
        return follow_free_cores(current, loads)
