"""Every feature test runs offline: the encoders must load from the installed packages alone.

The feature modules run at one torch thread (`pytestmark = pytest.mark.threads(1)`): the CPU is shared
with other test runs."""

from __future__ import annotations

import ipaddress
import socket

import pytest

_connect = socket.socket.connect


def _refuse(sock, address, *args, **kwargs):
    """Loopback stays open: a tritonserver another test module started is watched over it by its
    launcher's thread meanwhile."""
    host = address[0] if isinstance(address, tuple) else None
    try:
        loopback = host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise AssertionError(f"feature code tried to open a network connection to {address}")
    return _connect(sock, address, *args, **kwargs)


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    """HF_HUB_OFFLINE=1, sockets refuse to connect beyond loopback, exported graphs go to a temporary MMRANK_CACHE."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("MMRANK_CACHE", str(tmp_path_factory.mktemp("mmrank_cache")))
        mp.setattr(socket.socket, "connect", _refuse)
        yield
