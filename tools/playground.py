"""``make playground``: serve the browser playground over h2 with TLS.

Makes, once, a local test CA and a certificate for 127.0.0.1 and localhost
with ``trustme`` in ``.playground/`` (gitignored), then runs
``trio-stream serve --port 8443 --certfile ... --keyfile ...`` in place of this
process, so Ctrl+C stops the server.  Extra arguments go to ``serve``
(``make playground ARGS='--port 9443 --mock-delay-ms 60'``; the last value of
an option wins).

A browser does not know the test CA: the script prints a Chromium command
line that trusts exactly this certificate's key
(``--ignore-certificate-errors-spki-list``), or import ``.playground/ca.pem``
into the browser's authorities.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import sys
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

FOLDER = Path(".playground")
PORT = "8443"


def certificate(folder: Path) -> tuple[Path, Path]:
    """The certificate chain and key in ``folder``, made on the first call."""
    ca_file, cert_file, key_file = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    if not (ca_file.exists() and cert_file.exists() and key_file.exists()):
        folder.mkdir(exist_ok=True)
        ca = trustme.CA(organization_name="trio-stream playground")
        cert = ca.issue_cert("127.0.0.1", "localhost")
        ca.cert_pem.write_to_path(str(ca_file))
        cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(key_file))
        key_file.chmod(0o600)
    return cert_file, key_file


def spki_hash(cert_file: Path) -> str:
    """Base64 SHA-256 of the leaf's public key: what Chromium's SPKI flag takes."""
    leaf = x509.load_pem_x509_certificate(cert_file.read_bytes())
    der = leaf.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def main() -> None:
    cert_file, key_file = certificate(FOLDER)
    args = ["--port", PORT, "--certfile", str(cert_file), "--keyfile", str(key_file)]
    args += sys.argv[1:]
    port = args[len(args) - 1 - args[::-1].index("--port") + 1]
    url = f"https://127.0.0.1:{port}/"
    print(
        f"playground: {url} (h2 over TLS; certificate from the test CA {FOLDER / 'ca.pem'})\n"
        "playground: open it in a Chromium that trusts only this certificate's key:\n"
        f"  chromium --user-data-dir={(FOLDER / 'chromium').resolve()} "
        f"--ignore-certificate-errors-spki-list={spki_hash(cert_file)} {url}",
        file=sys.stderr,
        flush=True,
    )
    program = shutil.which("trio-stream", path=str(Path(sys.executable).parent))
    if program is None:
        sys.exit("playground: trio-stream is not installed in this environment: run make install")
    os.execv(program, [program, "serve", *args])


if __name__ == "__main__":
    main()
