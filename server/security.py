"""TLS certificates and SuperNode keys for a Flower deployment, and key registration.

Security is on by default: the SuperLink serves TLS with a certificate signed by a private CA
that every hospital trusts (``--root-certificates``), and with ``--enable-supernode-auth`` it
accepts only SuperNodes whose public key the coordinator registered (``flwr supernode
register``). This module makes those files and registers the keys. It raises and never prints.

Formats are the ones Flower 1.41 reads:

- SuperLink: ``--ssl-ca-certfile ca.pem --ssl-certfile superlink.pem --ssl-keyfile
  superlink.key`` (PEM; the key is unencrypted PKCS#8). Its ServerApp/SuperExec children
  connect back to it on loopback and verify the same certificate, so the server certificate
  always names ``localhost``, ``127.0.0.1`` and ``::1`` besides the public names.
- SuperNode: ``--auth-supernode-private-key SITE.key`` is loaded with
  ``load_ssh_private_key`` and must be an elliptic-curve key; ``flwr supernode register
  SITE.pub`` loads an OpenSSH public key on a NIST curve. We use P-384 (Flower's own curve).

A hospital's node id is bound to its public key: regenerating a key makes it a new node that
must be registered again. So existing keys are never replaced unless the caller says so.
Private keys are written with mode 0600, every file atomically (see ``fedpath.common.atomic``).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedpath.common.atomic import atomic_path
from fedpath.common.errors import FedpathError
from fedpath.common.tls import (
    EXPIRY_WARNING_DAYS,
    Validity,
    certificate_problems,
    certificate_sans,
    certificate_validity,
    diagnose_tls,
    explain_connection_failure,
    verify_signed_by,
)

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "DEFAULT_SANS",
    "EXPIRY_WARNING_DAYS",
    "SERVER_CERT",
    "SERVER_KEY",
    "CertificateFiles",
    "Existing",
    "KeyExistsError",
    "NodeKeyFiles",
    "Registration",
    "RegistrationError",
    "SecurityError",
    "Validity",
    "certificate_problems",
    "certificate_sans",
    "certificate_validity",
    "create_certificates",
    "create_node_keys",
    "diagnose_tls",
    "explain_connection_failure",
    "load_node_private_key",
    "load_node_public_key",
    "node_key_paths",
    "public_key_fingerprint",
    "read_site_names",
    "record_site_names",
    "register_public_keys",
    "verify_signed_by",
]

CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "superlink.pem", "superlink.key"
DEFAULT_SANS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
"""Always in the server certificate: the SuperLink's own children connect on loopback."""

CA_DAYS, SERVER_DAYS = 3650, 825
NODE_CURVE = ec.SECP384R1
TLS_CURVE = ec.SECP256R1
PRIVATE_MODE, PUBLIC_MODE = 0o600, 0o644

Existing = Literal["refuse", "keep", "overwrite"]
"""What to do when a file exists: refuse (default), keep it (if it fits), or replace it."""

_SITE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
_DNS_RE = re.compile(r"^(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9-]+)*$")


class SecurityError(FedpathError):
    """A certificate or key cannot be made, read or registered."""


class KeyExistsError(SecurityError):
    """Files exist that the caller did not allow to be kept or replaced."""

    def __init__(self, paths: Sequence[Path], hint: str) -> None:
        self.paths = list(paths)
        names = ", ".join(str(p) for p in self.paths)
        super().__init__(f"refusing to overwrite {names}: {hint}")


# -- file helpers ---------------------------------------------------------------------------


def _write(path: Path, data: bytes, mode: int) -> None:
    """Atomically write ``data`` with ``mode`` set before the file appears under its name."""
    with atomic_path(path, mode) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
        try:
            os.fchmod(fd, mode)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)


def _make_dir(path: Path) -> None:
    """Create ``path`` readable by its owner only (it will hold private keys)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_ec_key(path: Path, load: Callable[[bytes], Any], kind: type, what: str) -> Any:
    """``load(path bytes)``, or a ``SecurityError`` that names the file and the format."""
    try:
        key = load(path.read_bytes())
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SecurityError(f"{path}: not {what} ({exc})") from exc
    if not isinstance(key, kind):
        raise SecurityError(f"{path}: not an elliptic-curve (ECDSA) key")
    return key


def _load_private_pem(path: Path) -> ec.EllipticCurvePrivateKey:
    return _load_ec_key(
        path,
        lambda data: serialization.load_pem_private_key(data, password=None),
        ec.EllipticCurvePrivateKey,
        "an unencrypted PEM private key",
    )


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise SecurityError(f"{path}: not a PEM certificate ({exc})") from exc


# -- TLS: CA and SuperLink certificate -----------------------------------------------------


@dataclass(frozen=True)
class CertificateFiles:
    """The SuperLink's TLS files; ``ca_cert`` is what every hospital and coordinator gets."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    created: tuple[Path, ...] = ()
    """Files written by this call (the others were kept)."""

    @classmethod
    def under(cls, directory: Path) -> CertificateFiles:
        return cls(
            directory / CA_CERT,
            directory / CA_KEY,
            directory / SERVER_CERT,
            directory / SERVER_KEY,
        )


