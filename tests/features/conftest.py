"""Every feature test runs offline: the encoders must load from the installed packages alone.

The feature modules run at one torch thread (`pytestmark = pytest.mark.threads(1)`): the CPU is shared
with other test runs."""

from __future__ import annotations

import socket

import pytest


def _refuse(*args, **kwargs):
    raise AssertionError("feature code tried to open a network connection")


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    """HF_HUB_OFFLINE=1, sockets refuse to connect, exported graphs go to a temporary MMRANK_CACHE."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("MMRANK_CACHE", str(tmp_path_factory.mktemp("mmrank_cache")))
        mp.setattr(socket.socket, "connect", _refuse)
        yield
