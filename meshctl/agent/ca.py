"""The mesh's certificate authority: a long-lived root, short-lived SPIFFE leaves.

Files under `$MESHCTL_HOME/ca/` (directory 0700, keys 0600):

    ca.key, ca.crt     the signing CA: our own ECDSA P-256 root, or one the user imported
    bundle.pem         the trust bundle: every root a peer may chain to right now
    previous.crt       during a CA rotation, the old root, kept in the bundle for the overlap

Leaf keys never touch the disk: the agent sends each sidecar its own key over that
sidecar's private config channel, so a process of the mesh can only get its own identity.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshctl.agent.errors import AgentError

ROOT_LIFETIME = dt.timedelta(days=3650)
DEFAULT_LEAF_LIFETIME_S = 24 * 3600.0
CLOCK_SKEW = dt.timedelta(minutes=1)  # leaves are valid slightly in the past, for skewed clocks


class CAError(AgentError):
    code = "ca-invalid"


@dataclass(frozen=True)
class Leaf:
    identity: str
    cert_pem: str
    key_pem: str
    chain_pem: str  # the leaf followed by any intermediate, as a TLS peer must present it
    serial: str
    not_before: float
    not_after: float
    fingerprint: str  # sha256 of the DER, hex with colons

    def public(self) -> dict:
        """Everything about the leaf that is safe to show: never the key."""
        return {
            "identity": self.identity,
            "serial": self.serial,
            "not_before": self.not_before,
            "not_after": self.not_after,
            "fingerprint": self.fingerprint,
        }


def spiffe_id(trust_domain: str, service: str) -> str:
    return f"spiffe://{trust_domain}/service/{service}"


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex(":")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def new_root(mesh: str, lifetime: dt.timedelta = ROOT_LIFETIME) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshctl"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"meshctl root for {mesh} {_now():%Y-%m-%d %H:%M:%S}"),
        ]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def validate_ca(cert: x509.Certificate, key: object) -> None:
    """An imported CA must be a CA, match its key, be usable for signing, and be current."""
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CAError("the CA key must be an EC or RSA private key")
    if cert.public_key().public_numbers() != key.public_key().public_numbers():  # type: ignore[union-attr]
        raise CAError("the CA key does not belong to the CA certificate")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise CAError("the certificate has no BasicConstraints: it is not a CA") from None
    if not constraints.ca:
        raise CAError("the certificate is not a CA (BasicConstraints CA:FALSE)")
    if cert.not_valid_after_utc <= _now():
        raise CAError(f"the CA certificate expired on {cert.not_valid_after_utc:%Y-%m-%d}")


class CertificateAuthority:
    def __init__(self, directory: Path, mesh: str) -> None:
        self.directory = directory
        self.mesh = mesh
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        if not (directory / "ca.key").exists():
            key, cert = new_root(mesh)
            self._save(key, cert, chain=b"")
        self._load()

    # -- state on disk ------------------------------------------------------------------

    def _save(self, key, cert: x509.Certificate, chain: bytes) -> None:
        _write_private(self.directory / "ca.key", _key_pem(key))
        _write_private(self.directory / "ca.crt", _cert_pem(cert))
        _write_private(self.directory / "chain.pem", chain)

    def _load(self) -> None:
        self.key = serialization.load_pem_private_key((self.directory / "ca.key").read_bytes(), None)
        self.cert = x509.load_pem_x509_certificate((self.directory / "ca.crt").read_bytes())
        chain_path = self.directory / "chain.pem"
        self.chain = chain_path.read_bytes() if chain_path.exists() else b""
        previous = self.directory / "previous.crt"
        self.previous = x509.load_pem_x509_certificate(previous.read_bytes()) if previous.exists() else None
        staged = self.directory / "next.crt"
        self.next = x509.load_pem_x509_certificate(staged.read_bytes()) if staged.exists() else None

    @property
    def bundle_pem(self) -> str:
        """The trust anchors: the current CA, plus the staged or the old one during a rotation."""
        certs = [self.cert] + [c for c in (self.next, self.previous) if c is not None]
        return "".join(_cert_pem(c).decode() for c in certs)

    def root_info(self) -> dict:
        info = {
            "subject": self.cert.subject.rfc4514_string(),
            "not_after": self.cert.not_valid_after_utc.timestamp(),
            "fingerprint": fingerprint(self.cert),
            "imported": bool(self.chain) or self.cert.issuer != self.cert.subject,
        }
        for label, other in (("next", self.next), ("previous", self.previous)):
            if other is not None:
                info[label] = {
                    "subject": other.subject.rfc4514_string(),
                    "not_after": other.not_valid_after_utc.timestamp(),
                    "fingerprint": fingerprint(other),
                }
        return info

    # -- issuing --------------------------------------------------------------------------

    def issue(self, identity: str, lifetime_s: float = DEFAULT_LEAF_LIFETIME_S) -> Leaf:
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        not_after = min(now + dt.timedelta(seconds=lifetime_s), self.cert.not_valid_after_utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshctl")]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=False, crl_sign=False, content_commitment=False,
                    key_encipherment=False, data_encipherment=False, key_agreement=True,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.cert.public_key()),  # type: ignore[arg-type]
                critical=False,
            )
            .sign(self.key, hashes.SHA256())  # type: ignore[arg-type]
        )
        cert_pem = _cert_pem(cert).decode()
        # An imported intermediate travels with each leaf so that peers can build the chain.
        chain_pem = cert_pem + self.chain.decode()
        return Leaf(
            identity=identity,
            cert_pem=cert_pem,
            key_pem=_key_pem(key).decode(),
            chain_pem=chain_pem,
            serial=format(cert.serial_number, "x"),
            not_before=cert.not_valid_before_utc.timestamp(),
            not_after=cert.not_valid_after_utc.timestamp(),
            fingerprint=fingerprint(cert),
        )

    # -- rotation and import ----------------------------------------------------------------
    #
    # Three phases, each pushed to every sidecar and ACKed before the next, so that no peer
    # ever meets a certificate it does not trust yet:
    #   stage:  the new CA is trusted (bundle = current + next) but does not sign yet;
    #   commit: the new CA signs; every leaf is reissued (bundle = new + previous);
    #   finish: the old CA is no longer trusted.

    def stage(self, key, cert: x509.Certificate, chain: bytes = b"") -> None:
        _write_private(self.directory / "next.key", _key_pem(key))
        _write_private(self.directory / "next.crt", _cert_pem(cert))
        _write_private(self.directory / "next-chain.pem", chain)
        self._load()

    def stage_new_root(self) -> None:
        key, cert = new_root(self.mesh)
        self.stage(key, cert)

    def stage_import(self, cert_pem: bytes, key_pem: bytes) -> None:
        """Bring your own root or intermediate (PEM, unencrypted key)."""
        try:
            certs = x509.load_pem_x509_certificates(cert_pem)
        except ValueError as exc:
            raise CAError(f"cannot read the CA certificate: {exc}") from None
        try:
            key = serialization.load_pem_private_key(key_pem, None)
        except (ValueError, TypeError) as exc:
            raise CAError(f"cannot read the CA key (it must be PEM and unencrypted): {exc}") from None
        ca_cert, intermediates = certs[0], certs[1:]
        validate_ca(ca_cert, key)
        # An intermediate travels with every leaf so that outside verifiers can build the chain.
        chain = b"".join(_cert_pem(c) for c in [ca_cert, *intermediates]) if ca_cert.issuer != ca_cert.subject else b""
        self.stage(key, ca_cert, chain)

    def commit(self) -> None:
        if self.next is None:
            raise CAError("no CA rotation is staged")
        _write_private(self.directory / "previous.crt", _cert_pem(self.cert))
        for name in ("key", "crt"):
            os.replace(self.directory / f"next.{name}", self.directory / f"ca.{name}")
        os.replace(self.directory / "next-chain.pem", self.directory / "chain.pem")
        self._load()

    def finish(self) -> None:
        (self.directory / "previous.crt").unlink(missing_ok=True)
        self._load()
