"""The alerting is alive: promtool checks and unit-tests every rule, amtool checks the routing,
every rule is documented, and (tests/test_metrics_live.py) every metric a rule or dashboard panel
uses is exported by a live master or agent.

promtool and amtool are required in CI (`apt-get install prometheus prometheus-alertmanager`,
done by .ci/run) and skip locally when missing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import require

ROOT = Path(__file__).resolve().parent.parent
ALERTING = ROOT / "alerting"
RULES = ALERTING / "rules.yml"
DASHBOARD = ALERTING / "grafana-dashboard.json"
RUNBOOKS = ROOT / "docs" / "RUNBOOKS.md"
RULE_TESTS = sorted((ALERTING / "tests").glob("*.yml"))

# The list: each must exist with this severity.
REQUIRED_ALERTS = {
    "FfrtmpMasterDown": "critical",
    "FfrtmpAllAgentsDown": "critical",
    "FfrtmpJobFailureRateHigh": "critical",
    "FfrtmpQueueDepthCritical": "critical",
    "FfrtmpCompletionRateDropped": "critical",
    "FfrtmpDatabaseWriteLatencyHigh": "critical",
    "FfrtmpAgentDown": "warning",
    "FfrtmpQueueWaitHigh": "warning",
    "FfrtmpThroughputBelowExpected": "warning",
    "FfrtmpAgentDiskLow": "warning",
    "FfrtmpSlaComplianceLow": "warning",
    "FfrtmpJobsStalled": "warning",
    "Watchdog": "none",
}
# Series Prometheus makes itself; nothing of ours exports them.
SYNTHETIC_SERIES = frozenset({"up", "ALERTS", "ALERTS_FOR_STATE"})


def _tool(name: str) -> str:
    path = shutil.which(name)
    package = "prometheus" if name == "promtool" else "prometheus-alertmanager"
    require(path is not None, f"{name} not on PATH (apt-get install {package})")
    assert path is not None
    return path


def _run(*argv: str, cwd: Path = ALERTING) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=120, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(argv)} failed:\n{out}"
    return out


def load_rules() -> list[dict[str, Any]]:
    """Every rule (recording and alerting) of alerting/rules.yml."""
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for r in load_rules() if "alert" in r}


# ---------------------------------------------------------------------------- PromQL names

_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "by", "without", "on",
                       "ignoring", "group_left", "group_right", "inf", "nan", "atan2"})
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_RANGE = re.compile(r"\[[^\]]*\]")
_OFFSET = re.compile(r"\boffset\s+-?[0-9a-z]+")
_IDENT = re.compile(r"(?<![\w.$:])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")


def promql_names(expr: str) -> set[str]:
    """Metric (and recording rule) names an expression selects; functions, keywords, label
    names and Grafana variables are left out."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _GROUPING.sub("", text)
    text = _RANGE.sub("", text)
    text = _OFFSET.sub("", text)
    names = set()
    for m in _IDENT.finditer(text):
        name, call = m.group(1), m.group(2)
        if call or name.lower() in _KEYWORDS or re.fullmatch(r"\d\w*", name):
            continue
        names.add(name)
    return names


def rule_exprs() -> dict[str, str]:
    return {r.get("alert") or r["record"]: r["expr"] for r in load_rules()}


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dash.get("annotations", {}).get("list", []) if "expr" in a]
    return exprs


def used_metric_names() -> set[str]:
    """Every exported series name the rules and the dashboard use, recording rules resolved."""
    recorded = {r["record"]: r["expr"] for r in load_rules() if "record" in r}
    pending = [e for e in rule_exprs().values()] + dashboard_exprs()
    names: set[str] = set()
    seen: set[str] = set()
    while pending:
        for name in promql_names(pending.pop()):
            if name in recorded:
                if name not in seen:
                    seen.add(name)
                    pending.append(recorded[name])
            else:
                names.add(name)
    return names - SYNTHETIC_SERIES


def test_promql_names_finds_metrics_and_skips_the_rest() -> None:
    expr = ('sum by (le, scenario) (rate(ffrtmp_a_bucket{status="x", le!="1"}[$__rate_interval]))'
            ' / on() group_left() max(ffrtmp_b) > 0.5 and ffrtmp:rec:ratio offset 1h'
            ' or absent(up{job="ffrtmp-master"}) unless vector(1) * scalar(ffrtmp_c) + 2^20')
    assert promql_names(expr) == {"ffrtmp_a_bucket", "ffrtmp_b", "ffrtmp:rec:ratio", "up",
                                  "ffrtmp_c"}
    assert promql_names('histogram_quantile(0.95, sum by (le) (rate(x_bucket[10m] offset 1h)))') \
        == {"x_bucket"}


def test_rules_and_dashboard_only_use_ffrtmp_metrics() -> None:
    names = used_metric_names()
    assert names, "no metric found in the rules and dashboard"
    assert all(n.startswith("ffrtmp_") for n in names), sorted(names)


