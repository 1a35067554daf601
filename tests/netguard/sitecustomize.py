"""Loaded by subprocesses the tests start (PYTHONPATH): any network attempt fails loudly.

Unix-domain sockets stay allowed (multiprocessing uses them); every other
connect or name lookup raises, and is written to $DETECTOR_NETLOG if set, so a
test can assert that the tool never tried. DETECTOR_NETGUARD_LOOPBACK=1 also lets
through loopback (127.0.0.1, localhost, ::1), for tests of Ray, which needs it.
"""

import os
import socket

_LOG = os.environ.get("DETECTOR_NETLOG")


def _refuse(what):
    if _LOG:
        with open(_LOG, "a") as f:
            f.write(f"{os.getpid()} {what}\n")
    raise OSError(f"network access blocked by the test suite: {what}")


_connect = socket.socket.connect
_connect_ex = socket.socket.connect_ex
_getaddrinfo = socket.getaddrinfo
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def loopback_allowed(host) -> bool:
    """True for a loopback host while DETECTOR_NETGUARD_LOOPBACK=1 (Ray tests: Ray talks to itself over TCP)."""
    return os.environ.get("DETECTOR_NETGUARD_LOOPBACK") == "1" and host in LOOPBACK_HOSTS


def _guarded_connect(self, address, *a):
    if self.family == socket.AF_UNIX or (isinstance(address, tuple) and loopback_allowed(address[0])):
        return _connect(self, address, *a)
    _refuse(f"connect {address!r}")


def _guarded_connect_ex(self, address, *a):
    if self.family == socket.AF_UNIX or (isinstance(address, tuple) and loopback_allowed(address[0])):
        return _connect_ex(self, address, *a)
    _refuse(f"connect_ex {address!r}")


def _guarded_getaddrinfo(host, *a, **k):
    if loopback_allowed(host):
        return _getaddrinfo(host, *a, **k)
    _refuse(f"getaddrinfo {host!r}")


socket.socket.connect = _guarded_connect
socket.socket.connect_ex = _guarded_connect_ex
socket.getaddrinfo = _guarded_getaddrinfo
socket.gethostbyname = lambda host: _refuse(f"gethostbyname {host!r}")
socket.gethostbyname_ex = lambda host: _refuse(f"gethostbyname_ex {host!r}")
