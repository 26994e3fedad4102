"""Holding the CPU wake-up latency limit: what is written, when it is let go, and what a machine that
cannot hold one says."""

import os
import struct

import pytest

from common.cpu_latency import MAX_US, PM_QOS_DEVICE, CpuLatencyHold, current_limit_us
from common.errors import MMRankError


def test_hold_writes_the_limit_and_keeps_the_file_open_until_released(tmp_path):
    device = tmp_path / "cpu_dma_latency"
    device.write_bytes(b"")
    hold = CpuLatencyHold(20, device)
    assert not hold.held
    with hold:
        assert hold.held and hold.acquire() is hold  # a second acquire holds nothing more
        assert device.read_bytes() == struct.pack("=i", 20)
        assert current_limit_us(device) == 20
        assert hold.describe() == f"CPU wake-up latency held at 20 us ({device})"
    assert not hold.held
    hold.release()  # releasing twice is harmless


@pytest.mark.parametrize("us", [-1, MAX_US + 1])
def test_a_limit_outside_the_devices_range_is_refused(us):
    with pytest.raises(MMRankError, match=f"CPU wake-up latency {us} us: expected 0 to {MAX_US}"):
        CpuLatencyHold(us)


def test_a_missing_device_says_so(tmp_path):
    missing = tmp_path / "none"
    with pytest.raises(MMRankError, match=f"{missing} is missing"):
        CpuLatencyHold(0, missing).acquire()
    with pytest.raises(MMRankError, match=f"cannot read the CPU wake-up latency limit: {missing}"):
        current_limit_us(missing)


def test_a_device_that_refuses_the_value_leaves_nothing_open(tmp_path):
    hold = CpuLatencyHold(0, tmp_path)  # a folder: opening it for writing fails
    with pytest.raises(MMRankError, match="cannot hold the CPU wake-up latency"):
        hold.acquire()
    assert not hold.held


def test_a_short_read_is_named(tmp_path):
    device = tmp_path / "short"
    device.write_bytes(b"\x00\x00")
    with pytest.raises(MMRankError, match="gave 2 bytes, not 4"):
        current_limit_us(device)


def test_the_machines_device():
    """Where this process may write the kernel's device, a hold of 0 us is the machine's limit while it
    lasts (whatever other processes hold, none is lower); elsewhere the hold names the device and why."""
    hold = CpuLatencyHold(0)
    if PM_QOS_DEVICE.exists() and os.access(PM_QOS_DEVICE, os.W_OK):
        with hold:
            assert current_limit_us() == 0
        assert not hold.held
    else:
        with pytest.raises(MMRankError, match=str(PM_QOS_DEVICE)):
            hold.acquire()
