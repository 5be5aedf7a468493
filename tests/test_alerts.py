"""``conf/alerts.yml`` and ``conf/grafana-dashboard.json`` against promtool and relayd's own metric families.

An alert on a metric relayd does not export never fires, silently; a dashboard panel on one stays empty.
So every metric name in every rule and panel must be ``up`` or a family in
:data:`relayd.core.metrics.REGISTRY`.
promtool checks the rules' syntax and, in a unit test built here, that the main alerts fire when they should
and stay quiet when they should. CI installs promtool (Debian package ``prometheus``): without it the
promtool tests fail rather than skip, so a broken CI image cannot pass unnoticed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from relayd.core.metrics import REGISTRY

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "conf" / "alerts.yml"
DASHBOARD = ROOT / "conf" / "grafana-dashboard.json"

# --- metric names in PromQL -------------------------------------------------------------------------------

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"' + r"|'(?:[^'\\]|\\.)*'|`[^`]*`")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_GROUPINGS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w.:$])([A-Za-z_:][A-Za-z0-9_:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right"}
)
_KEYWORDS |= {"inf", "nan", "Inf", "NaN", "atan2"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects.

    Not a full parser: strings, label matchers, ranges and grouping label lists are cut out, then every
    identifier that is not a function call, keyword or number is a metric name. Enough for the expressions
    we write, and checked against known answers in :func:`test_metric_names_extractor`.
    """
    expr = _STRINGS.sub('""', expr)
    expr = _MATCHERS.sub(" ", expr)
    expr = _RANGES.sub(" ", expr)
    expr = _GROUPINGS.sub(" ", expr)
    return {m for m in _IDENT.findall(expr) if m not in _KEYWORDS}


