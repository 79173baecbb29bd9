#!/usr/bin/env python3
"""Check the lab's Grafana dashboards: structure, variables and every PromQL expression.

Usage:
    check_dashboards.py [--dashboards DIR] [--prometheus URL] [--datasource-uid UID]

Without --prometheus only the structure is checked: every dashboards/*.json parses, dashboard uids
are unique, panel ids are unique within a dashboard, every panel, target and query variable uses
the lab's Prometheus datasource (by uid), and every variable an expression references is defined.
With --prometheus every expression (panel targets and query variables, `label_values(metric,
label)` turned into a query of that metric) is sent to URL/api/v1/query after the Grafana
variables are substituted; any expression Prometheus rejects is listed. Exit status 1 on any
problem. Standard library only, so it runs on any host with python3.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

DATASOURCE_UID = "flowerlab-prometheus"
# The project's dashboards/ (tests/dashboards/../../dashboards); --dashboards when the script is copied elsewhere.
DEFAULT_DIR = Path(__file__).resolve().parent.parent.parent / "dashboards"
# Grafana 11 writes schemaVersion 39 (11.0) to 41 (11.6).
SCHEMA_VERSIONS = range(39, 42)
# Values the time-dependent built-in variables take when an expression is checked.
INTERVAL = "1m"
BUILTIN_VALUES = {
    "__rate_interval": INTERVAL,
    "__interval": INTERVAL,
    "__range": INTERVAL,
    "__interval_ms": "60000",
    "__range_ms": "60000",
    "__range_s": "60",
    "__rate_interval_ms": "60000",
}
# Built-in variables Grafana defines for every dashboard (not only the time ones above).
BUILTIN_NAMES = set(BUILTIN_VALUES) | {
    "__all",
    "__auto",
    "__dashboard",
    "__from",
    "__to",
    "__name",
    "__org",
    "__user",
    "__timeFilter",
    "timeFilter",
    "__timezone",
}
# $name, ${name}, ${name:format}, [[name]], [[name:format]] ($1 of label_replace is not a variable)
VARIABLE_REF = re.compile(r"\$\{([A-Za-z_]\w*)(?::[^}]*)?\}|\[\[([A-Za-z_]\w*)(?::[^\]]*)?\]\]|\$([A-Za-z_]\w*)")
LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(?P<metric>.+?)\s*,\s*)?(?P<label>[a-zA-Z_]\w*)\s*\)\s*$", re.S)
LABEL_NAMES = re.compile(r"^\s*label_names\(\s*(?P<metric>.*?)\s*\)\s*$", re.S)
METRICS = re.compile(r"^\s*metrics\(\s*(?P<regex>.*?)\s*\)\s*$", re.S)
QUERY_RESULT = re.compile(r"^\s*query_result\(\s*(?P<query>.*)\)\s*$", re.S)


@dataclass(frozen=True)
class Expression:
    """One PromQL expression of a dashboard and where it comes from."""

    where: str
    expr: str


def variable_refs(text: str) -> set[str]:
    """Names of the Grafana variables referenced in text."""
    return {next(g for g in m.groups() if g) for m in VARIABLE_REF.finditer(text)}


def variable_values(dashboard: dict) -> dict[str, str]:
    """The value each dashboard variable takes when expressions are checked.

    Query variables (multi-value, include all: a regex alternation in the expressions) become `.*`;
    interval, custom and constant variables their current (or first) value.
    """
    values: dict[str, str] = {}
    for var in dashboard.get("templating", {}).get("list", []):
        name, kind = var.get("name", ""), var.get("type", "query")
        if kind in ("query", "datasource", "adhoc"):
            values[name] = ".*"
            continue
        current = var.get("current", {}).get("value")
        if isinstance(current, list):
            current = current[0] if current else None
        if current in (None, "", "$__all"):
            options = [o.get("value") for o in var.get("options", []) if o.get("value")]
            current = options[0] if options else str(var.get("query", "")).split(",")[0].strip()
        if kind == "interval" and (not current or current.startswith("$") or current == "auto"):
            current = INTERVAL
        values[name] = str(current) if current else ".*"
    return values


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace Grafana variables (user and built-in) by concrete values; unknown ones are left as is."""
    merged = {**BUILTIN_VALUES, **values}

    def repl(m: re.Match) -> str:
        name = next(g for g in m.groups() if g)
        return merged.get(name, m.group(0))

    return VARIABLE_REF.sub(repl, expr)


