"""Throwaway PKI for the HAProxy pair: a CA and two ECDSA P-256 leaves, made at bench time.

The server leaf names `server.bench` (and 127.0.0.1); the client leaf is presented by the
client-side haproxy and verified by the server-side one against the CA, as mTLS between
two sidecars would be. HAProxy wants certificate and key in one PEM file.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_NAME = "server.bench"
LIFETIME = datetime.timedelta(hours=1)


@dataclass(frozen=True)
class Pki:
    ca: str  # CA certificate, PEM
    server: str  # server certificate + key, PEM
    client: str  # client certificate + key, PEM


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _leaf(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, common_name: str, server: bool) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if server:
        alt_names = [x509.DNSName(SERVER_NAME), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM) + _pem_key(key)


def make_pki(directory: str) -> Pki:
    """Write ca.pem, server.pem and client.pem into `directory`."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("meshctl bench CA"))
        .issuer_name(_name("meshctl bench CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pki = Pki(
        ca=os.path.join(directory, "ca.pem"),
        server=os.path.join(directory, "server.pem"),
        client=os.path.join(directory, "client.pem"),
    )
    contents = {
        pki.ca: ca_cert.public_bytes(serialization.Encoding.PEM),
        pki.server: _leaf(ca_cert, ca_key, "bench server", server=True),
        pki.client: _leaf(ca_cert, ca_key, "bench client", server=False),
    }
    for path, data in contents.items():
        with open(path, "wb") as out:
            out.write(data)
        os.chmod(path, 0o600)
    return pki