def exported_names() -> set[str]:
    """Every series name relayd's registry can expose: counters as ``_total``, histograms as their parts."""
    names: set[str] = set()
    for family in REGISTRY.collect():
        if family.type == "counter":
            names |= {f"{family.name}_total", f"{family.name}_created"}
        elif family.type == "histogram":
            names |= {f"{family.name}_{part}" for part in ("bucket", "sum", "count", "created")}
        else:
            names.add(family.name)
    return names


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('up{job="relayd"} == 0', {"up"}),
        ("absent(up)", {"up"}),
        (
            'sum by (account) (increase(relayd_account_complaints_total{account=~"a|b"}[1d])) / '
            "sum by (account) (increase(relayd_account_sent_total[1d])) > 0.001",
            {"relayd_account_complaints_total", "relayd_account_sent_total"},
        ),
        (
            "histogram_quantile(0.99, sum(rate(x_bucket[$__rate_interval])) by (le)) > 1e3",
            {"x_bucket"},
        ),
        ("a / on (job) group_left (instance) b offset 5m and bool c", {"a", "b", "c"}),
        ('label_replace(m, "dst", "$1", "src", "(.*)")', {"m"}),
    ],
)
def test_metric_names_extractor(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_registry_has_the_families_the_rules_rely_on() -> None:
    names = exported_names()
    assert {"relayd_deliveries_total", "relayd_queue_oldest_age_seconds"} <= names
    assert "relayd_smtp_accept_seconds_bucket" in names


# --- alerts.yml -------------------------------------------------------------------------------------------


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_alert_rules_use_only_exported_metrics() -> None:
    allowed = exported_names() | {"up"}
    rules = _rules()
    assert rules
    for rule in rules:
        used = metric_names(rule["expr"])
        assert used, rule["alert"]
        assert used <= allowed, (rule["alert"], used - allowed)


def test_every_alert_has_for_severity_and_advice() -> None:
    names = []
    for rule in _rules():
        name = rule.get("alert")
        assert name, rule
        names.append(name)
        assert "for" in rule, name
        assert rule.get("labels", {}).get("severity") in {"warning", "critical"}, name
        annotations = rule.get("annotations", {})
        assert annotations.get("summary"), name
        assert len(annotations.get("description", "")) > 80, name  # says what to do, not just what is wrong
    assert len(names) == len(set(names))


def test_alerts_cover_the_paging_conditions() -> None:
    exprs = "\n".join(rule["expr"] for rule in _rules())
    for needle in (
        'up{job="relayd"} == 0',
        "relayd_queue_oldest_age_seconds",
        'relayd_deliveries_total{outcome=~"bounced|expired"}',
        'relayd_deliveries_total{outcome="deferred"}',
        "> 0.001",
        "> 0.002",
        'relayd_account_bounces_total{type="hard"}',
        "increase(relayd_account_suspensions_total[10m])) > 0",
        'reason=~"storage|policy_store"',
    ):
        assert needle in exprs, needle


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: install the Debian package 'prometheus' (CI does)")
    return path


def test_promtool_check_rules() -> None:
    result = subprocess.run(
        [_promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def _series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def _unit_tests() -> list[dict[str, Any]]:
    """promtool rule tests: input series, then which alerts fire when (labels only, see the caller)."""
    acct = "relayd_account_sent_total"
    complaints = "relayd_account_complaints_total"
    bounces = "relayd_account_bounces_total"
    deliveries = "relayd_deliveries_total"
    r1 = {"instance": "r1"}
    return [
        {
            "name": "account rates: 0.15 % warns, 0.25 % is critical, small senders are ignored",
            "interval": "1m",
            "input_series": [
                _series(acct, {"account": "acme"}, "0+100x1500"),
                _series(complaints, {"account": "acme"}, "0+0.15x1500"),
                _series(bounces, {"account": "acme", "type": "hard"}, "0+3x1500"),
                _series(bounces, {"account": "acme", "type": "soft"}, "0+10x1500"),
                _series(acct, {"account": "big"}, "0+100x1500"),
                _series(complaints, {"account": "big"}, "0+0.25x1500"),
                _series(bounces, {"account": "big", "type": "hard"}, "0+6x1500"),
                _series(acct, {"account": "tiny"}, "0+0.5x1500"),
                _series(complaints, {"account": "tiny"}, "0+0.25x1500"),
                _series(bounces, {"account": "tiny", "type": "hard"}, "0+0.25x1500"),
            ],
            "alert_rule_test": [
                {"eval_time": "20m", "alertname": "RelaydAccountComplaintRateHigh", "exp_alerts": []},
                {
                    "eval_time": "1d",
                    "alertname": "RelaydAccountComplaintRateHigh",
                    "exp_alerts": [
                        {"exp_labels": {"account": "acme", "severity": "warning"}},
                        {"exp_labels": {"account": "big", "severity": "warning"}},
                    ],
                },
                {
                    "eval_time": "1d",
                    "alertname": "RelaydAccountComplaintRateCritical",
                    "exp_alerts": [{"exp_labels": {"account": "big", "severity": "critical"}}],
                },
                {
                    "eval_time": "1d",
                    "alertname": "RelaydAccountHardBounceRateHigh",
                    "exp_alerts": [
                        {"exp_labels": {"account": "acme", "severity": "warning"}},
                        {"exp_labels": {"account": "big", "severity": "warning"}},
                    ],
                },
                {
                    "eval_time": "1d",
                    "alertname": "RelaydAccountHardBounceRateCritical",
                    "exp_alerts": [{"exp_labels": {"account": "big", "severity": "critical"}}],
                },
            ],
        },
        {
            "name": "suspension, storage trouble, relayd down",
            "interval": "1m",
            "input_series": [
                _series(
                    "relayd_account_suspensions_total",
                    {"account": "acme", "reason": "complaint_rate"},
                    "0x30 1x30",
                ),
                _series(
                    "relayd_submissions_total", {**r1, "outcome": "deferred", "reason": "storage"}, "0+1x60"
                ),
                _series("relayd_submissions_total", {**r1, "outcome": "refused", "reason": "mime"}, "0+9x60"),
                _series("up", {"job": "relayd", **r1}, "1x5 0x60"),
            ],
            "alert_rule_test": [
                {"eval_time": "25m", "alertname": "RelaydAccountSuspended", "exp_alerts": []},
                {
                    "eval_time": "35m",
                    "alertname": "RelaydAccountSuspended",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "account": "acme",
                                "reason": "complaint_rate",
                                "severity": "critical",
                            }
                        }
                    ],
                },
                {"eval_time": "50m", "alertname": "RelaydAccountSuspended", "exp_alerts": []},
                {
                    "eval_time": "20m",
                    "alertname": "RelaydSubmissionsDeferredForStorage",
                    "exp_alerts": [{"exp_labels": {**r1, "severity": "critical"}}],
                },
                {"eval_time": "5m", "alertname": "RelaydDown", "exp_alerts": []},
                {
                    "eval_time": "15m",
                    "alertname": "RelaydDown",
                    "exp_alerts": [{"exp_labels": {"job": "relayd", **r1, "severity": "critical"}}],
                },
                {"eval_time": "15m", "alertname": "RelaydMetricsAbsent", "exp_alerts": []},
            ],
        },
        {
            "name": "delivery ratios and the queue",
            "interval": "1m",
            "input_series": [
                _series(deliveries, {**r1, "outcome": "delivered", "domain": "a.test"}, "0+80x900"),
                _series(deliveries, {**r1, "outcome": "bounced", "domain": "a.test"}, "0+15x900"),
                _series(deliveries, {**r1, "outcome": "deferred", "domain": "a.test"}, "0+5x900"),
                _series(deliveries, {**r1, "outcome": "deferred", "domain": "b.test"}, "0+30x900"),
                _series(deliveries, {**r1, "outcome": "delivered", "domain": "b.test"}, "0+1x900"),
                _series("relayd_queue_oldest_age_seconds", r1, "0+60x900"),
                _series("relayd_queue_recipients", {**r1, "state": "queued"}, "20000+100x900"),
            ],
            "alert_rule_test": [
                {
                    "eval_time": "40m",
                    "alertname": "RelaydDeliveryFailureRatioHigh",
                    "exp_alerts": [{"exp_labels": {**r1, "severity": "critical"}}],
                },
                {"eval_time": "40m", "alertname": "RelaydDeliveryDeferredRatioHigh", "exp_alerts": []},
                {
                    "eval_time": "60m",
                    "alertname": "RelaydDestinationFailing",
                    "exp_alerts": [{"exp_labels": {**r1, "domain": "b.test", "severity": "warning"}}],
                },
                {
                    "eval_time": "70m",
                    "alertname": "RelaydQueueBacklogGrowing",
                    "exp_alerts": [{"exp_labels": {**r1, "severity": "warning"}}],
                },
                {"eval_time": "11h", "alertname": "RelaydQueueOldestMessageOld", "exp_alerts": []},
                {
                    "eval_time": "13h",
                    "alertname": "RelaydQueueOldestMessageOld",
                    "exp_alerts": [{"exp_labels": {**r1, "severity": "warning"}}],
                },
            ],
        },
        {
            "name": "slow accept",
            "interval": "1m",
            "input_series": [
                _series("relayd_smtp_accept_seconds_bucket", {**r1, "le": "0.5"}, "0+10x60"),
                _series("relayd_smtp_accept_seconds_bucket", {**r1, "le": "1.0"}, "0+10x60"),
                _series("relayd_smtp_accept_seconds_bucket", {**r1, "le": "2.5"}, "0+100x60"),
                _series("relayd_smtp_accept_seconds_bucket", {**r1, "le": "+Inf"}, "0+100x60"),
                _series("relayd_smtp_accept_seconds_count", r1, "0+100x60"),
            ],
            "alert_rule_test": [
                {
                    "eval_time": "30m",
                    "alertname": "RelaydAcceptLatencyHigh",
                    "exp_alerts": [{"exp_labels": {**r1, "severity": "warning"}}],
                }
            ],
        },
    ]


