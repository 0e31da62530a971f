"""`pdserve certs DIR`: a development certificate authority for mutual TLS between the tiers.

One CA (`ca.pem`, with its key `ca-key.pem` kept beside it so more certificates can be issued later) signs one
certificate per tier (`NAME.pem`, `NAME-key.pem`). Each tier is both a server (prefill and decode answer the
gateway; decode answers prefill's KV pushes) and a client of another, so every certificate carries both the
serverAuth and clientAuth extended key usages, and names the tier itself (the compose / Kubernetes service
name a peer dials) plus the local hosts (`localhost`, `127.0.0.1`) in its subjectAltName.

Keys are EC P-256: small, fast handshakes, and accepted by every TLS stack grpcio ships with (BoringSSL).
Private keys are written 0600 in a 0700 directory. `ensure_certs` reuses what is there while it is still
good (parseable, signed by the CA beside it, names every host asked for, not expiring within a week), so
`pdserve up` can call it on every start without invalidating a CA already handed to clients.

This is for development and private deployments: production should use the organisation's own CA."""

import argparse
import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.edge.server import Tls
from pdserve.command import Command

TIERS = ("gateway", "prefill", "decode")
LOCAL_HOSTS = ("localhost", "127.0.0.1")
RENEW_WITHIN = datetime.timedelta(days=7)
# Backdate certificates a little so a peer whose clock runs behind this one's still accepts them.
_CLOCK_SKEW = datetime.timedelta(minutes=5)
_CA_NAME = "pdserve development CA"


@dataclass(frozen=True)
class CertFiles:
    """Where the CA and each tier's (certificate, key) pair live."""

    ca: Path
    ca_key: Path
    tiers: dict[str, tuple[Path, Path]] = field(default_factory=dict)

    def for_tier(self, name: str) -> tuple[Path, Path]:
        """(certificate, key) of one tier, for --tls-cert and --tls-key."""
        if name not in self.tiers:
            raise KeyError(f"no certificate for {name!r}; made for: {', '.join(self.tiers)}")
        return self.tiers[name]


def gateway_identity(directory: Path) -> Tls | None:
    """The gateway's certificate from `directory`, the identity tools use to call internal tiers the way the
    gateway does (health checks, Stats); None when the directory holds no CA (plaintext tiers)."""
    files = cert_files(directory, ("gateway",))
    if not files.ca.exists():
        return None
    return Tls.from_files(*files.for_tier("gateway"), files.ca)


def cert_files(directory: Path, names: Sequence[str]) -> CertFiles:
    """The paths make_certs writes in `directory` (whether or not they exist yet)."""
    return CertFiles(directory / "ca.pem", directory / "ca-key.pem",
                     {name: (directory / f"{name}.pem", directory / f"{name}-key.pem") for name in names})


def make_certs(directory: Path, names: Sequence[str] = TIERS, hosts: Sequence[str] = LOCAL_HOSTS,
               days: int = 365) -> CertFiles:
    """A new CA and a new certificate for each name, replacing whatever `directory` held."""
    files = cert_files(directory, names)
    _prepare_directory(directory)
    ca_key, ca_cert = _make_ca(days)
    _write_pair(files.ca, files.ca_key, ca_cert, ca_key)
    for name in names:
        _issue(files.for_tier(name), name, hosts, days, ca_cert, ca_key)
    return files


def ensure_certs(directory: Path, names: Sequence[str] = TIERS, hosts: Sequence[str] = LOCAL_HOSTS,
                 days: int = 365) -> CertFiles:
    """The files in `directory` where they are still good; a new CA when its own is not, and a new certificate
    for each name whose current one is missing, unsigned by that CA, lacks a host, or expires within a week."""
    files = cert_files(directory, names)
    ca = _load_ca(files)
    if ca is None:
        return make_certs(directory, names, hosts, days)
    ca_cert, ca_key = ca
    _prepare_directory(directory)
    for name in names:
        cert_path, key_path = files.for_tier(name)
        if _leaf_is_good(cert_path, key_path, ca_cert, _subject_alt_names(name, hosts)):
            key_path.chmod(0o600)  # a good key someone loosened is tightened, not reissued
        else:
            _issue((cert_path, key_path), name, hosts, days, ca_cert, ca_key)
    files.ca_key.chmod(0o600)
    return files


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _builder(subject: str, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey,
             days: int) -> x509.CertificateBuilder:
    now = _now()
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))


