"""Mutual TLS on every public port and the admin key, on a real server (front end and tritonserver).

A throw-away CA signs the server's certificate (for localhost and 127.0.0.1) and a client
certificate; the server requires a client certificate signed by it on gRPC, HTTP and
metrics, answers plaintext only on the health port it was given, and requires the admin
key for model control, the repository index, shared memory, log and trace settings.
Inference needs no key.
"""

from __future__ import annotations

import datetime as dt
import http.client
import ipaddress
import json
import logging
import shutil
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from support import ExportedRepository, server_settings
from tritonclient.grpc import InferenceServerClient
from tritonclient.utils import InferenceServerException

from postsim.client.api import PostSimClient
from postsim.client.posts import Post
from postsim.core.errors import ServerError, ServerUnavailableError
from postsim.model_repository import contract
from postsim.model_repository.protocol import RESTRICTED_HEADER
from postsim.server.front_end import TlsSettings
from postsim.server.launcher import TritonServer
from postsim.server.ports import free_ports

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
    (health_port,) = free_ports(1)
    settings = server_settings(
        repository, tls=tls, admin_key=ADMIN_KEY, exit_timeout_s=5, health_address=f"127.0.0.1:{health_port}"
    )
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


# --------------------------------------------------------------------------- HTTP, metrics, health


def _client_context(pki: Pki) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(pki.client_certificate, pki.client_key)
    return context


def _plaintext_answer(url: str) -> int | None:
    """The HTTP status a plaintext request to ``url`` gets, or None when the server refuses to talk."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, ConnectionError, http.client.HTTPException):
        return None


def test_plaintext_http_to_a_tls_server_is_refused(tls_server: TritonServer) -> None:
    http_port, metrics_port = tls_server.settings.http_port, tls_server.settings.metrics_port
    assert _plaintext_answer(f"http://127.0.0.1:{http_port}/v2/models/{contract.SIMILAR_POSTS}") is None
    assert _plaintext_answer(f"http://127.0.0.1:{http_port}/v2/health/ready") is None
    assert _plaintext_answer(f"http://127.0.0.1:{metrics_port}/metrics") is None


def test_https_with_the_client_certificate_is_served(tls_server: TritonServer, pki: Pki) -> None:
    context = _client_context(pki)
    assert tls_server.endpoints.http.startswith("https://")
    with urllib.request.urlopen(f"{tls_server.endpoints.http}/v2/health/ready", context=context, timeout=10) as answer:
        assert answer.status == 200
    body = {
        "inputs": [
            {"name": "IMAGE", "shape": [1, 1], "datatype": "BYTES", "data": [""]},
            {"name": "TEXT", "shape": [1, 1], "datatype": "BYTES", "data": ["sunset over the bay"]},
        ]
    }
    request = urllib.request.Request(
        f"{tls_server.endpoints.http}/v2/models/{contract.POST_EMBEDDING}/infer", data=json.dumps(body).encode()
    )
    with urllib.request.urlopen(request, context=context, timeout=60) as answer:
        assert {output["name"] for output in json.loads(answer.read())["outputs"]} >= {contract.EMBEDDING.name}
    with urllib.request.urlopen(tls_server.endpoints.metrics, context=context, timeout=10) as answer:
        assert b"nv_inference_count" in answer.read()
    without_certificate = ssl.create_default_context(cafile=str(pki.ca))
    with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
        urllib.request.urlopen(f"{tls_server.endpoints.http}/v2/health/ready", context=without_certificate, timeout=10)


def test_the_health_port_answers_health_alone_in_plaintext(tls_server: TritonServer) -> None:
    health = f"http://{tls_server.settings.health_address}"
    assert _plaintext_answer(f"{health}/v2/health/live") == 200
    assert _plaintext_answer(f"{health}/v2/health/ready") == 200
    assert _plaintext_answer(f"{health}/v2/models/{contract.POST_EMBEDDING}") == 404
    assert _plaintext_answer(f"{health}/v2/repository/index") == 404


def test_log_and_trace_settings_need_the_admin_key(url: str, pki: Pki, tls_server: TritonServer) -> None:
    def triton_client() -> InferenceServerClient:
        return InferenceServerClient(
            url,
            ssl=True,
            root_certificates=str(pki.ca),
            private_key=str(pki.client_key),
            certificate_chain=str(pki.client_certificate),
        )

    with triton_client() as client:
        for call in (
            lambda: client.update_log_settings({"log_verbose_level": 1}),
            lambda: client.get_log_settings(),
            lambda: client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]}),
            lambda: client.get_system_shared_memory_status(),
        ):
            with pytest.raises(InferenceServerException, match="restricted") as refused:
                call()
            assert refused.value.status() == "StatusCode.PERMISSION_DENIED"
        admin = {"triton-grpc-protocol-postsim-admin-key": ADMIN_KEY}
        assert client.get_log_settings(headers=admin).settings["log_verbose_level"].uint32_param == 0
    request = urllib.request.Request(
        f"{tls_server.endpoints.http}/v2/logging", data=json.dumps({"log_verbose_level": 1}).encode()
    )
    with pytest.raises(urllib.error.HTTPError) as forbidden:
        urllib.request.urlopen(request, context=_client_context(pki), timeout=10)
    assert forbidden.value.code == 403 and "restricted" in forbidden.value.read().decode()


def test_the_admin_key_is_on_no_command_line(tls_server: TritonServer) -> None:
    """Every local user can read every process's command line (/proc/PID/cmdline)."""
    holders = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if ADMIN_KEY.encode() in cmdline.read_bytes():
                holders.append(cmdline.parent.name)
        except OSError:
            continue  # gone meanwhile
    assert holders == []


# Last: it stops the module's server.
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
