"""producers.tls: ``amqps://`` URLs get a verifying TLS context that trusts the CA file."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pika
import pytest

from producers.tls import connection_parameters

# A throwaway test CA and a "localhost" / 127.0.0.1 server certificate it signed (P-256, valid
# for 100 years). Test material only: nothing trusts this CA outside this file.
TEST_CA = """-----BEGIN CERTIFICATE-----
MIIBjjCCATOgAwIBAgIULKg9zvy7VG7LVv4bYy2r3YpTSz4wCgYIKoZIzj0EAwIw
GzEZMBcGA1UEAwwQZXhpdHBpcGUgdGVzdCBDQTAgFw0yNjExMjUxMzAxMDVaGA8y
MTI2MTEwMTEzMDEwNVowGzEZMBcGA1UEAwwQZXhpdHBpcGUgdGVzdCBDQTBZMBMG
ByqGSM49AgEGCCqGSM49AwEHA0IABMxKWvC+x3wpv2i/1rphUvc3Nxgpily+q8kM
OSTuUc7VGBxemRLECpauONP6NVXomEY4Uc4ptaHEe7XYuOaawzejUzBRMB0GA1Ud
DgQWBBREpzJqZmZGgBsKTH/Wxz/I4TXB7zAfBgNVHSMEGDAWgBREpzJqZmZGgBsK
TH/Wxz/I4TXB7zAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0kAMEYCIQDA
6q0S5aOeYS0d/KLzTGIT3QiSwLQVA+StjfokjmFM5gIhANlV9IO5W8zDyyejSX3t
oz5LWWoSPmrtm1SPBhDEgH6M
-----END CERTIFICATE-----
"""
SERVER_CERT = """-----BEGIN CERTIFICATE-----
MIIBwDCCAWagAwIBAgIUZi4uPxIzAO8KNhZwiRvEc9Q6zBkwCgYIKoZIzj0EAwIw
GzEZMBcGA1UEAwwQZXhpdHBpcGUgdGVzdCBDQTAgFw0yNjExMjUxMzAxMTBaGA8y
MTI2MTEwMTEzMDExMFowFDESMBAGA1UEAwwJbG9jYWxob3N0MFkwEwYHKoZIzj0C
AQYIKoZIzj0DAQcDQgAEzDNGj9A7cgNuhLnTscgpHfXS0AuKPbUBpw1insQy9E65
ej8tFZ3Vas3+fd22JNWt/V/bO8FphMXRykcwXBiwwaOBjDCBiTAaBgNVHREEEzAR
gglsb2NhbGhvc3SHBH8AAAEwCQYDVR0TBAIwADALBgNVHQ8EBAMCB4AwEwYDVR0l
BAwwCgYIKwYBBQUHAwEwHQYDVR0OBBYEFDyIJVKU0I6PNnq4tjs1IbiVBz8fMB8G
A1UdIwQYMBaAFESnMmpmZkaAGwpMf9bHP8jhNcHvMAoGCCqGSM49BAMCA0gAMEUC
IFFrJVQSi55IHyM1ZVXTg5iPjpWWimV64JhiHicGi6bVAiEA36EKJMKyNjPkDFgH
7iwq07tmdHtRWXRW6aUq32Ju5ZY=
-----END CERTIFICATE-----
"""
SERVER_KEY = """-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgYKTs9VYYYkEWuLGs
8Jg4NhxIb770hj3yLgeklwOxOPOhRANCAATMM0aP0DtyA26EudOxyCkd9dLQC4o9
tQGnDWKexDL0Trl6Py0VndVqzf593bYk1a39X9s7wWmExdHKRzBcGLDB
-----END PRIVATE KEY-----
"""


@pytest.fixture
def ca_file(tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    path.write_text(TEST_CA)
    return path


@contextmanager
def tls_server(tmp_path: Path) -> Iterator[int]:
    """A loopback TLS server with the test certificate that completes one handshake."""
    (tmp_path / "srv.pem").write_text(SERVER_CERT)
    (tmp_path / "srv.key").write_text(SERVER_KEY)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "srv.pem", tmp_path / "srv.key")
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with context.wrap_socket(conn, server_side=True):
                pass
        except (ssl.SSLError, OSError):
            pass  # the client refused the certificate: that is what some tests expect

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        thread.join(5)
        listener.close()


def handshake(params: pika.URLParameters, port: int) -> None:
    """Connect to 127.0.0.1:port and do the TLS handshake pika would do with ``params``."""
    options = params.ssl_options
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        options.context.wrap_socket(raw, server_hostname=options.server_hostname),
    ):
        pass


def test_amqp_has_no_tls_and_ignores_the_ca_file(ca_file: Path) -> None:
    params = connection_parameters("amqp://u:p@broker:5672/%2F", ca_file, heartbeat=7)
    assert params.ssl_options is None
    assert (params.host, params.port, params.heartbeat) == ("broker", 5672, 7)


def test_amqps_verifies_against_the_ca_file_and_the_url_host(ca_file: Path) -> None:
    params = connection_parameters("amqps://u:p@broker.example/vh", ca_file, heartbeat=11)
    options = params.ssl_options
    assert isinstance(options, pika.SSLOptions)
    assert options.server_hostname == "broker.example"
    assert options.context.verify_mode is ssl.CERT_REQUIRED and options.context.check_hostname
    assert options.context.cert_store_stats()["x509_ca"] == 1  # the file's CA, nothing else
    assert (params.port, params.heartbeat, params.virtual_host) == (5671, 11, "vh")


def test_amqps_without_a_ca_file_uses_the_system_trust_store() -> None:
    params = connection_parameters("amqps://broker.example:5671/%2F", None, heartbeat=30)
    assert params.ssl_options.server_hostname == "broker.example"
    assert params.ssl_options.context.verify_mode is ssl.CERT_REQUIRED


def test_handshake_succeeds_with_the_ca_file(ca_file: Path, tmp_path: Path) -> None:
    with tls_server(tmp_path) as port:
        handshake(connection_parameters(f"amqps://localhost:{port}/", ca_file, 30), port)


def test_handshake_fails_without_the_ca_file(tmp_path: Path) -> None:
    with tls_server(tmp_path) as port, pytest.raises(ssl.SSLCertVerificationError):
        handshake(connection_parameters(f"amqps://localhost:{port}/", None, 30), port)


def test_handshake_fails_when_the_certificate_names_another_host(
    ca_file: Path, tmp_path: Path
) -> None:
    with tls_server(tmp_path) as port, pytest.raises(ssl.SSLCertVerificationError):
        handshake(connection_parameters(f"amqps://broker.example:{port}/", ca_file, 30), port)


def test_a_missing_ca_file_is_an_error_at_once(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        connection_parameters("amqps://broker.example/", tmp_path / "missing.pem", 30)