def _general_name(name: str) -> x509.GeneralName:
    """An IP address SAN for addresses (TLS clients match IPs only there), else a DNS SAN."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not _DNS_RE.match(name) or len(name) > 253:
        raise SecurityError(f"{name!r} is neither an IP address nor a valid host name")
    return x509.DNSName(name.lower())


def _normalise_sans(sans: Iterable[str]) -> list[str]:
    """Defaults first, then the extra names, without duplicates, in a stable order."""
    out: list[str] = []
    for name in (*DEFAULT_SANS, *sans):
        name = name.strip()
        if name and name not in out:
            out.append(name)
    return out


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    # Backdated a little so a hospital whose clock is a few minutes behind accepts it.
    now = dt.datetime.now(dt.UTC)
    return now - dt.timedelta(minutes=10), now + dt.timedelta(days=days)


def _make_ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(TLS_CURVE())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    not_before, not_after = _validity(CA_DAYS)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, sans: Sequence[str]
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(TLS_CURVE())
    not_before, not_after = _validity(SERVER_DAYS)
    # Keep the leaf inside the CA's lifetime, or strict verifiers refuse it.
    not_after = min(not_after, ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedpath SuperLink")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in sans]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _keep_certificates(files: CertificateFiles, sans: Sequence[str]) -> None:
    """Check that kept files fit: the server certificate covers ``sans`` and the CA signed it."""
    ca_cert, server_cert = _load_cert(files.ca_cert), _load_cert(files.server_cert)
    errors, _ = certificate_problems([files.ca_cert, files.server_cert])
    if errors:
        raise SecurityError(
            "the existing TLS files cannot be kept: "
            + "; ".join(errors)
            + ". Replace them with --overwrite (a new CA: every hospital needs the new ca.pem)"
        )
    _load_private_pem(files.ca_key)
    server_key = _load_private_pem(files.server_key)
    if not verify_signed_by(server_cert, ca_cert):
        raise SecurityError(f"{files.server_cert} was not signed by {files.ca_cert}")
    if server_key.public_key() != server_cert.public_key():
        raise SecurityError(f"{files.server_key} does not belong to {files.server_cert}")
    missing = [n for n in sans if _general_name_str(n) not in certificate_sans(server_cert)]
    if missing:
        raise SecurityError(
            f"{files.server_cert} does not name {', '.join(missing)}: delete "
            f"{files.server_cert.name} and {files.server_key.name} to issue a new one with the "
            "same CA (hospitals keep their ca.pem), or replace the whole set (a new CA: every "
            "hospital then needs the new ca.pem)"
        )


def _general_name_str(name: str) -> str:
    """How ``certificate_sans`` spells ``name`` (IPs normalised, DNS names lower-case)."""
    general = _general_name(name)
    return str(general.value)


def create_certificates(
    out_dir: Path,
    sans: Iterable[str] = (),
    *,
    existing: Existing = "refuse",
    ca_name: str = "fedpath federation CA",
) -> CertificateFiles:
    """A CA and a SuperLink certificate it signed, valid for ``DEFAULT_SANS`` + ``sans``.

    ``existing="keep"`` keeps a complete, consistent set (the certificate must already name
    every requested SAN) so an init job can run on every start; a partial set is an error in
    every mode but ``overwrite``, which issues a new CA as well (every hospital then needs the
    new ``ca.pem``).
    """
    names = _normalise_sans(sans)
    for name in names:
        _general_name(name)  # validate before anything is written
    files = CertificateFiles.under(Path(out_dir))
    all_paths = (files.ca_cert, files.ca_key, files.server_cert, files.server_key)
    present = [p for p in all_paths if p.exists()]
    if present and existing == "refuse":
        raise KeyExistsError(present, "hospitals may already trust this CA and server certificate")
    if present and existing == "keep":
        if len(present) != len(all_paths):
            absent = [p.name for p in all_paths if p not in present]
            raise SecurityError(f"{out_dir} has an incomplete set of TLS files (missing {absent})")
        _keep_certificates(files, names)
        return files
    _make_dir(files.ca_cert.parent)
    ca_key, ca_cert = _make_ca(ca_name)
    server_key, server_cert = _make_server_cert(ca_key, ca_cert, names)
    _write(files.ca_key, _private_pem(ca_key), PRIVATE_MODE)
    _write(files.server_key, _private_pem(server_key), PRIVATE_MODE)
    _write(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE)
    _write(files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE)
    return CertificateFiles(*all_paths, created=all_paths)


# -- SuperNode keys --------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeKeyFiles:
    """One hospital's key pair: the private key stays at the hospital, the public one goes
    to the coordinator for registration."""

    site: str
    private_key: Path
    public_key: Path
    created: bool


def node_key_paths(out_dir: Path, site: str) -> tuple[Path, Path]:
    """``SITE.key`` and ``SITE.pub`` under ``out_dir`` (``.pub`` = the private key's suffix
    swapped, the convention the demo and the coordinator rely on)."""
    if not _SITE_RE.match(site):
        raise SecurityError(
            f"site name {site!r}: use letters, digits, '.', '_' and '-' (it becomes a file name)"
        )
    return Path(out_dir) / f"{site}.key", Path(out_dir) / f"{site}.pub"


def _openssh_public(key: ec.EllipticCurvePublicKey, comment: str) -> bytes:
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return line + f" {comment}\n".encode()


def load_node_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load a SuperNode private key the way ``flower-supernode`` does (OpenSSH, EC)."""
    return _load_ec_key(
        path,
        lambda data: serialization.load_ssh_private_key(data, password=None),
        ec.EllipticCurvePrivateKey,
        "an unencrypted OpenSSH private key",
    )


