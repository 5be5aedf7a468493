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
import dns.flags
import dns.resolver

from relayd.config import DeliveryConfig, parse_hostport
from relayd.core.errors import PermanentFailure, TemporaryFailure


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
    #: the host name each of ``hosts`` was found under (MX exchange, or the route/smarthost host as
    #: configured): what a verified TLS certificate must name
    hostnames: tuple[str, ...] = ()
    #: whether the hosts are the domain's MX hosts (MTA-STS and DANE apply only to those)
    via_mx: bool = False
    #: whether the MX answer was DNSSEC-validated (AD bit from ``[delivery] nameservers``): DANE needs it
    mx_secure: bool = False
    #: the MX host names whose address answers were validated too: DANE applies only to those (RFC 7672
    #: §2.2.1: a forged A record would send the TLS session to the attacker's host)
    secure_hosts: frozenset[str] = frozenset()


def _configured_route(target: tuple[str, int]) -> Route:
    """A configured route or smarthost: one host, verified (at ``verify``) against its name as written."""
    return Route(f"{target[0]}:{target[1]}", (target,), (target[0].lower(),), (target[0],))


def make_resolver(cfg: DeliveryConfig) -> dns.asyncresolver.Resolver:
    """The resolver of delivery: ``[delivery] nameservers``, else the system's; answers cached for their
    TTL, because every recipient is routed on its own and without a cache a bulk send asks the same MX
    question thousands of times a minute."""
    resolver = dns.asyncresolver.Resolver(configure=not cfg.nameservers)
    if cfg.nameservers:
        hp = [parse_hostport(ns, 53) for ns in cfg.nameservers]
        resolver.nameservers = [h for h, _ in hp]
        resolver.port = hp[0][1]
        # ask for the AD bit (RFC 6840 §5.7): DANE takes only answers a validating resolver vouches for
        resolver.flags = dns.flags.RD | dns.flags.AD
    resolver.lifetime = 20.0
    resolver.cache = dns.resolver.LRUCache(10_000)
    return resolver


class Router:
    def __init__(self, cfg: DeliveryConfig) -> None:
        self._cfg = cfg
        self._routes = {dom.lower(): parse_hostport(target, cfg.port) for dom, target in cfg.routes.items()}
        self._smarthost = parse_hostport(cfg.smarthost, cfg.port) if cfg.smarthost else None
        self._resolver = make_resolver(cfg)

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
            return _configured_route(target)
        if self._cfg.mode == "smarthost":
            assert self._smarthost is not None
            return _configured_route(self._smarthost)
        target = self._configured(domain)
        if target is not None:
            return _configured_route(target)
        names, hosts, hostnames, secure, secure_hosts = await self._mx_named(domain)
        addresses = tuple((h, self._cfg.port) for h in hosts)
        return Route(
            domain, addresses, names, hostnames, via_mx=True, mx_secure=secure, secure_hosts=secure_hosts
        )

    def configured_nexthop(self, domain: str) -> str | None:
        """``host:port`` when the config alone says where ``domain`` goes (route, smarthost), else None
        (its MX hosts, which only a DNS query tells): what ``relayd queue list`` shows without asking DNS."""
        domain = domain.lower().rstrip(".")
        if self._cfg.mode == "smarthost" and self._smarthost is not None:
            return f"{self._smarthost[0]}:{self._smarthost[1]}"
        target = self._configured(domain)
        return f"{target[0]}:{target[1]}" if target is not None else None

    async def mx_hosts(self, domain: str) -> list[str]:
        """The addresses to try for ``domain``, in MX preference order."""
        return (await self._mx(domain))[1]

    async def _mx(self, domain: str) -> tuple[tuple[str, ...], list[str]]:
        """(MX host names, their addresses); the implicit MX is the domain itself."""
        names, hosts, _, _, _ = await self._mx_named(domain)
        return names, hosts

    async def _mx_named(
        self, domain: str
    ) -> tuple[tuple[str, ...], list[str], tuple[str, ...], bool, frozenset[str]]:
        """(MX host names, their addresses, the MX name of each address, whether the MX answer was
        validated, the MX names whose address answers were all validated)."""
        try:
            answer = await self._resolver.resolve(domain, "MX")
        except dns.resolver.NXDOMAIN as exc:
            raise PermanentFailure(f"domain {domain} does not exist", 550, "5.1.2") from exc
        except dns.resolver.NoAnswer:
            own = await self._addresses(domain)  # implicit MX, RFC 5321 §5.1
            return (domain,), own, tuple(domain for _ in own), False, frozenset()
        except (dns.resolver.NoNameservers, dns.exception.Timeout, dns.resolver.LifetimeTimeout) as exc:
            raise TemporaryFailure(f"DNS lookup of MX for {domain} failed: {exc}", 451, "4.4.3") from exc
        records = sorted(answer, key=lambda r: (r.preference, random.random()))
        if len(records) == 1 and str(records[0].exchange) == ".":
            raise PermanentFailure(f"domain {domain} accepts no mail (null MX)", 556, "5.1.10")
        hosts: list[str] = []
        names: list[str] = []
        hostnames: list[str] = []
        secure_hosts: set[str] = set()
        for rec in records:
            name = str(rec.exchange).rstrip(".").lower()
            if name:
                names.append(name)
                found, validated = await self._lookup(name, soft=True)
                if validated:
                    secure_hosts.add(name)
                for h in found:
                    if h not in hosts:
                        hosts.append(h)
                        hostnames.append(name)
        if not hosts:
            raise TemporaryFailure(f"no address for any MX host of {domain}", 451, "4.4.4")
        secure = bool(answer.response.flags & dns.flags.AD)
        return tuple(names), hosts, tuple(hostnames), secure, frozenset(secure_hosts)

    async def _addresses(self, name: str, *, soft: bool = False) -> list[str]:
        return (await self._lookup(name, soft=soft))[0]

    async def _lookup(self, name: str, *, soft: bool = False) -> tuple[list[str], bool]:
        """The A and AAAA addresses of ``name``, and whether every answer that gave one carried the AD
        bit (False when there are none)."""
        out: list[str] = []
        validated = True
        failures: list[Exception] = []
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self._resolver.resolve(name, rdtype)
                out.extend(str(r) for r in answer)
                validated = validated and bool(answer.response.flags & dns.flags.AD)
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
        return out, validated and bool(out)
