"""Whom an adapter's TLS connections trust, and the client certificate they present.

With no CA file the system's trust store is used as OpenSSL finds it
(``platformTrust``: ``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` are honoured).
A CA file (``--ca-file`` for every adapter, ``ca_file:`` for one) is added
to that store; with ``ca_only`` the adapter's file is all it trusts. The
upstream's name is always checked. A client certificate and key (PEM, from
secret sources) are read again for each new connection, so a rotated
Secret file is presented from the next connection on.
"""

from __future__ import annotations

import functools
import os
import re
import ssl
from typing import TYPE_CHECKING

from OpenSSL.crypto import Error as CryptoError
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS, platformTrust, trustRootFromCertificates
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from ambassador.interfaces import ConfigurationError

if TYPE_CHECKING:  # the credentials import the client, which imports this
    from ambassador.credentials.sources import SecretSource

__all__ = ["TrustPolicy", "read_ca_file", "trust_root"]

_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)
#: A CA bundle larger than this is refused (the system's is about 200 KiB).
MAX_CA_FILE_BYTES = 4 * 1024 * 1024


def read_ca_file(path: str, setting: str) -> tuple[Certificate, ...]:
    """The certificates in the PEM file ``path``; a ConfigurationError naming ``setting`` (never the path:
    it is what was given) when it cannot be read or holds none."""
    expected = "expected a PEM file of CA certificates"
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CA_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigurationError(f"{setting}: the file cannot be read ({e.strerror or 'error'}); {expected}")
    certificates = _certificates_in(data) if len(data) <= MAX_CA_FILE_BYTES else None
    if not certificates:
        raise ConfigurationError(f"{setting}: the file holds no readable certificate; {expected}")
    return certificates


def _certificates_in(data: bytes) -> tuple[Certificate, ...] | None:
    """Every PEM certificate in ``data``, or None when one of them does not parse."""
    try:
        return tuple(Certificate.loadPEM(block) for block in _PEM_CERTIFICATE.findall(data))
    except CryptoError:
        return None


@functools.cache
def _system_certificates() -> tuple[Certificate, ...]:
    """The system's CA certificates where OpenSSL looks for them (``SSL_CERT_FILE``, ``SSL_CERT_DIR`` first)."""
    paths = ssl.get_default_verify_paths()
    files = [paths.cafile] if paths.cafile else []
    if paths.capath and os.path.isdir(paths.capath):
        files += sorted(os.path.join(paths.capath, name) for name in os.listdir(paths.capath))
    found: dict[bytes, Certificate] = {}
    for name in files:
        try:
            with open(name, "rb") as f:
                data = f.read(MAX_CA_FILE_BYTES + 1)
        except OSError:
            continue
        for certificate in _certificates_in(data) or ():
            found.setdefault(certificate.dump(), certificate)
    return tuple(found.values())


def trust_root(extra: tuple[Certificate, ...] = (), *, only: bool = False):
    """An ``IOpenSSLTrustRoot``: the system's store plus ``extra``, or ``extra`` alone with ``only``."""
    if only:
        return trustRootFromCertificates(list(extra))
    if extra:
        return trustRootFromCertificates(list(_system_certificates() + extra))
    return platformTrust()


@implementer(IPolicyForHTTPS)
class TrustPolicy:
    """TLS to an upstream trusting the system store plus ``extra`` (or only ``extra`` with ``only``),
    presenting the certificate and key the two sources hold, if given."""

    def __init__(self, extra: tuple[Certificate, ...] = (), *, only: bool = False,
                 client_cert: SecretSource | None = None, client_key: SecretSource | None = None) -> None:
        self._root = trust_root(extra, only=only)
        self._sources = (client_cert, client_key) if client_cert is not None and client_key is not None else None
        self._loaded: tuple[tuple[str, ...], PrivateCertificate | None] | None = None

    def creatorForNetloc(self, hostname: bytes, port: int):
        return optionsForClientTLS(hostname.decode("ascii"), trustRoot=self._root,
                                   clientCertificate=self.client_certificate())

    def client_certificate(self) -> PrivateCertificate | None:
        """The certificate and key as the sources hold them now (None without them, or while they do not
        form one: the upstream then refuses the handshake, which its problem says)."""
        if self._sources is None:
            return None
        for source in self._sources:
            for file in source.files():
                file.reload()  # a stat when unchanged
        pems = tuple(source.current() or "" for source in self._sources)
        if self._loaded is None or self._loaded[0] != pems:
            self._loaded = pems, _private_certificate(*pems)
        return self._loaded[1]


def _private_certificate(certificate: str, key: str) -> PrivateCertificate | None:
    try:
        return PrivateCertificate.loadPEM(f"{certificate}\n{key}\n")
    except (CryptoError, ValueError):  # wrong or missing PEM blocks, a key of another certificate
        return None
