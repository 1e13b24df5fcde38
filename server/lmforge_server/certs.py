"""Certificates for TLS: a private CA and the certificates it signs.

`lmforge up --tls` uses `local_tls` to generate a CA and a server certificate for
localhost into the data directory (once; later runs reuse them); tests use the same
functions to build CAs, server and client certificates of their own.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lmforge_server.artifacts import write_file_atomic

VALID_DAYS = 825


@dataclass(frozen=True)
class Pem:
    cert: bytes
    key: bytes


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _builder(subject: str, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
    )


def make_ca(name: str = "lmforge local CA") -> Pem:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        _builder(name, subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return Pem(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def issue(ca: Pem, name: str, hosts: tuple[str, ...] = (), *, client: bool = False) -> Pem:
    """A certificate signed by `ca`: for a server (`hosts` as its names) or a client."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert)
    ca_key = serialization.load_pem_private_key(ca.key, password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = _builder(name, ca_cert.subject, key.public_key()).add_extension(
        x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]
        ),
        critical=False,
    )
    if hosts:
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return Pem(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


@dataclass(frozen=True)
class LocalTls:
    ca_file: Path
    cert_file: Path
    key_file: Path


def local_tls(directory: Path) -> LocalTls:
    """A CA and a localhost server certificate in `directory` (generated once)."""
    files = LocalTls(directory / "ca.pem", directory / "server.pem", directory / "server-key.pem")
    if not all(p.is_file() for p in (files.ca_file, files.cert_file, files.key_file)):
        ca = make_ca()
        server = issue(ca, "localhost", ("localhost", "127.0.0.1", "::1"))
        write_file_atomic(files.ca_file, ca.cert)
        write_file_atomic(directory / "ca-key.pem", ca.key)
        write_file_atomic(files.cert_file, server.cert)
        write_file_atomic(files.key_file, server.key)
        for secret in (directory / "ca-key.pem", files.key_file):
            secret.chmod(0o600)
    return files
