"""A credential file parsed into a value and parsed again when it changes on disk.

Shared by the API key file and the JWKS file. A change is seen from ``os.stat`` (inode, size,
mtime), so a check costs one system call. A new version that cannot be read or parsed keeps
the last good value, so a half-written or broken file never drops every credential at once.
Errors are described by position only: these files hold secrets (HMAC keys) and must never
reach a log.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)

_Signature = tuple[int, int, int, int]


class CredentialFileError(ValueError):
    """A credential file is unreadable or malformed; the message never quotes its contents."""


def describe_error(exc: BaseException) -> str:
    """A description of a parse error that names a position, never the text at that position."""
    if isinstance(exc, CredentialFileError):
        return str(exc)
    mark = getattr(exc, "problem_mark", None)  # yaml.MarkedYAMLError
    if mark is not None:
        return f"not valid YAML (line {mark.line + 1}, column {mark.column + 1})"
    if isinstance(exc, json.JSONDecodeError):
        return f"not valid JSON (line {exc.lineno}, column {exc.colno})"
    if isinstance(exc, UnicodeDecodeError):
        return f"not valid UTF-8 (byte {exc.start})"
    if isinstance(exc, OSError):
        return f"cannot be read ({exc.strerror or type(exc).__name__})"
    return f"cannot be parsed ({type(exc).__name__})"


def _signature(st: os.stat_result) -> _Signature:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class WatchedFile(Generic[T]):
    """The parsed content of ``path``; ``maybe_reload()`` re-reads it when it changed."""

    def __init__(self, path: str, parse: Callable[[bytes], T], what: str) -> None:
        self._path = path
        self._parse = parse
        self._what = what
        try:
            self._signature: _Signature | None = _signature(os.stat(path))
            self._value = self._read()
        except Exception as exc:  # noqa: BLE001 - re-raised without the original text
            # ``from None``: a YAML/JSON/JWK error's own text may quote the file's secrets.
            raise CredentialFileError(f"{what} {path}: {describe_error(exc)}") from None

    @property
    def value(self) -> T:
        return self._value

    def maybe_reload(self) -> bool:
        """Re-read the file if its stat changed; True when a new value was loaded."""
        try:
            signature = _signature(os.stat(self._path))
        except OSError as exc:
            if self._signature is not None:
                log.error("%s %s: %s; keeping the previous version", self._what, self._path,
                          describe_error(exc))
                self._signature = None  # log once until the file is back
            return False
        if signature == self._signature:
            return False
        # Remember the new signature even if parsing fails: a broken file is reported once,
        # and the next write (which changes the signature again) is picked up.
        self._signature = signature
        try:
            value = self._read()
        except Exception as exc:  # noqa: BLE001 - any parse failure keeps the old value
            log.error("%s %s: %s; keeping the previous version", self._what, self._path,
                      describe_error(exc))
            return False
        self._value = value
        log.info("%s %s reloaded", self._what, self._path)
        return True

    def _read(self) -> T:
        with open(self._path, "rb") as f:
            return self._parse(f.read())
