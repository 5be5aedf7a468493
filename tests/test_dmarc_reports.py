"""DMARC aggregate reports (RFC 7489 appendix C) mailed to dmarc@<inbound domain>: read safely, counted
once, summed up by ``relayd dmarc summary``, and exported as metrics for the alert on relayd's own mail.

The reports are built here in the shapes large reporters send them (Google: a zip; Microsoft: a gzip with
several records per source; Yahoo: a gzip labelled ``application/x-gzip``; a small reporter: the XML in
the body with the DMARCbis namespace), never copied from anyone's mail.
"""

from __future__ import annotations

import gzip
import io
import json
import smtplib
import subprocess
import time
import tracemalloc
import urllib.request
import zipfile
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import SMTP
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.cli.doctor import run_checks
from relayd.config import Config
from relayd.desk.dmarcstats import counts_of
from relayd.reports import dmarc
from relayd.reports.dmarc import MAX_XML, Refused, decompress_gzip, read_mail, unzip_one
from relayd.store import Store
from tests.harness import PASSWORD_HASH, Relayd, free_port, wait_until
from tests.test_alerts import ALERTS, _promtool, _series
from tests.test_doctor import DnsServer, _txt
from tests.test_store_contract import _make_store, _postgresql_for_make_store  # noqa: F401

INBOUND = "bounces.example.test"
DOMAIN = "acme.example.test"
OWN4, OWN6 = "192.0.2.10", "2001:db8::10"
BEGIN = int(time.time()) - 86400

ACCOUNTS = f"""
[pools.main]
addresses = ["{OWN4}", "{OWN6}"]

[accounts.acme]
password_hash = "{PASSWORD_HASH}"
domains = ["{DOMAIN}"]
"""


# -- building reports ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    ip: str
    count: int
    dkim: str  # policy_evaluated: aligned DKIM pass or fail
    spf: str
    auth_dkim: tuple[tuple[str, str], ...] = ()  # (domain, result) in auth_results
    auth_spf: tuple[tuple[str, str], ...] = ()
    disposition: str = "none"


def feedback_xml(org: str, report_id: str, rows: list[Row], *, domain: str = DOMAIN, ns: str = "") -> bytes:
    """An aggregate report as RFC 7489 appendix C describes it (``ns``: the DMARCbis namespace)."""
    records = []
    for r in rows:
        dkim = "".join(
            f"<dkim><domain>{d}</domain><selector>s1</selector><result>{res}</result></dkim>"
            for d, res in r.auth_dkim
        )
        spf = "".join(f"<spf><domain>{d}</domain><result>{res}</result></spf>" for d, res in r.auth_spf)
        records.append(
            f"<record><row><source_ip>{r.ip}</source_ip><count>{r.count}</count>"
            f"<policy_evaluated><disposition>{r.disposition}</disposition><dkim>{r.dkim}</dkim>"
            f"<spf>{r.spf}</spf></policy_evaluated></row>"
            f"<identifiers><envelope_from>{DOMAIN}</envelope_from><header_from>{domain}</header_from>"
            f"</identifiers><auth_results>{dkim}{spf}</auth_results></record>"
        )
    xmlns = f' xmlns="{ns}"' if ns else ' xmlns:xsd="http://www.w3.org/2001/XMLSchema"'
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<feedback{xmlns}><version>1.0</version>'
        f"<report_metadata><org_name>{org}</org_name><email>dmarc-reports@{org}</email>"
        f"<report_id>{report_id}</report_id><date_range><begin>{BEGIN}</begin>"
        f"<end>{BEGIN + 86399}</end></date_range></report_metadata>"
        f"<policy_published><domain>{domain}</domain><adkim>r</adkim><aspf>r</aspf><p>quarantine</p>"
        f"<sp>quarantine</sp><pct>100</pct></policy_published>{''.join(records)}</feedback>\n"
    ).encode()


