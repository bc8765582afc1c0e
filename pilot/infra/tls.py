"""TLS certificates and SuperNode authentication keys for a local stack.

``curtail-llm up`` with ``[launch] tls = true`` serves the SuperLink over TLS with a private CA
made here (or with the certificate files the preset names), and with ``supernode_auth = true``
lets only SuperNodes whose public keys were registered connect (Flower's CLI-managed
authentication, which needs TLS). Keys and certificates are written 0600 into the run
directory and never logged.

    ca_and_server_cert(dir, hosts) -> TlsFiles      private CA + a server certificate
    node_key(dir, site) -> (private, public) paths   ECDSA P-384 key pair in OpenSSH format
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CERT_DAYS = 30  # a local stack's certificates live as long as a long run, not forever


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path  # given to SuperNodes (--root-certificates) and the flwr connection
    cert: Path  # the SuperLink's certificate (--ssl-certfile)
    key: Path  # its private key (--ssl-keyfile)


def _write_private(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def _certificate(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    signing_key: ec.EllipticCurvePrivateKey,
    *extensions: tuple[x509.ExtensionType, bool],
) -> x509.Certificate:
    """A certificate valid from 5 minutes ago (clock skew) for CERT_DAYS, signed by
    `signing_key`; `extensions` are (extension, critical) pairs."""
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signing_key, hashes.SHA384())


def ca_and_server_cert(directory: str | Path, hosts: list[str]) -> TlsFiles:
    """A private CA and a SuperLink certificate for `hosts` (IPs or DNS names) signed by it.
    Existing files in `directory` are reused, so a restarted stack keeps trusting its nodes."""
    d = Path(directory)
    files = TlsFiles(d / "ca.crt", d / "superlink.crt", d / "superlink.key")
    if all(p.is_file() for p in (files.ca_cert, files.cert, files.key)):
        return files
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "curtail-llm local CA")])
    ca = _certificate(
        ca_name,
        ca_name,
        ca_key.public_key(),
        ca_key,
        (x509.BasicConstraints(ca=True, path_length=0), True),
    )
    key = ec.generate_private_key(ec.SECP384R1())
    cert = _certificate(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]),
        ca_name,
        key.public_key(),
        ca_key,
        (_san(hosts), False),
        (x509.BasicConstraints(ca=False, path_length=None), True),
    )
    d.mkdir(parents=True, exist_ok=True)
    files.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(
        files.key,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    return files


def node_key(directory: str | Path, site: str) -> tuple[Path, Path]:
    """The SuperNode authentication key pair of `site` (created once, then reused): ECDSA on
    NIST P-384 in OpenSSH format, as `flwr supernode register` and
    `flower-supernode --auth-supernode-private-key` read them."""
    d = Path(directory)
    private, public = d / f"{site}.key", d / f"{site}.pub"
    if private.is_file() and public.is_file():
        return private, public
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(
        private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b"\n"
    )
    return private, public