def load_node_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """Load a public key the way ``flwr supernode register`` does (OpenSSH, EC)."""
    return _load_ec_key(
        path, serialization.load_ssh_public_key, ec.EllipticCurvePublicKey, "an OpenSSH public key"
    )


def public_key_fingerprint(path: Path) -> str:
    """``SHA256:...`` as ``ssh-keygen -l`` prints it, to compare a key over the phone."""
    load_node_public_key(path)
    blob = base64.b64decode(path.read_text(encoding="ascii").split()[1])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def _keep_node_pair(site: str, private: Path, public: Path) -> NodeKeyFiles:
    if not (private.exists() and public.exists()):
        missing = public if private.exists() else private
        raise SecurityError(
            f"{site}: {missing} is missing but its pair exists; restore it from the hospital, "
            "or replace both (the site then gets a new node id and must be registered again)"
        )
    if load_node_private_key(private).public_key() != load_node_public_key(public):
        raise SecurityError(f"{site}: {public} is not the public half of {private}")
    return NodeKeyFiles(site, private, public, created=False)


def create_node_keys(
    out_dir: Path, sites: Sequence[str], *, existing: Existing = "refuse"
) -> list[NodeKeyFiles]:
    """One P-384 key pair per site: ``SITE.key`` (OpenSSH, 0600) and ``SITE.pub`` (OpenSSH).

    With ``existing="refuse"`` nothing is written if any requested file exists (losing a
    hospital's key changes its node id); ``keep`` keeps complete, matching pairs and creates
    the missing ones; ``overwrite`` replaces them.
    """
    if len(set(sites)) != len(sites):
        raise SecurityError(f"site names must be unique, got {list(sites)}")
    paths = {site: node_key_paths(out_dir, site) for site in sites}
    present = [p for pair in paths.values() for p in pair if p.exists()]
    if present and existing == "refuse":
        raise KeyExistsError(
            present, "each key is a hospital's node identity (a new key is a new node id)"
        )
    _make_dir(Path(out_dir))
    results = []
    for site, (private, public) in paths.items():
        if existing == "keep" and (private.exists() or public.exists()):
            results.append(_keep_node_pair(site, private, public))
            continue
        key = ec.generate_private_key(NODE_CURVE())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        _write(private, pem, PRIVATE_MODE)
        _write(public, _openssh_public(key.public_key(), f"fedpath-{site}"), PUBLIC_MODE)
        results.append(NodeKeyFiles(site, private, public, created=True))
    return results


# -- registration with the SuperLink ---------------------------------------------------------


