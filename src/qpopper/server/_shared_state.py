"""State that several instances share through Redis, when `redis-url` is set.

Behind a load balancer each login may land on another host, so what one
process remembers on its own stops holding: a brute force would start each
host's failure delay over, LOGIN-DELAY would hold per host, and a client
could open max-connections-per-ip sessions on every instance. With Redis
configured, these three live there:

- failure delays: `fail:<address>`, a counter of recent failures whose
  expiry (`forget`, 10 minutes) restarts with each failure, as the
  per-process `FailureDelays` does;
- LOGIN-DELAY: `login:<user>`, the time of the last login, expiring after
  the delay;
- per-address sessions: `conns:<address>`, a sorted set of this cluster's
  live sessions from that address, each scored with a lease deadline. Each
  instance renews its sessions' leases; a host that dies stops renewing, and
  its sessions drop out of the count within a lease.

Redis is a helper, never a gate: every call has `redis-timeout` seconds;
one that fails or is late makes the instance answer from its per-process
state (kept up to date all along) with one log line, and leave Redis alone
for a few seconds before trying again. No login is refused or stalled for
Redis's sake. Loaded only when redis-url is set (redis-py's asyncio client).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from ..auth.access import FailureDelays, LoginClaim, LoginDelays

log = logging.getLogger("qpopper.server")

T = TypeVar("T")

RETRY_AFTER = 5.0  # seconds Redis is left alone after a failed call
LEASE = 90.0  # seconds a session counts without its instance renewing it

# LOGIN-DELAY's check and record in one step, on Redis's clock (the hosts'
# clocks may differ): the key holds "<seconds> <token>" and expires after
# the delay. A last login less than ARGV[1] seconds ago: 0; otherwise the
# new value, which the caller needs to undo exactly its own record.
_CLAIM_LOGIN = """
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1000000
local delay = tonumber(ARGV[1])
local last = redis.call('GET', KEYS[1])
if last then
  local at = tonumber(string.match(last, '^%S+'))
  if at and t - at < delay then return 0 end
