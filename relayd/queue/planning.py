"""How one delivery goes out: the hosts and TLS level a destination requires (``[tls_policy]``, DANE,
MTA-STS), and the send that honours them.

Apart from the scheduler because it is the part of an attempt that depends only on the destination, not
on the recipient or the queue: the scheduler asks for a :class:`~relayd.queue.transport.mtasts.Plan` once
per destination of a message and sends each copy with it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from relayd.config import Config
from relayd.mail.chunks import Chunks
from relayd.queue.routing import Route, make_resolver
from relayd.queue.shaping import Grant, Signal
from relayd.queue.transport.client import Channel, Next, Transport
from relayd.queue.transport.dane import Dane, Tlsa, TlsaStatus
from relayd.queue.transport.mtasts import MtaSts, Plan
from relayd.queue.transport.mtasts import count as count_mta_sts
from relayd.queue.transport.tlspolicy import TlsLevel, TlsPolicies, TlsUnmet
from relayd.queue.transport.tlsrpt import PolicyRef, SessionCounter, TransportStore


class Planner:
    """The TLS requirements of destinations, and sending under them through one :class:`Transport`.

    ``tls_store``: where MTA-STS policies are cached and TLS sessions counted (the policy store); None:
    neither. Rebuilt by :meth:`reload`; the session counter and the transport live as long as the
    scheduler."""

    def __init__(self, cfg: Config, transport: Transport, tls_store: TransportStore | None) -> None:
        self._transport = transport
        self._tls_store = tls_store
        self.sessions = SessionCounter(tls_store) if tls_store is not None else None
        self.reload(cfg)

    def reload(self, cfg: Config) -> None:
        self._tls = TlsPolicies.from_config(cfg.delivery.tls, cfg.tls_policy)
        self._sts = self._make_sts(cfg)
        self._dane = _make_dane(cfg)

    def _make_sts(self, cfg: Config) -> MtaSts | None:
        if self._tls_store is None or not cfg.delivery.mta_sts or cfg.delivery.mode != "mx":
            return None
        resolver = make_resolver(cfg.delivery)
        return MtaSts(self._tls_store, resolver, ca_file=cfg.delivery.tls_ca_file, sessions=self.sessions)

    async def plan(self, domain: str, route: Route) -> Plan:
        """Hosts and TLS level of a delivery: ``[tls_policy]``/``[delivery] tls``, and for MX delivery the
        TLSA records of the MX hosts (relayd.queue.transport.dane) or, where there are none, the domain's
        MTA-STS policy (relayd.queue.transport.mtasts); routes and a smarthost never look either up."""
        level = self._tls.level_for(domain)
        if not route.via_mx:
            return Plan(route.hosts, route.hostnames, level)
        if self._dane is not None and route.mx_secure:
            tlsa: dict[str, tuple[Tlsa, ...]] = {}
            levels: dict[str, TlsLevel] = {}
            published: list[Tlsa] = []
            for name in dict.fromkeys(route.hostnames):
                if name not in route.secure_hosts:
                    continue  # its address answer was not validated (RFC 7672 §2.2.1)
                answer = await self._dane.tlsa(name)
                if answer.status is TlsaStatus.INSECURE:
                    continue
                levels[name] = answer.level(level)
                published += answer.published
                if answer.records:
                    tlsa[name] = answer.records
            if levels:  # DANE wins over MTA-STS (RFC 8461 §2), also where it only asks for encryption
                strings = tuple(f"{r.usage} {r.selector} {r.mtype} {r.data.hex()}" for r in published)
                ref = PolicyRef(domain, "tlsa", strings, tuple(levels))
                return Plan(route.hosts, route.hostnames, level, tlsa=tlsa, levels=levels, ref=ref)
        if self._sts is None:
            return Plan(route.hosts, route.hostnames, level)
        return await self._sts.plan(domain, route.hosts, route.hostnames, level)

    async def send(
        self,
        plan: Plan,
        sender: str,
        rcpt: str,
        data: Chunks,
        channel: Channel,
        then: Next | None = None,
        primed: Next | None = None,
    ) -> str:
        """Send as planned; under an MTA-STS ``testing`` policy a TLS level not met is counted and the
        message sent again at the configured level (RFC 8461 §5: testing never stops delivery).
        ``then``/``primed``: the next transaction pipelined behind this one (Transport.send)."""
        report = None
        if plan.ref is not None and self.sessions is not None:
            report = functools.partial(self.sessions.session, plan.ref)
        try:
            reply = await self._transport.send(
                plan.hosts,
                sender,
                rcpt,
                data,
                channel,
                tls=plan.level,
                names=plan.names,
                tlsa=plan.tlsa,
                levels=plan.levels,
                report=report,
                then=then,
                primed=primed,
            )
        except TlsUnmet:
            if plan.mode is not None:
                count_mta_sts(plan.mode, "tls_failed")
            if plan.fallback is None:
                raise
            return await self._transport.send(
                plan.hosts, sender, rcpt, data, channel, tls=plan.fallback, names=plan.names, report=report
            )
        if plan.mode is not None:
            count_mta_sts(plan.mode, "ok")
        return reply


def _make_dane(cfg: Config) -> Dane | None:
    """DANE needs a validating resolver, which only ``[delivery] nameservers`` can name."""
    if cfg.delivery.mode != "mx" or not cfg.delivery.nameservers:
        return None
    return Dane(make_resolver(cfg.delivery))


@dataclass(slots=True)
class Held:
    """A lane held for one or more copies: the plan they go out under, what their replies told the shaper
    (given back with the lane, unless a block reply already gave it back: ``released``), and whether one
    of them got no reply at all (``broken``)."""

    plan: Plan
    got: Grant
    destination: str
    signal: Signal = Signal.NONE
    released: bool = False
    broken: bool = False  # an attempt under it ended without a reply (timeout, connection lost)
