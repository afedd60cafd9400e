"""Security for both OPC UA modes: Basic256Sha256 Sign & Encrypt with the station's certificate
and key, the peer's certificate pinned, user and password from the credentials file; anonymous
only when the config says so. Problems are one-line OutputErrors naming the key and file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from asyncua import ua
from cryptography import x509
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    load_der_private_key,
    load_pem_private_key,
)

from edge.errors import OutputError
from edge.opcua.config import OpcUaConfig

try:  # asyncua >= 1.1 (2.x); the 1.1 series on Python 3.8 has them in server.users
    from asyncua.crypto.permission_rules import User, UserRole
except ImportError:  # pragma: no cover - the Python 3.8 pin
    from asyncua.server.users import User, UserRole  # type: ignore[no-redef]


def read_file(key: str, path: str | None) -> bytes:
    if not path:
        raise OutputError(f"opcua.{key}: not set")
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise OutputError(f"opcua.{key}: {path}: {exc.strerror or exc}") from exc


def load_der(key: str, path: str) -> bytes:
    """A certificate (PEM or DER) as DER, or OutputError naming key and file."""
    data = read_file(key, path)
    try:
        cert = (
            x509.load_pem_x509_certificate(data)
            if data.lstrip().startswith(b"-----")
            else x509.load_der_x509_certificate(data)
        )
    except ValueError as exc:
        raise OutputError(f"opcua.{key}: {path}: not a certificate ({exc})") from exc
    return cert.public_bytes(Encoding.DER)


def peer_certificates(cfg: OpcUaConfig) -> set[bytes]:
    """The trusted peer certificate(s), DER: a file, or every *.der/*.pem/*.crt in a folder."""
    path = Path(cfg.peer_certificate or "")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".der", ".pem", ".crt"))
        if not files:
            raise OutputError(f"opcua.peer_certificate: {path}: no .der/.pem/.crt file in it")
        return {load_der("peer_certificate", str(p)) for p in files}
    return {load_der("peer_certificate", str(path))}


def station_certificate(cfg: OpcUaConfig) -> tuple[bytes, bytes]:
    """(certificate DER, private key PEM/DER bytes), checked to load."""
    cert = load_der("certificate", cfg.certificate)
    key = read_file("private_key", cfg.private_key)
    load = load_pem_private_key if key.lstrip().startswith(b"-----") else load_der_private_key
    try:
        load(key, None)
    except (ValueError, TypeError) as exc:
        raise OutputError(
            f"opcua.private_key: {cfg.private_key}: not an unencrypted private key"
        ) from exc
    return cert, key


class StationUsers:
    """The server's user manager: the configured user (credentials file), and anonymous
    sessions only when opcua.anonymous is true. Read-only role: the PLC reads and subscribes."""

    def __init__(self, cfg: OpcUaConfig):
        self.username, self.password, self.anonymous = cfg.username, cfg.password, cfg.anonymous

    def get_user(
        self, iserver: Any, username: str | None = None, password: Any = None, certificate=None
    ) -> Any:
        # `certificate` is the secure channel's: it says nothing about the identity token.
        if username is None:
            return User(role=UserRole.User) if self.anonymous else None
        if self.username is not None and username == self.username:
            given = password.decode() if isinstance(password, bytes) else password
            if given == self.password:
                return User(role=UserRole.User, name=username)
        return None


def pinned_validator(trusted: set[bytes]) -> Any:
    """A server certificate validator accepting only the configured client certificate(s)."""

    async def validate(cert: x509.Certificate, _app: Any) -> None:
        if cert.public_bytes(Encoding.DER) not in trusted:
            raise ua.UaStatusCodeError(ua.StatusCodes.BadCertificateUntrusted)

    return validate
