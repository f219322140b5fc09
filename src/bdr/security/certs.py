"""Certificates for mutual TLS between bdr_client and bdr_server (``bdr certs``), for people who have no PKI.

One private CA signs one server and one client certificate; each daemon trusts only that CA.  Keys are ECDSA
P-256 (fast handshakes, supported everywhere), written unencrypted with mode 0600 because the daemons start
unattended.  The CA key is needed only to issue more certificates: keep it off the replication hosts.

Files in the output directory::

    ca.pem      the CA certificate          both daemons: --tls-ca
    ca.key      the CA private key          keep it offline
    server.pem  server certificate          bdr_server --tls-cert (name(s): --server-name, as DNS or IP SAN)
    server.key  its key                     bdr_server --tls-key
    client.pem  client certificate          bdr_client --tls-cert
    client.key  its key                     bdr_client --tls-key

Made with the ``cryptography`` package rather than the openssl command: no dependence on the installed
openssl's version and flags, typed, and testable in-process.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
LEAF_DAYS = 1825
FILES = ("ca.pem", "ca.key", "server.pem", "server.key", "client.pem", "client.key")


class CertError(Exception):
    """The certificates cannot be created; the message says why."""


@dataclass(frozen=True)
class Issued:
    out: Path
    reused_ca: bool
    server_names: tuple[str, ...]
    client_name: str

    def path(self, name: str) -> Path:
        return self.out / name


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "BDR"), x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    )


def _san(names: tuple[str, ...]) -> x509.SubjectAlternativeName:
    general: list[x509.GeneralName] = []
    for n in names:
        try:
            general.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            general.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(general)


def _write(path: Path, data: bytes, private: bool, force: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600 if private else 0o644)
    except FileExistsError:
        raise CertError(f"{path} exists; use --force to replace it") from None
    except OSError as exc:
        raise CertError(f"cannot write {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "wb") as f:
        if private:
            os.fchmod(f.fileno(), 0o600)
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_ca(out: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    cert_path, key_path = out / "ca.pem", out / "ca.key"
    if not (cert_path.exists() and key_path.exists()):
        return None
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise CertError(f"cannot reuse the CA in {out}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{key_path} is not an EC key made by 'bdr certs'")
    return cert, key


def make(
    out: Path,
    server_names: tuple[str, ...],
    client_name: str = "bdr-client",
    days: int = LEAF_DAYS,
    force: bool = False,
) -> Issued:
    """Create (or reuse, if ``out`` has ca.pem and ca.key) the CA, then a server and a client certificate."""
    if not server_names:
        raise CertError("give at least one --server-name (the host name or IP address clients connect to)")
    if days < 1:
        raise CertError("--days must be positive")
    try:
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise CertError(f"cannot create {out}: {exc.strerror}") from exc
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)  # clock skew between hosts
    loaded = _load_ca(out)
    reused = loaded is not None
    if loaded is None:
        ca_key = _key()
        ca_name = _name(f"BDR replication CA for {server_names[0]}")
        ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
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
            .add_extension(ca_ski, critical=False)
            .sign(ca_key, hashes.SHA256())
        )
    else:
        ca_cert, ca_key = loaded

    def leaf(cn: str, names: tuple[str, ...], usage: x509.ObjectIdentifier) -> tuple[bytes, bytes]:
        key = _key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(_san(names), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)

    server_pem, server_key = leaf(server_names[0], server_names, ExtendedKeyUsageOID.SERVER_AUTH)
    client_pem, client_key = leaf(client_name, (client_name,), ExtendedKeyUsageOID.CLIENT_AUTH)
    targets = ["server.pem", "server.key", "client.pem", "client.key"]
    if not reused:
        targets += ["ca.pem", "ca.key"]
    if not force:
        for name in targets:
            if (out / name).exists():
                raise CertError(f"{out / name} exists; use --force to replace it")
    if not reused:
        _write(out / "ca.key", _pem_key(ca_key), True, force)
        _write(out / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM), False, force)
    _write(out / "server.key", server_key, True, force)
    _write(out / "server.pem", server_pem, False, force)
    _write(out / "client.key", client_key, True, force)
    _write(out / "client.pem", client_pem, False, force)
    return Issued(out, reused, server_names, client_name)
