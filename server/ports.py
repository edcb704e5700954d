"""Ports: whether one can be listened on, and free ones for tests and benchmarks."""

from __future__ import annotations

import contextlib
import errno
import socket

from postsim.core.errors import ServeError


def check_port_free(port: int, option: str, address: str = "0.0.0.0") -> None:
    """ServeError saying what to do when ``port`` cannot be listened on at ``address``.

    The probe binds with SO_REUSEADDR, as the servers do: connections of a server that just
    stopped linger in TIME_WAIT for a minute and must not make its restart fail.
    """
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise ServeError(
                    f"port {port} is already taken (is another server running?): choose a free one with {option}"
                ) from None
            raise ServeError(f"cannot use port {port} ({error.strerror}): choose another with {option}") from None


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free right now on this machine (for tests and benchmarks).

    All probes stay bound until every port is picked: picked one at a time, the kernel may hand
    out the same port twice, and tritonserver refuses to serve gRPC and HTTP on one port.
    """
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [int(probe.getsockname()[1]) for probe in probes]