class FlwrRunner(Protocol):
    """What registration needs: ``flwr ARGS --format json`` against one connection
    (``fedpath.server.flwr_cli.FlwrCli`` and ``LocalNetwork`` both provide it)."""

    def flwr(self, *args: str, timeout: float = ..., cwd: Path | None = ...) -> dict[str, Any]:
        """Run ``flwr`` with ``--format json``; the parsed answer."""
        ...


@dataclass(frozen=True)
class Registration:
    """One public key's registration: a new node id, or the key was registered before."""

    public_key: Path
    node_id: int | None
    already_registered: bool = False


class RegistrationError(SecurityError):
    """Some keys could not be registered; ``failures`` maps each key to Flower's reason."""

    def __init__(self, failures: dict[Path, str], registered: Sequence[Registration]) -> None:
        self.failures = dict(failures)
        self.registered = list(registered)
        lines = "\n".join(f"  - {path}: {reason}" for path, reason in self.failures.items())
        ok = f" ({len(self.registered)} other key(s) registered)" if self.registered else ""
        super().__init__(
            f"{len(self.failures)} public key(s) could not be registered{ok}:\n{lines}"
        )


_ALREADY = re.compile(r"already in use|already registered", re.IGNORECASE)


def _register_one(cli: FlwrRunner, path: Path, connection: str, timeout: float) -> Registration:
    load_node_public_key(path)  # a clear local error before asking the SuperLink
    answer = cli.flwr("supernode", "register", str(path), connection, timeout=timeout)
    if answer.get("success") and answer.get("node-id") is not None:
        return Registration(path, int(answer["node-id"]))
    reason = str(answer.get("error-message") or answer)
    if _ALREADY.search(reason):
        return Registration(path, None, already_registered=True)
    raise SecurityError(reason)


def register_public_keys(
    cli: FlwrRunner,
    public_keys: Iterable[Path],
    *,
    connection: str = "local",
    timeout: float = 60.0,
) -> list[Registration]:
    """Register each hospital's public key with the SuperLink (``flwr supernode register``).

    Every key is tried; a key registered before counts as done, so a coordinator can run this
    on every start. Raises ``RegistrationError`` naming each key that failed and why.
    """
    done: list[Registration] = []
    failures: dict[Path, str] = {}
    for path in public_keys:
        try:
            done.append(_register_one(cli, Path(path), connection, timeout))
        except FedpathError as exc:
            reason = str(exc)
            failures[Path(path)] = reason.removeprefix(f"{path}: ")
    if failures:
        raise RegistrationError(failures, done)
    return done


# -- which node id is which hospital ---------------------------------------------------------

SITES_FILE = "sites.json"
"""In fedpath's Flower home: node id → site, written by ``fedpath keys register``."""


def key_site_name(path: Path) -> str:
    """The site a public key belongs to: its ``fedpath-SITE`` comment, else its file stem."""
    try:
        fields = Path(path).read_text(encoding="ascii").split()
    except (OSError, UnicodeDecodeError):
        fields = []
    if len(fields) >= 3 and fields[2].startswith("fedpath-") and len(fields[2]) > 8:
        return fields[2].removeprefix("fedpath-")
    return Path(path).stem


def read_site_names(home: Path, address: str) -> dict[int, dict[str, str]]:
    """``{node id: {"site", "fingerprint"}}`` recorded for the SuperLink at ``address``."""
    import json

    path = Path(home) / SITES_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    entries = data.get(address, {}) if isinstance(data, dict) else {}
    out: dict[int, dict[str, str]] = {}
    for node_id, entry in entries.items() if isinstance(entries, dict) else ():
        if isinstance(entry, dict) and str(node_id).isdigit():
            out[int(node_id)] = {k: str(v) for k, v in entry.items()}
    return out


def record_site_names(home: Path, address: str, registered: Sequence[Registration]) -> None:
    """Remember which node id each newly registered key got, under its site name.

    Flower lists nodes by id and owner only; the coordinator knows hospitals by name. A key
    registered before keeps its earlier entry (Flower does not say its id again).
    """
    import json

    from fedpath.common.atomic import atomic_write_json

    path = Path(home) / SITES_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = {}
    if not isinstance(data, dict):
        data = {}
    entries = data.setdefault(address, {})
    for item in registered:
        if item.node_id is None:
            continue
        entries[str(item.node_id)] = {
            "site": key_site_name(item.public_key),
            "fingerprint": public_key_fingerprint(item.public_key),
        }
    Path(home).mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data)
