"""Caller identity: credentials in, an Identity for the policy out.

One module per job: ``model`` (Identity, AuthError), ``claims`` (claims to Identity),
``watched_file`` (credential files reloaded on change), ``apikeys`` (hashed key file), ``jwks``
(key set and key choice), ``jwt`` (token verification and cache), ``oidc`` (identity providers'
keys fetched and refreshed; Kubernetes service accounts), ``introspection`` (RFC 7662),
``mtls`` (client certificates), ``provider_http`` (HTTP to providers), ``status`` (their state),
``authenticator`` (which credential a request carries, and which method checks it).
"""

from sidecar.identity.apikeys import hash_api_key, make_api_key_entry, parse_api_key_file
from sidecar.identity.authenticator import Authenticator
from sidecar.identity.model import ANONYMOUS, AuthError, Identity, IdentityUnavailable
from sidecar.identity.status import ProviderStatus
from sidecar.identity.watched_file import CredentialFileError

__all__ = [
    "ANONYMOUS",
    "AuthError",
    "Authenticator",
    "CredentialFileError",
    "Identity",
    "IdentityUnavailable",
    "ProviderStatus",
    "hash_api_key",
    "make_api_key_entry",
    "parse_api_key_file",
]
