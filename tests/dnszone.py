"""Peers for transport-security tests: a small DNS server (dnslib) and an HTTPS policy server, on loopback.

The DNS server answers from a mutable zone over UDP, sets the AD bit on the answers a test asks for
(what a validating resolver does for DNSSEC-signed data) and logs every question, so a test can show a
lookup was (not) made. The HTTPS server serves one MTA-STS policy on port 443 (RFC 8461 fixes the port) of
an address of its own in 127.0.0.0/8, with a certificate of the test's CA; binding port 443 needs root,
which the test machines (and CI) are.
"""

from __future__ import annotations

import random
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from dnslib import QTYPE, RCODE, RR, DNSRecord
from dnslib.server import BaseResolver, DNSHandler, DNSServer


class _Quiet:
    """dnslib logs every packet to stdout by default."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


class Zone(BaseResolver):  # type: ignore[misc]
    """``records[(name, type)]`` -> zone-file rdata strings; names without a trailing dot, lower case."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], list[str]] = {}
        self.authenticated: set[tuple[str, str]] = set()  # answers sent with the AD bit
        self.queries: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self._server: DNSServer | None = None

    def set(self, name: str, rdtype: str, *rdata: str, ad: bool = False) -> None:
        with self.lock:
            self.records[(name, rdtype)] = list(rdata)
            if ad:
                self.authenticated.add((name, rdtype))
            else:
                self.authenticated.discard((name, rdtype))

    def asked(self, name: str, rdtype: str) -> bool:
        with self.lock:
            return (name, rdtype) in self.queries

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        reply = request.reply()
        name = str(request.q.qname).rstrip(".").lower()
        rdtype = QTYPE[request.q.qtype]
        with self.lock:
            self.queries.append((name, rdtype))
            rdata = list(self.records.get((name, rdtype), []))
            known = any(n == name for n, _ in self.records)
            ad = (name, rdtype) in self.authenticated
        for value in rdata:
            # TTL 0: the resolver under test must ask again, so a changed record is seen at once
            reply.add_answer(*RR.fromZone(f"{name}. 0 IN {rdtype} {value}"))
        if not rdata and not known:
            reply.header.rcode = RCODE.NXDOMAIN
        # reply() copies the question's flags, and the resolver under test asks with AD set (RFC 6840
        # §5.7): clear it unless this answer is one the test calls validated
        reply.header.ad = 1 if ad else 0
        return reply

    def __enter__(self) -> Zone:
        self._server = DNSServer(self, address="127.0.0.1", port=0, logger=_Quiet())
        self._server.start_thread()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.stop()
            self._server.server.server_close()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server.server_address[1])


class PolicyServer:
    """HTTPS on ``address``:443 serving ``body`` at /.well-known/mta-sts.txt; counts the fetches."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.body = b""
        self.content_type = "text/plain"
        self.status = 200
        self.fetches = 0
        self.lock = threading.Lock()
        self.address = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"
        self._context = context
        self._httpd: ThreadingHTTPServer | None = None

    def serve(self, policy: str) -> None:
        with self.lock:
            self.body = policy.replace("\n", "\r\n").encode()

    def count(self) -> int:
        with self.lock:
            return self.fetches

    def __enter__(self) -> PolicyServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with owner.lock:
                    owner.fetches += 1
                    body, status, ctype = owner.body, owner.status, owner.content_type
                if self.path != "/.well-known/mta-sts.txt":
                    status, body = 404, b"not here\r\n"
                self.send_response(status)
                if status in (301, 302):
                    self.send_header("Location", "https://elsewhere.test/.well-known/mta-sts.txt")
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self._httpd = ThreadingHTTPServer((self.address, 443), Handler)
        self._httpd.socket = self._context.wrap_socket(self._httpd.socket, server_side=True)
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
