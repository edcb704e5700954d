"""``replica_urls``: a name such as a headless Service becomes one gRPC target per address, with a stub resolver."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from typer.testing import CliRunner

from postsim.cli.main import app
from postsim.client.settings import replica_urls
from postsim.core.errors import PostSimError


def _resolver(*addresses: str) -> Any:
    """getaddrinfo's answers for ``addresses`` (each twice, as a resolver may give one per protocol)."""
    asked: list[tuple[str, int]] = []

    def resolve(host: str, port: int, **_: object) -> list[tuple[Any, ...]]:
        asked.append((host, port))
        return [
            (socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))
            for address in addresses + addresses
        ]

    resolve.asked = asked  # type: ignore[attr-defined]
    return resolve


def test_every_address_of_the_name_is_one_target_each_once() -> None:
    resolve = _resolver("10.0.0.7", "10.0.0.3", "fd00::5")
    urls = replica_urls("postsim-replicas.postsim.svc:8001", resolve=resolve)
    assert urls == ("10.0.0.3:8001", "10.0.0.7:8001", "[fd00::5]:8001")
    assert resolve.asked == [("postsim-replicas.postsim.svc", 8001)]
    assert replica_urls("[fd00::5]:9001", resolve=_resolver("fd00::5")) == ("[fd00::5]:9001",)


@pytest.mark.parametrize("name", ["postsim-replicas", "postsim-replicas:", ":8001", "host:http", "host:70000"])
def test_a_name_without_a_port_is_refused_with_the_form_expected(name: str) -> None:
    with pytest.raises(PostSimError, match=r"--replicas takes HOST:PORT \(e.g. postsim-replicas"):
        replica_urls(name, resolve=_resolver("10.0.0.1"))


def test_a_name_that_does_not_resolve_is_named() -> None:
    def fail(host: str, port: int, **_: object) -> list[tuple[Any, ...]]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(PostSimError, match=r"cannot resolve nowhere.invalid \(from --replicas nowhere.invalid:8001\)"):
        replica_urls("nowhere.invalid:8001", resolve=fail)
    with pytest.raises(PostSimError, match="resolves to no address: are any replicas running"):
        replica_urls("empty:8001", resolve=_resolver())


def test_publish_says_which_replicas_name_it_cannot_resolve(tmp_path: Any) -> None:
    """Through the real resolver: a name under .invalid never resolves (RFC 6761), and nothing is installed."""
    result = CliRunner().invoke(
        app,
        ["index", "publish", str(tmp_path), "--repository", str(tmp_path), "--replicas", "replicas.invalid:8001"],
    )
    assert result.exit_code == 1, result.output
    assert "cannot resolve replicas.invalid (from --replicas replicas.invalid:8001)" in " ".join(result.output.split())
