"""Certificates for the TLS tests, made with the openssl CLI: P-256 keys, CAs, and
certificates they sign with the extensions a test asks for (each leaves NAME.key,
NAME.csr and NAME.pem in the directory)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Pki:
    """The directory of the files; ``pki["ca.pem"]`` is a file's path."""

    dir: Path

    def __getitem__(self, name: str) -> str:
        return str(self.dir / name)


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def new_ca(name: str, cwd: Path) -> None:
    """A self-signed CA: NAME.pem and NAME.key."""
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
            "-subj", f"/CN={name}", cwd=cwd)


def issue(name: str, ca: str, extensions: str, cwd: Path) -> None:
    """A key, its request and a certificate for it signed by ``ca`` with
    ``extensions`` (openssl extfile lines, such as ``extendedKeyUsage=clientAuth``)."""
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
            cwd=cwd)
    (cwd / f"{name}.ext").write_text(extensions)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
            cwd=cwd)
