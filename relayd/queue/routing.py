"""Where mail for a domain goes: configured routes, a smarthost, or the domain's MX hosts.

MX resolution follows RFC 5321 §5.1: MX records in preference order (equal preferences shuffled), no MX
-> the domain's own A/AAAA ("implicit MX"), a null MX (RFC 7505, ``MX 0 .``) or NXDOMAIN -> permanent failure,
DNS timeouts and SERVFAIL -> temporary failure (try again later, never bounce on a flaky resolver).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.resolver

from relayd.config import DeliveryConfig, parse_hostport
from relayd.errors import PermanentFailure, TemporaryFailure


@dataclass(frozen=True, slots=True)
class Route:
    """The hosts to try, in order, and the key that per-destination limits are counted under.

    ``names`` are the host names the route was built from (MX exchanges, or the configured route host) so
    that traffic shaping can recognise a provider by its MX names (``*.google.com``) whatever the recipient
    domain: KumoMTA throttles by MX set, not by domain.
    """

    nexthop: str
    hosts: tuple[tuple[str, int], ...]
    names: tuple[str, ...] = ()


class Router:
    def __init__(self, cfg: DeliveryConfig) -> None:
        self._cfg = cfg
        self._routes = {dom.lower(): parse_hostport(target, cfg.port) for dom, target in cfg.routes.items()}
        self._smarthost = parse_hostport(cfg.smarthost, cfg.port) if cfg.smarthost else None
        self._resolver = dns.asyncresolver.Resolver(configure=not cfg.nameservers)
        if cfg.nameservers:
            hp = [parse_hostport(ns, 53) for ns in cfg.nameservers]
            self._resolver.nameservers = [h for h, _ in hp]
            self._resolver.port = hp[0][1]
        self._resolver.lifetime = 20.0
        # every recipient is routed on its own: without a cache a bulk send asks the same MX question
        # thousands of times a minute (answers are kept for their TTL)
        self._resolver.cache = dns.resolver.LRUCache(10_000)

    def _configured(self, domain: str) -> tuple[str, int] | None:
        """Exact domain, then parent domains (``.example.test`` style suffix match), then ``*``."""
        if domain in self._routes:
            return self._routes[domain]
        labels = domain.split(".")
        for i in range(1, len(labels)):
            hit = self._routes.get("." + ".".join(labels[i:]))
            if hit:
                return hit
        return self._routes.get("*")

    async def route(self, domain: str) -> Route:
        domain = domain.lower().rstrip(".")
        if self._cfg.mode == "routes":
            target = self._configured(domain)
            if target is None:
                raise PermanentFailure(f"no route for domain {domain}", 550, "5.4.4")
            return Route(f"{target[0]}:{target[1]}", (target,), (target[0].lower(),))
        if self._cfg.mode == "smarthost":
            assert self._smarthost is not None
            host = self._smarthost
            return Route(f"{host[0]}:{host[1]}", (host,), (host[0].lower(),))
        target = self._configured(domain)
        if target is not None:
            return Route(f"{target[0]}:{target[1]}", (target,), (target[0].lower(),))
        names, hosts = await self._mx(domain)
        return Route(domain, tuple((h, self._cfg.port) for h in hosts), names)

    async def mx_hosts(self, domain: str) -> list[str]:
        """The addresses to try for ``domain``, in MX preference order."""
        return (await self._mx(domain))[1]

    async def _mx(self, domain: str) -> tuple[tuple[str, ...], list[str]]:
        """(MX host names, their addresses); the implicit MX is the domain itself."""
        try:
            answer = await self._resolver.resolve(domain, "MX")
        except dns.resolver.NXDOMAIN as exc:
            raise PermanentFailure(f"domain {domain} does not exist", 550, "5.1.2") from exc
        except dns.resolver.NoAnswer:
            return (domain,), await self._addresses(domain)  # implicit MX, RFC 5321 §5.1
        except (dns.resolver.NoNameservers, dns.exception.Timeout, dns.resolver.LifetimeTimeout) as exc:
            raise TemporaryFailure(f"DNS lookup of MX for {domain} failed: {exc}", 451, "4.4.3") from exc
        records = sorted(answer, key=lambda r: (r.preference, random.random()))
        if len(records) == 1 and str(records[0].exchange) == ".":
            raise PermanentFailure(f"domain {domain} accepts no mail (null MX)", 556, "5.1.10")
        hosts: list[str] = []
        names: list[str] = []
        for rec in records:
            name = str(rec.exchange).rstrip(".").lower()
            if name:
                names.append(name)
                hosts.extend(h for h in await self._addresses(name, soft=True) if h not in hosts)
        if not hosts:
            raise TemporaryFailure(f"no address for any MX host of {domain}", 451, "4.4.4")
        return tuple(names), hosts

    async def _addresses(self, name: str, *, soft: bool = False) -> list[str]:
        out: list[str] = []
        failures: list[Exception] = []
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self._resolver.resolve(name, rdtype)
                out.extend(str(r) for r in answer)
            except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN) as exc:
                failures.append(exc)
            except (dns.resolver.NoNameservers, dns.exception.Timeout) as exc:
                if soft:
                    failures.append(exc)
                    continue
                raise TemporaryFailure(f"DNS lookup of {name} failed: {exc}", 451, "4.4.3") from exc
        if not out and not soft and all(isinstance(f, dns.resolver.NXDOMAIN) for f in failures):
            raise PermanentFailure(f"host {name} does not exist", 550, "5.1.2")
        if not out and not soft:
            raise PermanentFailure(f"domain {name} has no MX and no address", 550, "5.1.2")
        return out
