"""Throwaway X.509 material for TLS tests, made with the openssl command (EC P-256, 2 days).

ca = make_ca(d, "ca")                                  # self-signed CA
server = make_cert(d, "server", ca, server=True)       # CN and SAN IP:127.0.0.1
client = make_cert(d, "client", ca)                    # a client certificate
... ca.crt, server.crt, server.key ...
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple

EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


class Pem(NamedTuple):
    crt: Path
    key: Path


def have_openssl() -> bool:
    return shutil.which("openssl") is not None


def _openssl(*args: object) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def make_ca(d: str | Path, name: str) -> Pem:
    d = Path(d)
    crt, key = d / f"{name}.crt", d / f"{name}.key"
    _openssl(
        "req", "-x509", *EC_KEY, "-keyout", key, "-out", crt, "-days", 2, "-subj", f"/CN={name}"
    )
    return Pem(crt, key)


def make_cert(d: str | Path, name: str, ca: Pem, *, server: bool = False) -> Pem:
    """A certificate signed by `ca`: for 127.0.0.1 when `server`, else a client identity."""
    d = Path(d)
    crt, key, csr, ext = (d / f"{name}.{s}" for s in ("crt", "key", "csr", "ext"))
    cn = "127.0.0.1" if server else name
    ext.write_text(
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
        if server
        else "extendedKeyUsage=clientAuth\n"
    )
    _openssl("req", *EC_KEY, "-keyout", key, "-out", csr, "-subj", f"/CN={cn}")
    _openssl(
        "x509",
        "-req",
        "-in",
        csr,
        "-CA",
        ca.crt,
        "-CAkey",
        ca.key,
        "-CAcreateserial",
        "-days",
        2,
        "-out",
        crt,
        "-extfile",
        ext,
    )
    return Pem(crt, key)


def tls_listener_conf(port: int, ca: Pem, server: Pem, *, require_certificate: bool = False) -> str:
    """mosquitto.conf lines for an extra TLS listener on 127.0.0.1:port."""
    lines = [
        f"listener {port} 127.0.0.1",
        f"cafile {ca.crt}",
        f"certfile {server.crt}",
        f"keyfile {server.key}",
    ]
    if require_certificate:
        lines.append("require_certificate true")
    return "\n".join(lines)