def _make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _CA_NAME)])
    usage = x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False)
    cert = (_builder(_CA_NAME, name, key.public_key(), days)
            # path_length=0: this CA signs tier certificates only, never another CA.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(usage, critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def _subject_alt_names(name: str, hosts: Sequence[str]) -> list[x509.GeneralName]:
    """The tier's own name as a DNS name, then each host as an IP address or a DNS name as it parses."""
    result: list[x509.GeneralName] = []
    for host in (name, *hosts):
        try:
            entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            entry = x509.DNSName(host)
        if entry not in result:
            result.append(entry)
    return result


def _issue(paths: tuple[Path, Path], name: str, hosts: Sequence[str], days: int, ca_cert: x509.Certificate,
           ca_key: ec.EllipticCurvePrivateKey) -> None:
    key = _new_key()
    usage = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False)
    ca_key_id = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (_builder(name, ca_cert.subject, key.public_key(), days)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage, critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(_subject_alt_names(name, hosts)), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_key_id), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write_pair(paths[0], paths[1], cert, key)


def _prepare_directory(directory: Path) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)  # mkdir's mode is masked by the umask, and an existing directory keeps its own


def _write_pair(cert_path: Path, key_path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    _write_atomically(key_path, key_pem, 0o600)
    _write_atomically(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """A reader never sees half a file, and a key is never readable by others, not even for a moment."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.unlink(missing_ok=True)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)
    os.chmod(temporary, mode)  # os.open's mode is masked by the umask
    os.replace(temporary, path)


def _read_pair(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """The certificate and its key, or None when either is missing, unparseable, or they do not belong together."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        return None
    return cert, key


def _fresh(cert: x509.Certificate) -> bool:
    return cert.not_valid_after_utc - RENEW_WITHIN > _now() >= cert.not_valid_before_utc - _CLOCK_SKEW


def _load_ca(files: CertFiles) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    pair = _read_pair(files.ca, files.ca_key)
    if pair is None or not _fresh(pair[0]):
        return None
    try:
        if not pair[0].extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return None
    except x509.ExtensionNotFound:
        return None
    return pair


def _leaf_is_good(cert_path: Path, key_path: Path, ca_cert: x509.Certificate,
                  wanted_names: list[x509.GeneralName]) -> bool:
    pair = _read_pair(cert_path, key_path)
    if pair is None or not _fresh(pair[0]):
        return False
    cert = pair[0]
    try:
        cert.verify_directly_issued_by(ca_cert)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    return all(name in names for name in wanted_names)


def _add_arguments(parser: argparse.ArgumentParser, _model_dir: Path) -> None:
    parser.add_argument("directory", metavar="DIR", type=Path, help="where the CA and the certificates go (made 0700)")
    parser.add_argument("--host", action="append", default=[], metavar="HOST",
                        help="another DNS name or IP address every certificate names (repeatable); "
                             f"{' and '.join(LOCAL_HOSTS)} and the tier's own name are always in")
    parser.add_argument("--days", type=int, default=365, help="how long the certificates are valid")
    parser.add_argument("--force", action="store_true", help="make a new CA and certificates even if good ones exist")


def _run(args: argparse.Namespace, _model_dir: Path) -> int:
    if args.days < 1:
        raise ValueError(f"--days must be at least 1, got {args.days}")
    hosts = list(dict.fromkeys([*LOCAL_HOSTS, *args.host]))
    make = make_certs if args.force else ensure_certs
    files = make(args.directory, TIERS, hosts, args.days)
    print(f"CA: {files.ca} (its key {files.ca_key} signs more; keep it private)")
    for name in TIERS:
        cert, key = files.for_tier(name)
        print(f"pdserve {name} --tls-cert {cert} --tls-key {key} --tls-ca {files.ca}")
    return 0


COMMAND = Command("certs", "make a development CA and per-tier certificates for mutual TLS", _add_arguments, _run)