def report_mail(org: str, attachment: bytes, ctype: str, filename: str, *, body_xml: bool = False) -> bytes:
    """The mail a reporter sends to the rua address, the report attached (or, ``body_xml``, as the body)."""
    if body_xml:
        msg: Any = MIMEText(attachment.decode(), "xml", "utf-8")
    else:
        msg = MIMEMultipart("mixed")
        msg.attach(MIMEText(f"This is an aggregate report from {org}.", "plain", "utf-8"))
        maintype, _, subtype = ctype.partition("/")
        part = MIMEApplication(attachment, subtype) if maintype == "application" else None
        if part is None:
            part = MIMEText(attachment.decode(), subtype, "utf-8")
        part.add_header("Content-Disposition", "attachment", filename=filename)
        msg.attach(part)
    msg["From"] = f"noreply-dmarc@{org}"
    msg["To"] = f"dmarc@{INBOUND}"
    msg["Subject"] = f"Report domain: {DOMAIN} Submitter: {org} Report-ID: <{filename}>"
    msg["Message-ID"] = f"<{time.monotonic_ns()}@{org}>"
    return bytes(msg.as_bytes(policy=SMTP))


def zipped(name: str, data: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(name, data)
    return out.getvalue()


def google() -> bytes:
    rows = [
        Row(OWN4, 100, "pass", "pass", ((DOMAIN, "pass"),), ((DOMAIN, "pass"),)),
        Row("198.51.100.7", 5, "fail", "fail", (), (("spoofer.test", "fail"),)),
    ]
    name = f"google.com!{DOMAIN}!{BEGIN}!{BEGIN + 86399}"
    return report_mail(
        "google.com",
        zipped(name + ".xml", feedback_xml("google.com", "g-1", rows)),
        "application/zip",
        name + ".zip",
    )


def microsoft() -> bytes:
    rows = [
        Row(OWN4, 40, "pass", "pass", ((DOMAIN, "pass"),), ((DOMAIN, "pass"),)),
        # forwarded: SPF breaks, the DKIM signature carries it
        Row(OWN4, 10, "pass", "fail", ((DOMAIN, "pass"),), ((DOMAIN, "softfail"),)),
        Row(OWN6, 20, "fail", "pass", ((DOMAIN, "fail"),), ((DOMAIN, "pass"),)),
        Row("203.0.113.9", 3, "fail", "fail", (), (("elsewhere.test", "fail"),), "quarantine"),
    ]
    org = "Enterprise Outlook"
    xml = feedback_xml(org, "ms-1", rows)
    name = f"enterprise.protection.outlook.com!{DOMAIN}!{BEGIN}!{BEGIN + 86399}.xml.gz"
    return report_mail(org, gzip.compress(xml), "application/gzip", name)


def yahoo() -> bytes:
    # SPF passes for the VERP return-path domain, which is not aligned with the From domain
    rows = [Row(OWN4, 30, "pass", "fail", ((DOMAIN, "pass"),), ((INBOUND, "pass"),))]
    xml = feedback_xml("Yahoo", "y-1", rows)
    return report_mail(
        "yahoo.com", gzip.compress(xml), "application/x-gzip", f"yahoo.com!{DOMAIN}!{BEGIN}.xml.gz"
    )


def small_reporter() -> bytes:
    # signed, but by another domain: DKIM passes unaligned; the receiver rejected it
    rows = [Row(OWN4, 2, "fail", "fail", (("other.test", "pass"),), (("other.test", "fail"),), "reject")]
    xml = feedback_xml("mx.small.test", "s-1", rows, ns="urn:ietf:params:xml:ns:dmarc-2.0")
    return report_mail("mx.small.test", xml, "text/xml", "", body_xml=True)


# -- bombs ---------------------------------------------------------------------------------------------------

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
<!ENTITY lol9 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">]>
<feedback><report_metadata><org_name>&lol9;</org_name><report_id>bomb</report_id></report_metadata>
<policy_published><domain>acme.example.test</domain></policy_published></feedback>
"""
EXTERNAL_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE feedback [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<feedback><report_metadata><org_name>&xxe;</org_name><report_id>xxe</report_id></report_metadata>
<policy_published><domain>acme.example.test</domain></policy_published></feedback>
"""


def gzip_bomb(size: int) -> bytes:
    """``size`` bytes of spaces after a report's first tag, gzipped (about 1000:1), built in chunks."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    out = [packer.compress(b"<feedback>")]
    chunk = b" " * (1 << 20)
    for _ in range(size >> 20):
        out.append(packer.compress(chunk))
    out.append(packer.flush())
    return b"".join(out)


def many_members() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for i in range(1000):
            z.writestr(f"r{i}.xml", b"<feedback/>")
    return out.getvalue()


def high_ratio_member() -> bytes:
    """One member of 9 MB of spaces: under the size cap, far over the ratio cap."""
    return zipped("report.xml", b"<feedback>" + b" " * (9 << 20))


def nested() -> bytes:
    return zipped("inner.xml.gz", gzip.compress(feedback_xml("nest.test", "n-1", [])))


# -- a daemon ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def relayd(tmp_path_factory: pytest.TempPathFactory, store_config: str | None) -> Iterator[Relayd]:
    """One daemon per store backend (the DMARC counts are store rows on both)."""
    tmp = tmp_path_factory.mktemp("dmarc")
    with Relayd(tmp, accounts=ACCOUNTS, store=store_config, routes={"example.test": free_port()}) as r:
        yield r


def send(
    relayd: Relayd, data: bytes, to: str = f"dmarc@{INBOUND}", sender: str = "dmarc@reporter.test"
) -> int:
    with smtplib.SMTP("127.0.0.1", relayd.inbound_port, timeout=60) as s:
        s.ehlo("mx.reporter.test")
        s.mail(sender)
        code, resp = s.rcpt(to)
        assert code == 250, resp
        code, _ = s.data(data)
        return int(code)


def summary(relayd: Relayd, domain: str = DOMAIN) -> list[dict[str, Any]]:
    out = relayd.cli("dmarc", "summary", "--domain", domain, "--since", "7d", "--json")
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def by(lines: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {line["name"]: line for line in lines if line["type"] == kind}


def inbox_notes(relayd: Relayd) -> list[str]:
    out = relayd.cli("inbox", "list", "--json", "--kind", "unreadable-report")
    assert out.returncode == 0, out.stderr
    return [json.loads(line)["note"] for line in out.stdout.splitlines()]


def metrics(relayd: Relayd) -> str:
    url = f"http://127.0.0.1:{relayd.http_port}/metrics"
    return str(urllib.request.urlopen(url, timeout=10).read().decode())


# -- end to end ----------------------------------------------------------------------------------------------


def test_reports_of_four_reporters_give_the_right_summary(relayd: Relayd) -> None:
    for mail in (google(), microsoft(), yahoo(), small_reporter()):
        assert send(relayd, mail) == 250
    assert wait_until(lambda: summary(relayd)[0]["reports"] == 4)
    lines = summary(relayd)
    head = lines[0]
    assert (head["domain"], head["total"], head["dmarc_pass"]) == (DOMAIN, 210, 200)
    reporters = by(lines, "reporter")
    assert {n: (r["total"], r["dmarc_pass"]) for n, r in reporters.items()} == {
        "google.com": (105, 100),
        "Enterprise Outlook": (73, 70),
        "Yahoo": (30, 30),
        "mx.small.test": (2, 0),
    }
    sources = by(lines, "source")
    assert set(sources) == {OWN4, OWN6, "198.51.100.7", "203.0.113.9"}
    own = sources[OWN4]
    assert own["own"] and sources[OWN6]["own"]
    assert not sources["198.51.100.7"]["own"] and not sources["203.0.113.9"]["own"]
    assert (own["total"], own["dmarc_pass"], own["rejected"]) == (182, 180, 2)
    assert own["spf_aligned_rate"] == round(140 / 182, 4)  # Yahoo's unaligned SPF pass is no SPF alignment
    assert own["spf_pass_rate"] == round(170 / 182, 4)
    assert own["dkim_aligned_rate"] == round(180 / 182, 4)
    assert own["dkim_pass_rate"] == 1.0  # the small reporter's signature passed, for another domain
    assert (sources[OWN6]["total"], sources[OWN6]["spf_aligned_rate"]) == (20, 1.0)
    assert (sources["203.0.113.9"]["quarantined"], sources["203.0.113.9"]["dmarc_pass"]) == (3, 0)
    # own sources first, then the others
    assert [line["own"] for line in lines if line["type"] == "source"] == [True, True, False, False]
    text = relayd.cli("dmarc", "summary", "--domain", DOMAIN)
    assert text.returncode == 0 and "4 report(s), 210 message(s), 95.2% passing DMARC" in text.stdout
    assert any(line.startswith(OWN4) and " own " in line for line in text.stdout.splitlines())


def test_a_replayed_report_is_counted_once(relayd: Relayd) -> None:
    assert send(relayd, google()) == 250
    assert wait_until(lambda: summary(relayd)[0]["reports"] >= 1)
    before = by(summary(relayd), "reporter")["google.com"]["total"]
    for _ in range(3):  # the same report id again, in new mails
        assert send(relayd, google()) == 250
    assert wait_until(lambda: 'relayd_dmarc_reports_total{outcome="replayed"}' in metrics(relayd))
    assert by(summary(relayd), "reporter")["google.com"]["total"] == before == 105


def test_a_report_about_a_domain_we_do_not_send_for_is_not_stored(relayd: Relayd) -> None:
    rows = [Row("198.51.100.1", 7, "pass", "pass")]
    xml = feedback_xml("google.com", "foreign-1", rows, domain="unrelated.test")
    assert send(relayd, report_mail("google.com", xml, "text/xml", "r.xml")) == 250
    assert wait_until(lambda: 'relayd_dmarc_reports_total{outcome="foreign_domain"}' in metrics(relayd))
    assert summary(relayd, "unrelated.test")[0]["total"] == 0


@pytest.mark.parametrize(
    ("attachment", "ctype", "filename", "why"),
    [
        (BILLION_LAUGHS, "text/xml", "laughs.xml", "DTDForbidden"),
        (EXTERNAL_ENTITY, "text/xml", "xxe.xml", "DTDForbidden"),
        (
            gzip_bomb(64 << 20),
            "application/gzip",
            "bomb.xml.gz",
            f"decompressed size over {MAX_XML} bytes (gzip)",
        ),
        (high_ratio_member(), "application/zip", "ratio.zip", "compression ratio over"),
        (zipped("big.xml", b" " * (MAX_XML + 1)), "application/zip", "big.zip", "declares"),
        (many_members(), "application/zip", "many.zip", "zip with 1000 members"),
        (nested(), "application/zip", "nested.zip", "nested archive"),
        (
            gzip.compress(zipped("r.xml", b"<feedback/>")),
            "application/gzip",
            "nested.xml.gz",
            "nested archive",
        ),
    ],
    ids=[
        "billion-laughs",
        "external-entity",
        "gzip-bomb",
        "zip-ratio",
        "zip-size",
        "zip-members",
        "zip-nested",
        "gzip-nested",
    ],
)
def test_bombs_are_refused_without_harm(
    relayd: Relayd, attachment: bytes, ctype: str, filename: str, why: str
) -> None:
    before = summary(relayd)[0]["reports"]
    assert send(relayd, report_mail("attacker.test", attachment, ctype, filename)) == 250
    assert wait_until(lambda: any(why in note for note in inbox_notes(relayd)))
    assert summary(relayd)[0]["reports"] == before
    assert relayd.proc is not None and relayd.proc.poll() is None  # the daemon is unharmed
    listed = relayd.cli("inbox", "list", "--json").stdout
    assert "root:" not in listed  # no external entity was ever read
    assert send(relayd, small_reporter()) == 250  # and still reads reports


def test_dmarc_metrics_mark_own_sources_and_only_configured_domains(relayd: Relayd) -> None:
    for mail in (google(), microsoft(), yahoo(), small_reporter()):
        assert send(relayd, mail) == 250
    assert wait_until(lambda: 'relayd_dmarc_messages_total{domain="acme.example.test"' in metrics(relayd))
    values = {
        line.rpartition(" ")[0]: float(line.rpartition(" ")[2])
        for line in metrics(relayd).splitlines()
        if line.startswith("relayd_dmarc_messages_total{")
    }
    series = 'relayd_dmarc_messages_total{{domain="{}",result="{}",source="{}"}}'
    # the reports of the four reporters, each counted once however often it was mailed
    assert values == {
        series.format(DOMAIN, "pass", "own"): 200.0,
        series.format(DOMAIN, "fail", "own"): 2.0,
        series.format(DOMAIN, "fail", "other"): 8.0,
    }
    text = metrics(relayd)
    assert 'domain="unrelated.test"' not in text


# -- the parser on its own -----------------------------------------------------------------------------------


def test_gzip_bomb_stops_at_the_decompressed_size_cap_with_bounded_memory() -> None:
    bomb = gzip_bomb(256 << 20)  # 256 MB of output from about 250 KB
    assert len(bomb) < 1 << 20
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()  # tracing may already run (python -X tracemalloc): count from here
        before, _ = tracemalloc.get_traced_memory()
        with pytest.raises(Refused, match="decompressed size over"):
            decompress_gzip(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    peak -= before
    assert peak < 4 * MAX_XML  # what the cap allows, not what the bomb holds


def test_read_mail_never_raises_and_says_why() -> None:
    assert read_mail(b"").refused
    assert read_mail(b"Subject: hi\r\n\r\nhello\r\n").refused == "no report attachment (xml, gzip or zip)"
    assert read_mail(report_mail("x.test", b"<feedback><oops", "text/xml", "r.xml")).refused
    assert read_mail(report_mail("x.test", b"\x1f\x8bjunk", "application/gzip", "r.gz")).refused
    assert read_mail(report_mail("x.test", b"PK\x03\x04junk", "application/zip", "r.zip")).refused


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([b"", b"\x1f\x8b\x08\x00", b"PK\x03\x04", b"<?xml version='1.0'?><feedback>"]),
    st.binary(max_size=3000),
    st.sampled_from(["application/gzip", "application/zip", "application/xml", "application/octet-stream"]),
)
def test_read_mail_never_raises_on_any_attachment(head: bytes, tail: bytes, ctype: str) -> None:
    reading = read_mail(report_mail("fuzz.test", head + tail, ctype, "r.bin"))
    assert (reading.report is None) != (reading.refused is None)


def test_the_zip_member_is_read_with_the_cap_whatever_it_declares() -> None:
    with pytest.raises(Refused, match="over"):
        unzip_one(zipped("r.xml", b" " * 2048), limit=1024)


def test_a_report_is_parsed_with_its_counts() -> None:
    reading = read_mail(microsoft())
    assert reading.refused is None and reading.report is not None
    report = reading.report
    assert (report.org, report.report_id, report.domain, report.begin) == (
        "Enterprise Outlook",
        "ms-1",
        DOMAIN,
        BEGIN,
    )
    assert [(r.source_ip, r.count, r.dkim_aligned, r.spf_aligned) for r in report.records] == [
        (OWN4, 40, True, True),
        (OWN4, 10, True, False),
        (OWN6, 20, False, True),
        ("203.0.113.9", 3, False, False),
    ]
    assert dmarc.read_mail(small_reporter()).report is not None  # namespaced XML in the body


# -- the alert rule ------------------------------------------------------------------------------------------


def test_alert_fires_when_own_traffic_fails_alignment(tmp_path: Path) -> None:
    doc = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    name = "relayd_dmarc_messages_total"
    bad, good = {"domain": "bad.test"}, {"domain": "good.test"}
    tests = {
        "rule_files": ["alerts.yml"],
        "evaluation_interval": "5m",
        "tests": [
            {
                "interval": "1h",
                "input_series": [
                    _series(name, {**bad, "source": "own", "result": "pass"}, "0+900x30"),
                    _series(name, {**bad, "source": "own", "result": "fail"}, "0+100x30"),
                    _series(name, {**good, "source": "own", "result": "pass"}, "0+1000x30"),
                    _series(name, {**good, "source": "other", "result": "fail"}, "0+500x30"),
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "25h",
                        "alertname": "RelaydDmarcOwnTrafficFailing",
                        "exp_alerts": [{"exp_labels": {"severity": "warning", "domain": "bad.test"}}],
                    }
                ],
            }
        ],
    }
    (tmp_path / "test.yml").write_text(yaml.safe_dump(tests, sort_keys=False), encoding="utf-8")
    result = subprocess.run(
        [_promtool(), "test", "rules", "test.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- the store, both backends --------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s = _make_store(request.param, tmp_path)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def test_a_report_is_stored_once_per_reporter_id_and_domain(store: Store) -> None:
    reading = read_mail(microsoft())
    assert reading.report is not None
    counts = counts_of(reading.report)
    # the two records of the same source are added up: one row per source IP
    assert [(c.source_ip, c.total, c.dmarc_pass, c.spf_aligned) for c in counts] == [
        ("192.0.2.10", 50, 50, 40),
        ("2001:db8::10", 20, 20, 20),
        ("203.0.113.9", 3, 0, 0),
    ]
    now = datetime.now(UTC)
    assert await store.add_dmarc_report("Enterprise Outlook", "ms-1", DOMAIN, now, counts)
    assert not await store.add_dmarc_report("Enterprise Outlook", "ms-1", DOMAIN, now, counts)
    stored = await store.dmarc_counts(DOMAIN, counts[0].day)
    assert sorted(stored, key=lambda c: c.source_ip) == counts
    assert await store.dmarc_counts(DOMAIN, counts[0].day + timedelta(days=1)) == []
    assert await store.dmarc_counts("other.test", counts[0].day) == []


# -- check-config --dns --------------------------------------------------------------------------------------


async def test_check_config_dns_says_whether_rua_points_at_relayd() -> None:
    zone = {
        ("_dmarc.acme.test.", "TXT"): [_txt("v=DMARC1; p=none; rua=mailto:dmarc@bounces.acme.test!10m")],
        ("_dmarc.vendor.test.", "TXT"): [_txt("v=DMARC1; p=reject; rua=mailto:reports@dmarc-vendor.test")],
    }
    server = DnsServer(zone, servfail="broken.test.")
    try:
        cfg = Config.model_validate(
            {
                "inbound": {"domains": ["bounces.acme.test"]},
                "delivery": {"nameservers": [server.address]},
                "accounts": {
                    "acme": {
                        "networks": ["127.0.0.1/32"],
                        "domains": ["acme.test", "vendor.test", "none.test"],
                    }
                },
            }
        )
        checks = await run_checks(cfg, outbound_ips=["127.0.0.1"])
    finally:
        server.close()
    rua = {c.domain: c for c in checks if c.what == "DMARC-RUA"}
    assert rua["acme.test"].detail == "reports go to relayd (dmarc@bounces.acme.test)"
    assert rua["vendor.test"].detail.startswith("not relayd: mailto:reports@dmarc-vendor.test")
    assert rua["none.test"].detail.startswith("no DMARC record")
    assert [c.what for c in checks][-1] == "MX"  # the inbound domain's row stays last
