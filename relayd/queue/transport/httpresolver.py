"""aiohttp's host name lookups through delivery's resolver (relayd.queue.transport.mtasts fetches MTA-STS
policies
with it), so the policy host is found where the MX hosts are (``[delivery] nameservers``), not through the
system's. A module of its own so that aiohttp is imported only when a policy is fetched."""

from __future__ import annotations

import socket

import aiohttp.abc
import dns.asyncresolver
import dns.exception
import dns.resolver


class DnsResolver(aiohttp.abc.AbstractResolver):
    """Resolves A and AAAA through one dnspython resolver; a failed lookup is an OSError."""

    def __init__(self, resolver: dns.asyncresolver.Resolver) -> None:
        self._resolver = resolver

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[aiohttp.abc.ResolveResult]:
        out: list[aiohttp.abc.ResolveResult] = []
        kinds = [("A", socket.AF_INET), ("AAAA", socket.AF_INET6)]
        for rdtype, fam in kinds:
            if family not in (socket.AF_UNSPEC, fam):
                continue
            try:
                answer = await self._resolver.resolve(host, rdtype)
            except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
                continue
            except dns.exception.DNSException as exc:
                raise OSError(f"DNS lookup of {host} failed: {exc}") from exc
            out.extend(
                {"hostname": host, "host": str(r), "port": port, "family": fam, "proto": 0, "flags": 0}
                for r in answer
            )
        if not out:
            raise OSError(f"no address for {host}")
        return out

    async def close(self) -> None:
        return None
