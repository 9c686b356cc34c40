"""Certificates made in the test, written to files."""

from __future__ import annotations

from pathlib import Path

import trustme


def write_pair(cert: trustme.LeafCert, tmp: Path, name: str) -> tuple[str, str]:
    cert_path, key_path = tmp / f"{name}.crt", tmp / f"{name}.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(cert_path), append=True)
    cert.private_key_pem.write_to_path(str(key_path))
    return str(cert_path), str(key_path)