end
local value = string.format('%.6f %s', t, ARGV[2])
redis.call('SET', KEYS[1], value, 'EX', math.max(1, math.ceil(delay)))
return value
"""
# Undo a claim: delete the key only if it still holds that claim's value.
_RELEASE_LOGIN = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class SharedState:
    """Redis-backed failure delays, LOGIN-DELAY and per-address session counts,
    with this process's own state as the fallback."""

    def __init__(
        self,
        url: str,
        timeout: float,
        prefix: str,
        failures: FailureDelays,
        login_delays: LoginDelays,
    ) -> None:
        self._url = url
        self.timeout = timeout
        self.prefix = prefix
        self.failures = failures
        self.login_delays = login_delays
        self._client: aioredis.Redis | None = None
        self._client_scripts: tuple[AsyncScript, AsyncScript] | None = None
        self._down_until = 0.0  # monotonic time before which Redis is not asked
        self._down_reason: str | None = None
        # This instance's sessions in the per-address sets: member -> address.
        self._instance = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
        self._serial = itertools.count()
        self._sessions: dict[str, str] = {}
        self._renewal: asyncio.Task[None] | None = None

    # ---- Redis calls, bounded ---------------------------------------------------

    def _redis(self) -> aioredis.Redis:
        if self._client is None:
            self._client = aioredis.Redis.from_url(
                self._url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout, decode_responses=False
            )
        return self._client

    def _scripts(self, client: aioredis.Redis) -> tuple[AsyncScript, AsyncScript]:
        """The LOGIN-DELAY scripts (sent by their SHA1, loaded once per server)."""
        if self._client_scripts is None:
            self._client_scripts = (client.register_script(_CLAIM_LOGIN), client.register_script(_RELEASE_LOGIN))
        return self._client_scripts

    async def _call(self, what: str, work: Callable[[aioredis.Redis], Awaitable[T]]) -> T | None:
        """`work(client)` within the timeout; None (logged once) if Redis fails."""
        if time.monotonic() < self._down_until:
            return None
        try:
            async with asyncio.timeout(self.timeout):
                result = await work(self._redis())
        except (RedisError, OSError, TimeoutError) as exc:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if self._down_reason is None:
                log.warning("shared state: Redis failed (%s, at %s): per-process state until it answers", reason, what)
            self._down_reason = reason
            self._down_until = time.monotonic() + RETRY_AFTER
            await self._drop_client()
            return None
        if self._down_reason is not None:
            log.warning("shared state: Redis answers again; failure delays and limits are shared again")
            self._down_reason = None
        return result

    async def _drop_client(self) -> None:
        """A client whose connection broke or hung is closed; the next call makes another."""
        client, self._client = self._client, None
        if client is not None:
            try:
                await asyncio.wait_for(client.aclose(), self.timeout)
            except (RedisError, OSError, TimeoutError):
                pass

    @property
    def available(self) -> bool:
        """False while a recent failure keeps Redis out of the answers."""
        return self._down_reason is None

    # ---- failure delays -----------------------------------------------------------

    async def failed_login(self, address: str) -> float:
        """Record a failed login from `address`; the delay its answer gets
        (the one its earlier failures, on any instance, earned)."""
        local = self.failures.delay(address)
        self.failures.record_failure(address)
        key = f"{self.prefix}fail:{address}"
        forget = int(self.failures.forget)

        async def count(client: aioredis.Redis) -> Any:
            async with client.pipeline(transaction=True) as pipe:
                pipe.incr(key)
                pipe.expire(key, forget)
                return (await pipe.execute())[0]

        shared = await self._call("a failed login", count)
        if shared is None:
            return local
        failures = self.failures
        if failures.base <= 0:
            return 0.0
        return float(min(failures.maximum, failures.base * (2 ** min(int(shared) - 1, 30))))

    # ---- LOGIN-DELAY ----------------------------------------------------------------

    async def claim_login(self, user: str, delay: int) -> LoginClaim | None:
        """Count a login of `user` now, unless one on any instance was less
        than `delay` seconds ago (None then). Check and record are one
        script in Redis, so two hosts cannot both let the user in; the
        per-process record is kept too, for when Redis is away."""
        local = self.login_delays.claim(user, delay)
        key = f"{self.prefix}login:{user}"
        token = f"{self._instance}:{next(self._serial)}"
        written = await self._call(
            "LOGIN-DELAY", lambda client: self._scripts(client)[0](keys=[key], args=[delay, token], client=client)
        )
        if written is None:  # Redis away: this process's own answer
            return local
        if not written:  # too soon on some instance
            if local is not None:
                self.login_delays.release(local)
            return None
        if local is None:  # Redis, which saw every instance, lets it in
            local = self.login_delays.claim(user, delay, force=True)
            assert local is not None
        return replace(local, shared=bytes(written))

    async def release_login(self, claim: LoginClaim) -> None:
        """A claimed login whose maildrop did not open: forgotten everywhere,
        unless a later login replaced it."""
        self.login_delays.release(claim)
        if claim.shared is not None:
            key, value = f"{self.prefix}login:{claim.user}", claim.shared
            await self._call(
                "a login undone", lambda client: self._scripts(client)[1](keys=[key], args=[value], client=client)
            )

    # ---- sessions per address ----------------------------------------------------------

    async def open_session(self, address: str, limit: int) -> str | None:
        """Count a new session from `address` across the cluster: its token,
        or None if `limit` sessions from there are open already. Redis
        unavailable: a token (the per-process cap, checked by the caller, stands)."""
        member = f"{self._instance}:{next(self._serial)}"
        key = f"{self.prefix}conns:{address}"
        now = time.time()

        async def claim(client: aioredis.Redis) -> Any:
            async with client.pipeline(transaction=True) as pipe:
                pipe.zremrangebyscore(key, "-inf", now)
                pipe.zadd(key, {member: now + LEASE})
                pipe.zcard(key)
                pipe.expire(key, int(LEASE) * 2)
                return (await pipe.execute())[2]

        count = await self._call("a new session", claim)
        if count is not None and int(count) > limit:
            await self._call("a refused session", lambda client: client.zrem(key, member))
            return None
        self._sessions[member] = address
        self._start_renewal()
        return member

    async def close_session(self, token: str) -> None:
        address = self._sessions.pop(token, None)
        if address is not None:
            await self._call("a session's end", lambda client: client.zrem(f"{self.prefix}conns:{address}", token))

    def _start_renewal(self) -> None:
        if self._renewal is None or self._renewal.done():
            self._renewal = asyncio.get_running_loop().create_task(self._renew_leases())

    async def _renew_leases(self) -> None:
        """Every third of a lease, push the deadlines of this instance's
        sessions forward, so long sessions keep counting and a dead host's
        stop counting."""
        while self._sessions:
            await asyncio.sleep(LEASE / 3)
            deadline = time.time() + LEASE
            sessions = dict(self._sessions)

            async def renew(
                client: aioredis.Redis, sessions: dict[str, str] = sessions, deadline: float = deadline
            ) -> Any:
                async with client.pipeline(transaction=False) as pipe:
                    for member, address in sessions.items():
                        pipe.zadd(f"{self.prefix}conns:{address}", {member: deadline}, xx=True)
                        pipe.expire(f"{self.prefix}conns:{address}", int(LEASE) * 2)
                    return await pipe.execute()

            await self._call("renewing leases", renew)

    async def close(self) -> None:
        """At the server's stop: forget this instance's sessions in Redis."""
        if self._renewal is not None:
            self._renewal.cancel()
        for token in list(self._sessions):
            await self.close_session(token)
        await self._drop_client()
