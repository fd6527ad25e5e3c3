"""Certificates made with openssl at test time: a CA, a broker and a client."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_ca(directory: Path, name: str = "ca") -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", f"/CN=edged test {name}", "-keyout", f"{name}.key", "-out", f"{name}.crt",
             cwd=directory)
    return directory / f"{name}.crt", directory / f"{name}.key"


def issue(directory: Path, ca: tuple[Path, Path], name: str, san: str | None) -> tuple[Path, Path]:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=directory)
    extensions = directory / f"{name}.ext"
    extensions.write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", str(ca[0]), "-CAkey", str(ca[1]),
             "-CAcreateserial", "-days", "2", "-out", f"{name}.crt",
             "-extfile", str(extensions), cwd=directory)
    (directory / f"{name}.key").chmod(0o644)  # mosquitto may read it as its own user
    return directory / f"{name}.crt", directory / f"{name}.key"


def make_pki(directory: Path) -> Pki:
    ca = make_ca(directory)
    server = issue(directory, ca, "broker", "IP:127.0.0.1,DNS:localhost")
    client = issue(directory, ca, "edged-testpi", None)
    return Pki(ca[0], server[0], server[1], client[0], client[1])
