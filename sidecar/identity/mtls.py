"""Mutual TLS: the client certificate Envoy verified, mapped to a tenant by configuration.

In: what Envoy's CheckRequest reports about the downstream peer — ``source.certificate`` (the
URL-encoded PEM, with ext_authz ``include_peer_certificate``) and ``source.principal`` (its
first URI SAN, else DNS SAN, else subject). Out: the Identity configured for the first URI
SAN (SPIFFE ID) found in ``mtls.identities`` (method ``mtls``, issuer = the certificate's
issuer DN), or AuthError ``unknown_peer`` for a certificate nobody mapped.

Envoy has already checked the chain against its trusted CA; the sidecar trusts Envoy's report
(it listens on loopback or a pod-local socket). Parsed certificates are cached by their text:
a client's connection presents the same one on every request.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace
from urllib.parse import unquote

from cryptography import x509

from sidecar.config import MtlsConfig
from sidecar.identity.model import AuthError, Identity

_CACHE_SIZE = 1024


class PeerIdentities:
    def __init__(self, config: MtlsConfig) -> None:
        self._identities = {
            uri: Identity(authenticated=True, method="mtls", tenant=entry.tenant, tier=entry.tier,
                          scopes=tuple(entry.scopes), subject=uri, key_name=entry.name)
            for uri, entry in config.identities.items()
        }
        # certificate text -> its Identity, or the (reason, message) of its refusal
        self._by_certificate: OrderedDict[str, Identity | tuple[str, str]] = OrderedDict()

    def identify(self, principal: str, certificate: str) -> Identity | None:
        """The peer's Identity; None when the connection carried no client certificate."""
        if certificate:
            known = self._by_certificate.get(certificate)
            if known is None:
                try:
                    known = self._from_certificate(certificate)
                except AuthError as exc:
                    known = (exc.reason, exc.message)
                self._by_certificate[certificate] = known
                if len(self._by_certificate) > _CACHE_SIZE:
                    self._by_certificate.popitem(last=False)
            else:
                self._by_certificate.move_to_end(certificate)
            if isinstance(known, Identity):
                return known
            raise AuthError(*known)
        if principal:
            identity = self._identities.get(principal)
            if identity is None:
                raise AuthError("unknown_peer", "client certificate identity is not mapped to a tenant")
            return identity
        return None

    def _from_certificate(self, certificate: str) -> Identity:
        try:
            cert = x509.load_pem_x509_certificate(unquote(certificate).encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            raise AuthError("malformed_certificate", "client certificate cannot be parsed") from None
        try:
            uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
                .get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        for uri in uris:
            identity = self._identities.get(uri)
            if identity is not None:
                return replace(identity, issuer=cert.issuer.rfc4514_string())
        raise AuthError("unknown_peer", "client certificate identity is not mapped to a tenant")
