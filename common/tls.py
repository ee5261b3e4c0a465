"""Certificate validity and TLS diagnosis, for the coordinator's and the hospital's commands.

Flower reports every failed TLS handshake as "connection unavailable", which sends an operator
to look for a network problem. These helpers find the cause when it is in the certificates
(an expired CA or certificate, a ca.pem that did not sign the server's certificate, a host name
the certificate does not list), so each command can name it. Both sides use them: ``fedpath
link``/``certs``/``status``/``keys register`` on the coordinator and ``fedpath node`` at a
hospital. Library code: it raises and returns text, never prints.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from fedpath.common.errors import FedpathError

__all__ = [
    "EXPIRY_WARNING_DAYS",
    "CertificateError",
    "Validity",
    "certificate_problems",
    "certificate_sans",
    "certificate_validity",
    "diagnose_tls",
    "explain_connection_failure",
    "load_certificate",
    "verify_signed_by",
]


class CertificateError(FedpathError):
    """A certificate file cannot be read."""


def load_certificate(path: Path) -> x509.Certificate:
    """The PEM certificate at ``path``; ``CertificateError`` naming the file otherwise."""
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise CertificateError(f"{path}: not a PEM certificate ({exc})") from exc


def certificate_sans(cert: x509.Certificate) -> set[str]:
    """The DNS names and IP addresses a certificate is valid for."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    names = set(ext.get_values_for_type(x509.DNSName))
    names |= {str(ip) for ip in ext.get_values_for_type(x509.IPAddress)}
    return names


def verify_signed_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    """True when ``ca_cert``'s key signed ``cert`` (and the issuer names match)."""
    if cert.issuer != ca_cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


EXPIRY_WARNING_DAYS = 30
"""``fedpath link`` warns when its certificate or CA expires within this many days."""


@dataclass(frozen=True)
class Validity:
    """When one certificate is valid; ``problem`` is set when it is not (or soon not)."""

    path: Path
    not_before: dt.datetime
    not_after: dt.datetime
    expired: bool
    not_yet_valid: bool
    days_left: float

    @property
    def usable(self) -> bool:
        return not (self.expired or self.not_yet_valid)

    def describe(self) -> str:
        """``valid 2026-01-01 – 2028-04-05 (820 days left)``, or why it is not."""
        span = f"{self.not_before:%Y-%m-%d} – {self.not_after:%Y-%m-%d}"
        if self.expired:
            return f"EXPIRED on {self.not_after:%Y-%m-%d %H:%M} UTC (valid {span})"
        if self.not_yet_valid:
            return f"NOT YET VALID: valid from {self.not_before:%Y-%m-%d %H:%M} UTC ({span})"
        return f"valid {span} ({self.days_left:.0f} days left)"


def certificate_validity(path: Path, now: dt.datetime | None = None) -> Validity:
    """The validity period of the PEM certificate at ``path`` against ``now`` (UTC)."""
    cert = load_certificate(Path(path))
    now = now or dt.datetime.now(dt.UTC)
    before, after = cert.not_valid_before_utc, cert.not_valid_after_utc
    return Validity(
        path=Path(path),
        not_before=before,
        not_after=after,
        expired=now > after,
        not_yet_valid=now < before,
        days_left=(after - now).total_seconds() / 86400,
    )


def certificate_problems(
    paths: Iterable[Path], warn_days: float = EXPIRY_WARNING_DAYS
) -> tuple[list[str], list[str]]:
    """(errors, warnings) about ``paths``: expired or not yet valid / expiring soon."""
    errors: list[str] = []
    warnings: list[str] = []
    for path in paths:
        validity = certificate_validity(path)
        if not validity.usable:
            errors.append(f"{path}: {validity.describe()}")
        elif validity.days_left < warn_days:
            warnings.append(
                f"{path} expires in {validity.days_left:.0f} day(s), on "
                f"{validity.not_after:%Y-%m-%d %H:%M} UTC"
            )
    return errors, warnings


def _tls_handshake(
    address: str, ca_path: Path | None, timeout: float
) -> tuple[x509.Certificate | None, str | None]:
    """Handshake with ``address``: (the certificate it presents, why it does not verify).

    Verified as a TLS client does (chain to ``ca_path``, dates, host name); with ``ca_path``
    ``None`` nothing is verified. ``(None, None)`` when no TLS server answered at all.
    """
    import socket
    import ssl

    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca_path is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context.load_verify_locations(cafile=str(ca_path))
    try:
        with (
            socket.create_connection((host, int(port)), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except ssl.SSLCertVerificationError as exc:
        return None, str(exc.verify_message or exc)
    except (OSError, ValueError):
        return None, None
    return (x509.load_der_x509_certificate(der) if der else None), None


def diagnose_tls(address: str, ca_path: Path | None, timeout: float = 5.0) -> str | None:
    """Why a TLS connection to ``address`` verified with ``ca_path`` fails, if we can tell.

    Flower reports every failed handshake as "connection unavailable"; this names the cause
    when it is in the certificates: an expired or not-yet-valid CA file, a server certificate
    the CA did not sign (the wrong ca.pem), an expired server certificate, or one that does
    not name the host dialled. ``None`` when the handshake verifies, when nothing answers, or
    without TLS. The verdict is a real handshake (chains through intermediates count); the
    certificate is then only inspected to say which check failed.
    """
    if ca_path is None:
        return None
    ca_path = Path(ca_path)
    try:
        ca_validity = certificate_validity(ca_path)
        ca = load_certificate(ca_path)
    except CertificateError as exc:
        return str(exc)
    if not ca_validity.usable:
        return f"the CA certificate {ca_path} is {ca_validity.describe()}"
    _, failure = _tls_handshake(address, ca_path, timeout)
    if failure is None:
        return None
    server, _ = _tls_handshake(address, None, timeout)
    if server is not None and not verify_signed_by(server, ca):
        return (
            f"the SuperLink at {address} presents a certificate that {ca_path} did not sign "
            "(a wrong or replaced ca.pem): use the ca.pem that `fedpath certs` made together "
            "with the SuperLink's certificate"
        )
    now = dt.datetime.now(dt.UTC)
    if server is not None and now > server.not_valid_after_utc:
        return (
            f"the SuperLink's certificate EXPIRED on {server.not_valid_after_utc:%Y-%m-%d} "
            "UTC: issue a new one with `fedpath certs` (same CA: delete superlink.pem/.key)"
        )
    host = address.rpartition(":")[0].strip("[]")
    if server is not None and host.lower() not in certificate_sans(server):
        return (
            f"the SuperLink's certificate does not name {host!r} (it names "
            f"{', '.join(sorted(certificate_sans(server)))}): dial one of those, or reissue "
            f"it with `fedpath certs --san {host}`"
        )
    return f"the SuperLink's certificate does not verify with {ca_path}: {failure}"


def explain_connection_failure(address: str, ca_path: Path | None, flower_message: str) -> str:
    """One line saying why ``flwr`` could not talk to the SuperLink at ``address``."""
    cause = diagnose_tls(address, ca_path)
    if cause is not None:
        return f"TLS to the SuperLink at {address} fails: {cause}"
    text = " ".join(flower_message.split())
    unreachable = ("unavailable", "connection refused", "connecterror", "connecttimeout")
    if any(word in text.lower() for word in unreachable):
        return (
            f"cannot reach the SuperLink at {address} (no answer, connection refused or TLS "
            "handshake failed): is `fedpath link` running there, is the port open, and "
            "does --insecure/--ca match how it was started?"
        )
    return f"the SuperLink at {address} answered with an error: {text[-300:]}"