@pytest.fixture
def rules_without_annotations(tmp_path: Path) -> Iterator[Path]:
    """alerts.yml minus annotations: promtool compares annotations verbatim, and the tests are about when
    alerts fire, not about their prose (checked above)."""
    doc = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    path = tmp_path / "alerts.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    yield path


def test_promtool_unit_tests(tmp_path: Path, rules_without_annotations: Path) -> None:
    promtool = _promtool()
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(
        yaml.safe_dump(
            {
                "rule_files": [rules_without_annotations.name],
                "evaluation_interval": "5m",
                "tests": _unit_tests(),
            },
            sort_keys=False,
        ),
        encoding="utf-8",
    )
    result = subprocess.run(
        [promtool, "test", "rules", tests.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- grafana-dashboard.json --------------------------------------------------------------------------------


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def test_dashboard_exprs_use_only_exported_metrics() -> None:
    allowed = exported_names() | {"up"}
    used_all: set[str] = set()
    targets = 0
    for panel in _panels(_dashboard()["panels"]):
        for target in panel.get("targets", []):
            targets += 1
            used = metric_names(target["expr"])
            assert used, (panel["title"], target["expr"])
            assert used <= allowed, (panel["title"], used - allowed)
            used_all |= used
    assert targets > 10
    for family in (
        "relayd_submissions_total",
        "relayd_recipients_dropped_total",
        "relayd_deliveries_total",
        "relayd_queue_recipients",
        "relayd_queue_oldest_age_seconds",
        "relayd_account_complaints_total",
        "relayd_account_bounces_total",
        "relayd_account_sent_total",
        "relayd_smtp_accept_seconds_bucket",
        "relayd_dkim_sign_seconds_bucket",
        "relayd_dsn_received_total",
        "relayd_arf_received_total",
    ):
        assert family in used_all, family


def test_dashboard_is_importable() -> None:
    dash = _dashboard()
    assert 36 <= dash["schemaVersion"] <= 41
    assert [i["name"] for i in dash["__inputs"]] == ["DS_PROMETHEUS"]
    assert dash["uid"] and dash["title"]
    panels = list(_panels(dash["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert "relayd_account_sent_total" in variables["account"]["definition"]
    account_panels = [p for p in panels if any("$account" in t["expr"] for t in p.get("targets", []))]
    assert len(account_panels) >= 2
