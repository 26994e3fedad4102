"""Every feature test runs offline: the encoders must load from the installed packages alone."""

from __future__ import annotations

import socket

import pytest
import torch


def _refuse(*args, **kwargs):
    raise AssertionError("feature code tried to open a network connection")


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    """HF_HUB_OFFLINE=1, sockets refuse to connect, exported graphs go to a temporary MMRANK_CACHE,
    and torch uses one thread (the CPU is shared with other test runs)."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("MMRANK_CACHE", str(tmp_path_factory.mktemp("mmrank_cache")))
        mp.setattr(socket.socket, "connect", _refuse)
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(threads)
