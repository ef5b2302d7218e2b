"""Caller identity: API keys and JWTs in, an Identity for the policy out.

One module per job: ``model`` (Identity, AuthError), ``watched_file`` (credential files
reloaded on change), ``apikeys`` (hashed key file), ``jwks`` (key set and key choice),
``jwt`` (token verification and cache), ``authenticator`` (which credential a request carries).
"""

from sidecar.identity.apikeys import hash_api_key, make_api_key_entry, parse_api_key_file
from sidecar.identity.authenticator import Authenticator
from sidecar.identity.model import ANONYMOUS, AuthError, Identity
from sidecar.identity.watched_file import CredentialFileError

__all__ = [
    "ANONYMOUS",
    "AuthError",
    "Authenticator",
    "CredentialFileError",
    "Identity",
    "hash_api_key",
    "make_api_key_entry",
    "parse_api_key_file",
]
