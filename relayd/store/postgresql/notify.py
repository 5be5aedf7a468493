"""Change propagation between nodes: ``LISTEN`` on a dedicated connection, callbacks per channel."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable

import asyncpg

from .connection import ChangeCallback, PostgresConnection
from .driver import DB_ERRORS, IDENT

log = logging.getLogger(__package__)


class Notifications(PostgresConnection):
    """``subscribe`` / ``unsubscribe`` of :class:`~relayd.store.postgresql.PostgresStore`."""

    async def subscribe(self, channel: str, callback: ChangeCallback) -> None:
        """Call ``callback(channel, payload)`` for every ``NOTIFY`` on ``channel`` (any node's, ours too).

        Why: a node caching account states or suppression answers learns of another node's change within
        milliseconds instead of at its next poll. The listener has its own connection (a pooled one would
        be reset on release); when it is lost it is re-established in the background, and every callback
        is then called with payload ``''``, since notifications sent meanwhile are gone. Raises
        StoreError when the first connection cannot be made. Callbacks must not block; exceptions they
        raise are logged.
        """
        if not IDENT.fullmatch(channel):
            raise ValueError(f"channel must be a lower-case SQL identifier, got {channel!r}")
        self._require_pool()
        async with self._listen_lock:  # two first subscribers must not open two listener connections
            callbacks = self._subscribers.setdefault(channel, [])
            callbacks.append(callback)
            if len(callbacks) > 1:
                return
            try:
                if self._listener is not None and not self._listener.is_closed():
                    await self._listener.add_listener(channel, self._on_notify)
                elif self._listener_task is None or self._listener_task.done():
                    self._listener = await self._connect_listener()  # listens on every channel
                # else: the reconnect loop will LISTEN on this channel too
            except DB_ERRORS as exc:
                callbacks.remove(callback)
                raise self._error(f"cannot LISTEN on {channel}", exc) from exc

    async def unsubscribe(self, channel: str, callback: ChangeCallback) -> None:
        """Stop calling ``callback`` for ``channel``; unknown pairs are ignored."""
        callbacks = self._subscribers.get(channel, [])
        with contextlib.suppress(ValueError):
            callbacks.remove(callback)
        if not callbacks and self._listener is not None and not self._listener.is_closed():
            self._subscribers.pop(channel, None)
            with contextlib.suppress(*DB_ERRORS):
                await self._listener.remove_listener(channel, self._on_notify)

    async def _connect_listener(self) -> asyncpg.Connection[asyncpg.Record]:
        conn = await asyncpg.connect(
            self.dsn, timeout=self._connect_timeout, server_settings=self._server_settings()
        )
        try:
            for channel in list(self._subscribers):
                await conn.add_listener(channel, self._on_notify)
        except BaseException:
            conn.terminate()
            raise
        conn.add_termination_listener(self._on_listener_lost)
        return conn

    def _on_listener_lost(self, conn: object) -> None:
        if self._closing or conn is not self._listener:
            return
        log.warning("%r: LISTEN connection lost; reconnecting", self)
        self._listener = None
        if self._listener_task is None or self._listener_task.done():
            self._listener_task = asyncio.get_running_loop().create_task(self._relisten())

    async def _relisten(self) -> None:
        """Reconnect the listener with backoff (0.1 s doubling to 5 s), then tell every subscriber."""
        delay = 0.1
        while not self._closing:
            try:
                async with (
                    self._listen_lock
                ):  # a concurrent subscribe() sees the channel list or the listener
                    self._listener = await self._connect_listener()
            except DB_ERRORS as exc:
                log.debug("%r: LISTEN reconnect failed: %s", self, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            log.info("%r: LISTEN connection re-established", self)
            for channel, callbacks in list(self._subscribers.items()):
                for callback in list(callbacks):
                    self._dispatch(callback, channel, "")
            return

    def _on_notify(self, conn: object, pid: int, channel: str, payload: object) -> None:
        for callback in list(self._subscribers.get(channel, ())):
            self._dispatch(callback, channel, str(payload))

    def _dispatch(self, callback: ChangeCallback, channel: str, payload: str) -> None:
        try:
            result = callback(channel, payload)
        except Exception:
            log.exception("%r: %s callback failed", self, channel)
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(self._await_callback(result, channel))
            self._callback_tasks.add(task)
            task.add_done_callback(self._callback_tasks.discard)

    async def _await_callback(self, result: Awaitable[None], channel: str) -> None:
        try:
            await result
        except Exception:
            log.exception("%r: %s callback failed", self, channel)