def variable_query_text(var: dict) -> str:
    """The query string of a query variable (string or Grafana 10+ object form)."""
    query = var.get("query", "")
    if isinstance(query, dict):
        query = query.get("query", "")
    return str(query or var.get("definition", ""))


def variable_promql(query: str) -> str | None:
    """Turn a Prometheus variable query into a PromQL expression, or None when it has none."""
    if m := LABEL_VALUES.match(query):
        metric = m.group("metric")
        return metric if metric else f'{{{m.group("label")}!=""}}'
    if m := LABEL_NAMES.match(query):
        return m.group("metric") or None
    if m := METRICS.match(query):
        regex = m.group("regex").replace('"', '\\"')
        return f'{{__name__=~"{regex}"}}'
    if m := QUERY_RESULT.match(query):
        return m.group("query")
    return query.strip() or None


def iter_panels(panels: list[dict]):
    """Every panel, including those nested in collapsed rows."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def expressions(dashboard: dict, name: str = "") -> list[Expression]:
    """Every PromQL expression of a dashboard, variables not substituted."""
    found = []
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            promql = variable_promql(variable_query_text(var))
            if promql:
                found.append(Expression(f"{name}: variable ${var.get('name')}", promql))
    for panel in iter_panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                where = f"{name}: panel {panel.get('id')} '{panel.get('title', '')}' target {target.get('refId')}"
                found.append(Expression(where, target["expr"]))
    return found


def _datasource_uid(ds) -> str | None:
    if isinstance(ds, dict):
        return ds.get("uid")
    return ds


def structure_problems(dashboards: dict[str, dict], datasource_uid: str = DATASOURCE_UID) -> list[str]:
    """Problems with the dashboards' structure (empty list when all is well)."""
    problems: list[str] = []
    seen_uids: dict[str, str] = {}
    for name, dash in dashboards.items():
        uid = dash.get("uid")
        if not uid:
            problems.append(f"{name}: no dashboard uid")
        elif uid in seen_uids:
            problems.append(f"{name}: dashboard uid '{uid}' also used by {seen_uids[uid]}")
        else:
            seen_uids[uid] = name
        if not dash.get("title"):
            problems.append(f"{name}: no title")
        if dash.get("schemaVersion") not in SCHEMA_VERSIONS:
            problems.append(
                f"{name}: schemaVersion {dash.get('schemaVersion')} is not Grafana 11's "
                f"({SCHEMA_VERSIONS.start}..{SCHEMA_VERSIONS.stop - 1})"
            )
        variables = dash.get("templating", {}).get("list", [])
        names = [v.get("name") for v in variables]
        for dup in sorted({n for n in names if names.count(n) > 1}):
            problems.append(f"{name}: variable ${dup} defined more than once")
        defined = set(names) | BUILTIN_NAMES
        for var in variables:
            if var.get("type") == "query":
                if _datasource_uid(var.get("datasource")) != datasource_uid:
                    problems.append(f"{name}: variable ${var.get('name')} does not use datasource uid {datasource_uid}")
                for ref in sorted(variable_refs(variable_query_text(var)) - defined):
                    problems.append(f"{name}: variable ${var.get('name')} references undefined variable ${ref}")
        ids: dict[int, str] = {}
        for panel in iter_panels(dash.get("panels", [])):
            pid, title = panel.get("id"), panel.get("title", "")
            if pid is None:
                problems.append(f"{name}: panel '{title}' has no id")
            elif pid in ids:
                problems.append(f"{name}: panel id {pid} used by '{ids[pid]}' and '{title}'")
            else:
                ids[pid] = title
            for ref in sorted(variable_refs(title) - defined):
                problems.append(f"{name}: panel {pid} '{title}' title references undefined variable ${ref}")
            targets = panel.get("targets", [])
            if panel.get("type") != "row" and targets and _datasource_uid(panel.get("datasource")) != datasource_uid:
                problems.append(f"{name}: panel {pid} '{title}' does not use datasource uid {datasource_uid}")
            ref_ids = [t.get("refId") for t in targets]
            for dup in sorted({r for r in ref_ids if ref_ids.count(r) > 1}, key=str):
                problems.append(f"{name}: panel {pid} '{title}' has refId {dup} more than once")
            for target in targets:
                where = f"{name}: panel {pid} '{title}' target {target.get('refId')}"
                if "datasource" in target and _datasource_uid(target["datasource"]) != datasource_uid:
                    problems.append(f"{where} does not use datasource uid {datasource_uid}")
                if not str(target.get("expr", "")).strip():
                    problems.append(f"{where} has no expression")
                for ref in sorted(variable_refs(str(target.get("expr", "")) + str(target.get("legendFormat", "")))):
                    if ref not in defined:
                        problems.append(f"{where} references undefined variable ${ref}")
    return problems


