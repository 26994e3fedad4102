"""Hold the machine's CPU wake-up latency limit (Linux PM QoS, /dev/cpu_dma_latency) while serving or
measuring.

An idle CPU sleeps in the deepest idle state whose wake-up latency fits the limit. On a virtual machine
the usual idle state halts the virtual CPU: the host takes the core, and each hand-off of a request
between threads that found their CPU idle waits for a wake-up through the hypervisor. A limit of 0 us
keeps idle CPUs in the polling state instead, so those hand-offs go as on a busy server. The limit holds for the whole machine for as long as the device stays open (the kernel's
interface: write a 32-bit value, keep the file open), which is what `cyclictest` and the latency
profiles of `tuned` do. Writing it needs root. The price is power: polling CPUs never rest.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from common.errors import MMRankError

PM_QOS_DEVICE = Path("/dev/cpu_dma_latency")
MAX_US = 2**31 - 1  # the device takes a signed 32-bit value
NO_LIMIT_US = 2_000_000_000  # what the device reads while nothing holds a limit


class CpuLatencyHold:
    """The limit at `us` microseconds from `acquire()` (or entering `with`) until `release()`.

    Several holds at once (other processes' included) leave the machine at the lowest of them.
    """

    def __init__(self, us: int, device: Path = PM_QOS_DEVICE):
        if not 0 <= us <= MAX_US:
            raise MMRankError(f"CPU wake-up latency {us} us: expected 0 to {MAX_US}")
        self.us, self.device = us, Path(device)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> CpuLatencyHold:
        if self._fd is not None:
            return self
        try:
            fd = os.open(self.device, os.O_WRONLY)
        except FileNotFoundError:
            raise MMRankError(
                f"cannot hold the CPU wake-up latency: {self.device} is missing (a kernel without CPU PM "
                "QoS, or a container without the device): run without the latency option"
            ) from None
        except PermissionError:
            raise MMRankError(
                f"cannot hold the CPU wake-up latency: writing {self.device} needs root: run as root or "
                "without the latency option"
            ) from None
        except OSError as e:
            raise self._failed(e) from None
        try:
            os.write(fd, struct.pack("=i", self.us))
        except OSError as e:
            os.close(fd)
            raise self._failed(e) from None
        self._fd = fd
        return self

    def _failed(self, e: OSError) -> MMRankError:
        return MMRankError(
            f"cannot hold the CPU wake-up latency at {self.us} us: {self.device}: {e.strerror}"
        )

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> CpuLatencyHold:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def describe(self) -> str:
        return f"CPU wake-up latency held at {self.us} us ({self.device})"


def current_limit_us(device: Path = PM_QOS_DEVICE) -> int:
    """The limit the machine applies now: the lowest of every hold, or NO_LIMIT_US where nothing holds
    one. Reading the device needs root too."""
    try:
        with open(device, "rb") as f:
            raw = f.read(4)
    except OSError as e:
        raise MMRankError(f"cannot read the CPU wake-up latency limit: {device}: {e.strerror}") from None
    if len(raw) != 4:
        raise MMRankError(f"cannot read the CPU wake-up latency limit: {device} gave {len(raw)} bytes, not 4")
    return struct.unpack("=i", raw)[0]
