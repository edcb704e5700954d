"""gRPC over mutual TLS and the admin key of Triton's restricted APIs, on a real tritonserver.

A throw-away CA signs the server's certificate (for localhost and 127.0.0.1) and a client
certificate; the server requires a client certificate signed by it, and the admin key for
model control and the repository index. Inference needs no key.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ExportedRepository, server_settings
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from postsim.client.api import PostSimClient
from postsim.client.posts import Post
from postsim.model_repository import contract
from postsim.model_repository.errors import ServerError, ServerUnavailableError
from postsim.model_repository.server import RESTRICTED_HEADER, TlsSettings, TritonServer

pytestmark = pytest.mark.integration

ADMIN_KEY = "correct-horse-battery-staple"
POST = Post(text="Sunset over the bay #summer")


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_certificate: Path
    server_key: Path
    client_certificate: Path
    client_key: Path
    other_ca: Path
    """A CA that signed nothing here."""


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    names: list[x509.GeneralName] | None = None,
    usage: list[x509.ObjectIdentifier] | None = None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, item: x509.Certificate | ec.EllipticCurvePrivateKey) -> Path:
    if isinstance(item, x509.Certificate):
        path.write_bytes(item.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(
            item.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca_key, other_key, server_key, client_key = _key(), _key(), _key(), _key()
    ca = _certificate("postsim test CA", ca_key, "postsim test CA", ca_key, ca=True)
    other_ca = _certificate("some other CA", other_key, "some other CA", other_key, ca=True)
    server = _certificate(
        "localhost",
        server_key,
        "postsim test CA",
        ca_key,
        names=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        usage=[ExtendedKeyUsageOID.SERVER_AUTH],
    )
    client = _certificate(
        "postsim client", client_key, "postsim test CA", ca_key, usage=[ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    return Pki(
        ca=_write(directory / "ca.pem", ca),
        server_certificate=_write(directory / "server.pem", server),
        server_key=_write(directory / "server.key", server_key),
        client_certificate=_write(directory / "client.pem", client),
        client_key=_write(directory / "client.key", client_key),
        other_ca=_write(directory / "other-ca.pem", other_ca),
    )


@pytest.fixture(scope="module")
def tls_server(
    exported_repository: ExportedRepository, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonServer]:
    repository = tmp_path_factory.mktemp("tls") / "repository"
    shutil.copytree(exported_repository.path, repository)
    tls = TlsSettings(certificate=pki.server_certificate, private_key=pki.server_key, client_ca=pki.ca)
    settings = server_settings(repository, tls=tls, admin_key=ADMIN_KEY, exit_timeout_s=5)
    with TritonServer(settings, log_path=repository.parent / "tritonserver.log") as server:
        yield server


@pytest.fixture(scope="module")
def url(tls_server: TritonServer) -> str:
    return tls_server.endpoints.grpc


def _mutual_tls_client(
    url: str,
    pki: Pki,
    *,
    root_certificates: Path | None = None,
    admin_key: str | None = None,
    headers: dict[str, str] | None = None,
) -> PostSimClient:
    """A client with the client certificate, trusting ``root_certificates`` (default: the test CA)."""
    return PostSimClient(
        url,
        timeout_s=10,
        ssl=True,
        root_certificates=root_certificates or pki.ca,
        private_key=pki.client_key,
        certificate_chain=pki.client_certificate,
        admin_key=admin_key,
        headers=headers,
    )


def test_a_client_with_the_ca_and_its_certificate_is_served_without_an_admin_key(url: str, pki: Pki) -> None:
    with _mutual_tls_client(url, pki) as client:
        (result,) = client.embed([POST])
    assert result.text_weight == 1.0


def test_a_plaintext_client_is_told_the_server_may_need_tls(url: str) -> None:
    with PostSimClient(url, timeout_s=10) as client, pytest.raises(ServerUnavailableError) as raised:
        client.embed([POST])
    assert "it may serve TLS only; connect with ssl=True and root_certificates" in str(raised.value)


def test_a_tls_client_without_a_client_certificate_is_refused(url: str, pki: Pki) -> None:
    client = PostSimClient(url, ssl=True, root_certificates=pki.ca, timeout_s=10)
    with client, pytest.raises(ServerUnavailableError) as raised:
        client.embed([POST])
    assert "may require a client certificate (mutual TLS); pass private_key and certificate_chain" in str(raised.value)


def test_a_server_certificate_from_another_ca_is_not_trusted(url: str, pki: Pki) -> None:
    client = _mutual_tls_client(url, pki, root_certificates=pki.other_ca)
    with client, pytest.raises(ServerUnavailableError) as raised:
        client.embed([POST])
    assert "not signed by a CA you trust" in str(raised.value)


def test_a_tls_client_of_a_plaintext_server_is_told_to_drop_tls(grpc_url: str, pki: Pki) -> None:
    client = _mutual_tls_client(grpc_url, pki)
    with client, pytest.raises(ServerUnavailableError, match="does not speak TLS"):
        client.embed([POST])


def test_model_control_needs_the_admin_key(url: str, pki: Pki) -> None:
    with _mutual_tls_client(url, pki) as client:
        with pytest.raises(ServerError, match="only with its admin key, and no admin key was given") as raised:
            client.load_model(contract.FUSER)
        assert not isinstance(raised.value, ServerUnavailableError)
        with pytest.raises(ServerError, match="admin key"):
            client.server_info()  # the repository index is restricted too
    client = _mutual_tls_client(url, pki, admin_key="wrong")
    with client, pytest.raises(ServerError, match="the admin key given was refused"):
        client.load_model(contract.FUSER)
    with _mutual_tls_client(url, pki, admin_key=ADMIN_KEY) as client:
        client.load_model(contract.FUSER)
        assert client.server_info().is_ready(contract.POST_EMBEDDING)
    # The header name the HTTP API takes works too: the client renames it for gRPC.
    with _mutual_tls_client(url, pki, headers={RESTRICTED_HEADER: ADMIN_KEY}) as client:
        client.load_model(contract.FUSER)


def test_the_launcher_uses_the_admin_key_for_its_own_model_control(
    tls_server: TritonServer, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """Reloading a model (the stub watchdog's remedy) and draining at stop go through the restricted HTTP API."""
    before = {stub.pid for stub in tls_server.stubs() if stub.model == contract.TOKENIZE}
    tls_server.reload_model(contract.TOKENIZE)
    after = {stub.pid for stub in tls_server.stubs() if stub.model == contract.TOKENIZE}
    assert after - before, "no new tokenize process: the model was not reloaded"
    with caplog.at_level(logging.INFO, logger="postsim"):
        assert tls_server.stop() == 0
    assert "stopping: post_embedding, similar_posts refuse new requests" in caplog.text
    assert "could not drain" not in caplog.text