def load_dashboards(directory: Path) -> tuple[dict[str, dict], list[str]]:
    """Every *.json of directory by file name, and the files that do not parse."""
    dashboards, problems = {}, []
    files = sorted(Path(directory).glob("*.json"))
    if not files:
        problems.append(f"{directory}: no dashboards (*.json)")
    for path in files:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            problems.append(f"{path.name}: does not parse: {err}")
            continue
        if not isinstance(data, dict):
            problems.append(f"{path.name}: not a dashboard object")
            continue
        dashboards[path.name] = data
    return dashboards, problems


def prometheus_query(base_url: str, expr: str, timeout: float = 10.0) -> dict:
    """POST expr to Prometheus' /api/v1/query; the decoded JSON answer (also for HTTP errors)."""
    url = base_url.rstrip("/") + "/api/v1/query"
    data = urllib.parse.urlencode({"query": expr}).encode()
    request = urllib.request.Request(url, data=data, method="POST")
    request.add_header("Content-Type", "application/x-www-form-urlencoded")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as err:
        body = err.read()
    try:
        return json.loads(body)
    except ValueError:
        return {"status": "error", "errorType": "bad_response", "error": body[:200].decode(errors="replace")}


def check_with_prometheus(exprs: list[Expression], dashboards: dict[str, dict], base_url: str) -> tuple[list[str], int]:
    """Send every expression (variables substituted); problems, and how many returned data."""
    problems, with_data = [], 0
    values = {name: variable_values(dash) for name, dash in dashboards.items()}
    for item in exprs:
        dash_name = item.where.split(":", 1)[0]
        query = substitute(item.expr, values.get(dash_name, {}))
        try:
            answer = prometheus_query(base_url, query)
        except OSError as err:
            problems.append(f"{item.where}: Prometheus at {base_url} did not answer: {err}")
            break
        if answer.get("status") != "success":
            problems.append(
                f"{item.where}: rejected ({answer.get('errorType')}: {answer.get('error')})\n    query: {query}"
            )
        elif answer.get("data", {}).get("result"):
            with_data += 1
    return problems, with_data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dashboards", type=Path, default=DEFAULT_DIR, help="directory of *.json (default: %(default)s)"
    )
    parser.add_argument("--prometheus", metavar="URL", help="check every expression against this Prometheus")
    parser.add_argument("--datasource-uid", default=DATASOURCE_UID, help="expected datasource uid (%(default)s)")
    args = parser.parse_args(argv)

    dashboards, problems = load_dashboards(args.dashboards)
    problems += structure_problems(dashboards, args.datasource_uid)
    exprs = [e for name, dash in dashboards.items() for e in expressions(dash, name)]
    summary = f"{len(dashboards)} dashboards, {len(exprs)} expressions"
    if args.prometheus:
        prom_problems, with_data = check_with_prometheus(exprs, dashboards, args.prometheus)
        problems += prom_problems
        summary += f", checked against {args.prometheus} ({with_data} returned data)"
    for problem in problems:
        print(f"PROBLEM {problem}")
    if problems:
        print(f"FAILED: {len(problems)} problems; {summary}")
        return 1
    print(f"OK: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