# ---------------------------------------------------------------------------- rules, static


def test_every_required_alert_exists_with_its_severity() -> None:
    found = {name: rule["labels"]["severity"] for name, rule in alerts().items()}
    missing = {k: v for k, v in REQUIRED_ALERTS.items() if found.get(k) != v}
    assert not missing, f"missing or wrong severity: {missing}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_every_alert_is_complete_and_has_a_runbook_section() -> None:
    anchors = {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.+)$", RUNBOOKS.read_text(),
                                                        re.MULTILINE)}
    for name, rule in alerts().items():
        labels, notes = rule.get("labels", {}), rule.get("annotations", {})
        assert labels.get("severity") in ("critical", "warning", "none"), name
        assert labels.get("component"), f"{name}: no component label (inhibition needs it)"
        if name != "Watchdog":
            assert rule.get("for"), f"{name}: no `for`"
        for key in ("summary", "description", "runbook_url"):
            assert notes.get(key), f"{name}: no {key}"
        url, _, anchor = notes["runbook_url"].partition("#")
        assert url.endswith("docs/RUNBOOKS.md"), f"{name}: runbook_url {url}"
        assert anchor == name.lower() and anchor in anchors, \
            f"{name}: docs/RUNBOOKS.md has no section #{anchor}"


def test_every_alert_has_promtool_tests_that_fire_and_stay_silent() -> None:
    firing: set[str] = set()
    silent: set[str] = set()
    for path in RULE_TESTS:
        doc = yaml.safe_load(path.read_text())
        assert doc["rule_files"] == ["../rules.yml"], path.name
        for test in doc["tests"]:
            for case in test.get("alert_rule_test", []):
                (firing if case.get("exp_alerts") else silent).add(case["alertname"])
    names = set(alerts())
    assert names - firing == set(), f"never shown to fire: {sorted(names - firing)}"
    assert names - {"Watchdog"} - silent == set(), \
        f"never shown to stay silent: {sorted(names - {'Watchdog'} - silent)}"


# ---------------------------------------------------------------------------- the tools


def test_promtool_check_rules() -> None:
    out = _run(_tool("promtool"), "check", "rules", str(RULES))
    assert f"SUCCESS: {len(load_rules())} rules found" in out, out


def test_promtool_check_example_prometheus_config() -> None:
    _run(_tool("promtool"), "check", "config", "prometheus.yml")


@pytest.mark.parametrize("path", RULE_TESTS, ids=[p.stem for p in RULE_TESTS])
def test_promtool_unit_tests(path: Path) -> None:
    out = _run(_tool("promtool"), "test", "rules", str(path.relative_to(ALERTING)))
    assert "SUCCESS" in out and "FAILED" not in out, out


def test_promtool_unit_test_fails_on_a_wrong_expectation(tmp_path: Path) -> None:
    """The harness can fail: a test that expects the Watchdog silent must not pass."""
    (tmp_path / "rules.yml").write_text(RULES.read_text())
    (tmp_path / "tests").mkdir()
    bad = tmp_path / "tests" / "bad.yml"
    bad.write_text(yaml.safe_dump({
        "rule_files": ["../rules.yml"], "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": [],
                   "alert_rule_test": [{"eval_time": "1m", "alertname": "Watchdog",
                                        "exp_alerts": []}]}]}))
    proc = subprocess.run([_tool("promtool"), "test", "rules", str(bad)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode != 0 and "FAILED" in proc.stdout + proc.stderr


def test_amtool_check_config() -> None:
    out = _run(_tool("amtool"), "check-config", "alertmanager.yml")
    assert "SUCCESS" in out and "3 inhibit rules" in out, out


@pytest.mark.parametrize(("labels", "receiver"), [
    (["alertname=FfrtmpMasterDown", "severity=critical", "component=master"], "pager"),
    (["alertname=FfrtmpAgentDown", "severity=warning", "component=agents"], "tickets"),
    (["alertname=Watchdog", "severity=none", "component=meta"], "deadmans-switch"),
])
def test_alertmanager_routes_by_severity(labels: list[str], receiver: str) -> None:
    out = _run(_tool("amtool"), "config", "routes", "test", "--config.file=alertmanager.yml",
               *labels)
    assert out.splitlines()[0].strip() == receiver, out


def test_alertmanager_inhibits_agent_alerts_when_the_master_is_down() -> None:
    doc = yaml.safe_load((ALERTING / "alertmanager.yml").read_text())
    rules = [(r["source_matchers"], r["target_matchers"], r.get("equal", []))
             for r in doc["inhibit_rules"]]
    assert (['alertname="FfrtmpMasterDown"'], ['component="agents"'], ["cluster"]) in rules
    assert (['severity="critical"'], ['severity="warning"'], ["cluster", "component"]) in rules
    # Every component that has a warning has a label value alerts really carry.
    components = {r["labels"]["component"] for r in alerts().values()}
    assert {"agents", "queue", "throughput", "jobs", "sla"} <= components
