"""How a client connects to a postsim server: one frozen settings object, checked once.

:class:`ClientSettings` is what :class:`~postsim.client.api.PostSimClient` and
:class:`~postsim.client.api.AsyncPostSimClient` are built from (their keyword arguments are
its fields), and what the benchmarks pass around to open more clients like one another.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from postsim.core.errors import PostSimError
from postsim.model_repository.protocol import GRPC_RESTRICTED_HEADER, RESTRICTED_HEADER

DEFAULT_URL = "localhost:8001"
"""Where ``postsim serve`` listens for gRPC by default, seen from the same machine."""
DEFAULT_TIMEOUT_S = 60.0
"""End-to-end limit of one gRPC call (one chunk of at most ``max_batch_size`` posts)."""
Resolver = Callable[..., list[tuple[Any, ...]]]
"""How a name becomes addresses: :func:`socket.getaddrinfo`'s signature (tests pass a stub)."""


@dataclass(frozen=True, kw_only=True)
class ClientSettings:
    """A postsim server's gRPC endpoint and how to talk to it; every field is checked when it is built.

    ``url`` is the gRPC target ``host:port``. ``timeout_s`` bounds each gRPC call (None: no
    limit). The TLS files are paths, used only with ``ssl=True``: ``root_certificates`` is
    the CA that signed the server's certificate, ``private_key`` and ``certificate_chain``
    the client's own for mutual TLS. ``headers`` go with every call as gRPC metadata;
    ``admin_key`` is the server's key for model control and the repository index
    (``postsim serve --admin-key``), inference needs none. ``shrink_images`` resizes each
    image larger than the encoder needs to its scale and sends it as a JPEG
    (:mod:`postsim.client.shrink`): far fewer bytes on the wire, an embedding that moves slightly.
    """

    url: str = DEFAULT_URL
    timeout_s: float | None = DEFAULT_TIMEOUT_S
    ssl: bool = False
    root_certificates: str | Path | None = None
    private_key: str | Path | None = None
    certificate_chain: str | Path | None = None
    headers: Mapping[str, str] | None = field(default=None, hash=False)
    admin_key: str | None = field(default=None, repr=False)
    shrink_images: bool = False

    def __post_init__(self) -> None:
        url = self.url
        if not isinstance(url, str) or not url:
            raise PostSimError(f"url must be a non-empty 'host:port' string; got {url!r}")
        if url.startswith(("http://", "https://")):
            raise PostSimError(f"url is a gRPC target 'host:port' (e.g. {DEFAULT_URL}), not an HTTP URL; got {url!r}")
        if (self.private_key is None) != (self.certificate_chain is None):
            raise PostSimError("private_key and certificate_chain go together (mutual TLS): pass both or neither")
        if self.headers is not None:
            for key, value in self.headers.items():
                if not isinstance(key, str) or not isinstance(value, str) or key != key.lower():
                    raise PostSimError(
                        f"headers must map lower-case str names to str values (gRPC metadata); got {key!r}: {value!r}"
                    )
        if self.admin_key is not None and (not isinstance(self.admin_key, str) or not self.admin_key):
            raise PostSimError("admin_key must be a non-empty str or None")
        object.__setattr__(self, "timeout_s", checked_timeout(self.timeout_s))
        for name in ("root_certificates", "private_key", "certificate_chain"):
            _check_tls_file(getattr(self, name), name, self.ssl)

    @property
    def grpc_headers(self) -> dict[str, str] | None:
        """The gRPC metadata to send: Triton's gRPC server expects the admin key under a prefixed name.

        ``RESTRICTED_HEADER`` given in ``headers`` (as the HTTP API takes it) is renamed too.
        """
        merged = dict(self.headers or {})
        if RESTRICTED_HEADER in merged:
            merged[GRPC_RESTRICTED_HEADER] = merged.pop(RESTRICTED_HEADER)
        if self.admin_key is not None:
            merged[GRPC_RESTRICTED_HEADER] = self.admin_key
        return merged or None

    @property
    def sends_admin_key(self) -> bool:
        return GRPC_RESTRICTED_HEADER in (self.grpc_headers or {})

    @property
    def client_certificate(self) -> bool:
        return self.certificate_chain is not None

    def channel_arguments(self) -> dict[str, Any]:
        """The TLS arguments of tritonclient's ``InferenceServerClient`` (sync and aio alike)."""
        return {
            "ssl": bool(self.ssl),
            "root_certificates": _path_text(self.root_certificates),
            "private_key": _path_text(self.private_key),
            "certificate_chain": _path_text(self.certificate_chain),
        }

    def poll_timeout(self, remaining: float) -> float:
        """The timeout of one readiness poll with ``remaining`` seconds left to wait."""
        return max(0.01, min(remaining, self.timeout_s or remaining))


def checked_timeout(timeout_s: float | None, name: str = "timeout_s") -> float | None:
    """``timeout_s`` as a float; PostSimError unless it is a positive number of seconds or None."""
    if timeout_s is None:
        return None
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or not timeout_s > 0:
        raise PostSimError(f"{name} must be a positive number of seconds or None; got {timeout_s!r}")
    return float(timeout_s)


def _check_tls_file(path: str | Path | None, name: str, ssl: bool) -> None:
    if path is None:
        return
    if not ssl:
        raise PostSimError(f"{name} is only used over TLS: pass ssl=True (got {name}={str(path)!r} with ssl=False)")
    if not Path(path).is_file():
        raise PostSimError(f"{name} file {str(path)!r} does not exist")


def _path_text(path: str | Path | None) -> str | None:
    return None if path is None else str(path)


def replica_urls(name: str, *, resolve: Resolver = socket.getaddrinfo) -> tuple[str, ...]:
    """One gRPC target per address ``name`` (``host:port``) resolves to, sorted and each once.

    For a Kubernetes headless Service (``postsim-replicas.postsim.svc:8001``), whose name
    resolves to one address per replica, this is one target per replica. An IPv6 address
    comes back in brackets (``[fd00::1]:8001``), as gRPC takes it.
    """
    host, sep, port_text = name.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise PostSimError(f"--replicas takes HOST:PORT (e.g. postsim-replicas.postsim.svc:8001); got {name!r}")
    port = int(port_text)
    try:
        answers = resolve(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as error:
        raise PostSimError(f"cannot resolve {host} (from --replicas {name}): {error}") from None
    addresses = {str(answer[4][0]) for answer in answers}
    if not addresses:
        raise PostSimError(f"{host} (from --replicas {name}) resolves to no address: are any replicas running?")
    return tuple(
        f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        for address in sorted(addresses, key=lambda address: (":" in address, address))
    )
