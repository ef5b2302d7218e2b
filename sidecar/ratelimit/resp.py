"""One lean Redis connection for the check path's pipelines: RESP bytes out, hiredis replies in.

In: a redis-py client (its URL's host, port, credentials and database: parsed once by redis-py),
then batches of commands already encoded (``command``). Out: per batch, the list of replies in
order (an error reply is a ``redis.exceptions.ResponseError`` in the list, NOSCRIPT a
``NoScriptError``), or ``ConnectionError``/``TimeoutError`` for the whole batch.

Why: redis-py's pipeline costs ~100 µs of CPU a reserve (a pipeline object, every argument
through its encoder, a StreamReader readline per reply element, a timer per reply); here a
batch is one ``bytes.join`` and one ``transport.write``, and replies are parsed by hiredis's C
reader in ``data_received``. Replies come back in order on one connection, so each batch waits
for its count of replies. A batch not answered within ``timeout_s`` aborts the connection (as
redis-py's socket timeout does): every batch waiting on it fails, the next one reconnects.
Plain TCP only (``redis://``); a TLS or Unix-socket URL keeps redis-py (``supports``).

``send`` is the awaitable form (connects when needed, times the batch out itself); ``write`` is
the one the check path uses when the connection is up: the batch is written at once and
``done`` is called with its replies (or the exception that lost them) straight from
``data_received``, no task and no timer per batch (the caller keeps one deadline per batch).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError


pack_command = hiredis.pack_command  # a tuple of arguments -> one command (``command`` below)


def command(*args: bytes | str | int | float) -> bytes:
    """One command in RESP (an array of bulk strings), byte for byte as redis-py's encoder writes its
    arguments (str as UTF-8, int in decimal, float as its repr), packed by hiredis's C packer
    (~3x cheaper than doing it here; anything else, bool included, is a TypeError)."""
    return hiredis.pack_command(args)


def _error(message: str) -> ResponseError:
    return NoScriptError(message) if message.startswith("NOSCRIPT") else ResponseError(message)


Done = Callable[[list[Any] | None, BaseException | None], None]


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self._reader = hiredis.Reader(replyError=_error)
        # batches in the order they were written: [replies wanted, replies so far, done(replies, error)]
        self.waiting: deque[list[Any]] = deque()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        waiting = self.waiting
        while True:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError:  # a stream we cannot read: drop the connection
                if self.transport is not None:
                    self.transport.abort()
                return
            if reply is False:
                return
            if not waiting:  # a reply nobody waits for: the stream is out of step
                if self.transport is not None:
                    self.transport.abort()
                return
            entry = waiting[0]
            entry[1].append(reply)
            if len(entry[1]) == entry[0]:
                waiting.popleft()
                entry[2](entry[1], None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        while self.waiting:
            self.waiting.popleft()[2](None, RedisConnectionError(f"connection to Redis lost: {exc or 'closed'}"))


class RespPipe:
    """Connects on first use and after a lost connection; ``round_trips`` counts batches written."""

    def __init__(self, client: Any, timeout_s: float) -> None:
        kwargs = client.connection_pool.connection_kwargs
        self._host, self._port = kwargs.get("host", "localhost"), int(kwargs.get("port", 6379))
        self._hello = []
        if kwargs.get("password"):
            self._hello.append(command("AUTH", *([kwargs["username"]] if kwargs.get("username") else []),
                                       kwargs["password"]))
        if kwargs.get("db"):
            self._hello.append(command("SELECT", int(kwargs["db"])))
        self._timeout_s = timeout_s
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future | None = None
        self.round_trips = 0

    @staticmethod
    def supports(client: Any) -> bool:
        """Plain TCP with at most a password and a database (no TLS, no Unix socket, no RESP3)."""
        from redis.asyncio.connection import Connection

        pool = client.connection_pool
        kwargs = pool.connection_kwargs
        return pool.connection_class is Connection and "path" not in kwargs and kwargs.get("protocol") in (None, 2, "2")

    async def _connected(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and protocol.transport is not None:
            return protocol
        if self._connecting is None:  # one connect for every batch that needs it
            self._connecting = asyncio.ensure_future(self._connect())
        try:
            return await asyncio.shield(self._connecting)
        finally:
            if self._connecting is not None and self._connecting.done():
                self._connecting = None

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._timeout_s):
                _, protocol = await loop.create_connection(_Protocol, self._host, self._port)
                if self._hello:
                    replies = await self._write(protocol, b"".join(self._hello), len(self._hello))
                    for reply in replies:
                        if isinstance(reply, Exception):
                            protocol.transport.abort()
                            raise RedisConnectionError(f"Redis refused the connection set-up: {reply}")
        except TimeoutError:
            raise TimeoutError("timed out connecting to Redis") from None
        except OSError as exc:
            raise RedisConnectionError(f"cannot connect to Redis: {exc}") from None
        self._protocol = protocol
        return protocol

    def _write(self, protocol: _Protocol, payload: bytes, count: int) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()

        def done(replies: list[Any] | None, error: BaseException | None) -> None:
            if not future.done():
                future.set_result(replies) if error is None else future.set_exception(error)

        protocol.waiting.append([count, [], done])
        protocol.transport.write(payload)
        return future

    def connected(self) -> _Protocol | None:
        """The connection if it is up (``write`` can go now), else None (``send`` connects)."""
        protocol = self._protocol
        return protocol if protocol is not None and protocol.transport is not None else None

    def write(self, protocol: _Protocol, payload: bytes, count: int, done: Done) -> None:
        """Write ``count`` encoded commands on the connection ``connected`` returned; ``done(replies,
        None)`` with their replies in order, or ``done(None, error)`` if the connection is lost first.
        No deadline of its own: the caller's, on expiry, calls ``abort``."""
        self.round_trips += 1
        protocol.waiting.append([count, [], done])
        protocol.transport.write(payload)

    def abort(self, protocol: _Protocol) -> None:
        """Redis is silent: drop the connection (every batch waiting on it fails; the next
        reconnects), as ``send`` does on its own deadline."""
        if protocol.transport is not None:
            protocol.transport.abort()

    async def send(self, payload: bytes, count: int) -> list[Any]:
        """Write ``count`` encoded commands at once; their replies, in order."""
        protocol = await self._connected()
        self.round_trips += 1
        future = self._write(protocol, payload, count)
        try:
            async with asyncio.timeout(self._timeout_s):
                return await future
        except TimeoutError:
            if protocol.transport is not None:  # Redis is silent: its replies would come out of step
                protocol.transport.abort()
            raise TimeoutError("Redis did not answer in time") from None

    def close(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None
