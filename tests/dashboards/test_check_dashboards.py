"""Tests of the dashboard checker, and every dashboard expression against a real Prometheus."""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import check_dashboards as cd
import pytest

PROMETHEUS_BIN = os.environ.get("PROMETHEUS_BIN", "/usr/bin/prometheus")
DS = {"type": "prometheus", "uid": cd.DATASOURCE_UID}


def make_dashboard(uid: str = "d1", exprs: tuple[str, ...] = ('up{host=~"$host"}',)) -> dict:
    return {
        "uid": uid,
        "title": f"Dashboard {uid}",
        "schemaVersion": 41,
        "templating": {
            "list": [
                {
                    "name": "host",
                    "type": "query",
                    "datasource": DS,
                    "query": {"qryType": 1, "query": "label_values(up, host)", "refId": "V"},
                    "multi": True,
                    "includeAll": True,
                }
            ]
        },
        "panels": [
            {"type": "row", "id": 1, "title": "Row", "panels": []},
            {
                "type": "timeseries",
                "id": 2,
                "title": "Panel",
                "datasource": DS,
                "targets": [
                    {"refId": chr(ord("A") + i), "datasource": DS, "expr": e, "legendFormat": "{{host}}"}
                    for i, e in enumerate(exprs)
                ],
            },
        ],
    }


# ------------------------------------------------------------------------------------------------ substitution


def test_builtin_intervals_are_substituted():
    expr = "rate(x[$__rate_interval]) + rate(y[$__interval]) + increase(z[$__range]) + ${__range_s}"
    assert cd.substitute(expr, {}) == "rate(x[1m]) + rate(y[1m]) + increase(z[1m]) + 60"


def test_multi_value_variables_become_match_all_regex():
    values = cd.variable_values(make_dashboard())
    assert values == {"host": ".*"}
    assert cd.substitute('up{host=~"$host", job=~"${host:regex}"}', values) == 'up{host=~".*", job=~".*"}'
    assert cd.substitute('up{host=~"[[host]]"}', values) == 'up{host=~".*"}'


def test_custom_and_interval_variables_take_their_current_value():
    dash = {
        "templating": {
            "list": [
                {"name": "step", "type": "interval", "current": {"value": "5m"}},
                {"name": "quantile", "type": "custom", "query": "0.5,0.9", "current": {}},
                {"name": "auto", "type": "interval", "current": {"value": "$__auto"}},
            ]
        }
    }
    assert cd.variable_values(dash) == {"step": "5m", "quantile": "0.5", "auto": "1m"}


def test_label_replace_references_are_not_variables():
    expr = 'label_replace(up, "h", "$1", "instance", "(.*):.*")'
    assert cd.variable_refs(expr) == set()
    assert cd.substitute(expr, {"host": ".*"}) == expr


def test_unknown_variables_are_left_alone():
    assert cd.substitute('up{x=~"$nope"}', {}) == 'up{x=~"$nope"}'


# ------------------------------------------------------------------------------------------------ extraction


@pytest.mark.parametrize(
    ("query", "promql"),
    [
        ("label_values(up, host)", "up"),
        (
            'label_values(node_load1{job="node-exporter", host=~"$host"}, host)',
            'node_load1{job="node-exporter", host=~"$host"}',
        ),
        ("label_values(host)", '{host!=""}'),
        ("label_names(up)", "up"),
        ("metrics(node_.*)", '{__name__=~"node_.*"}'),
        ("query_result(topk(3, up))", "topk(3, up)"),
        ("sum(up)", "sum(up)"),
        ("", None),
    ],
)
def test_variable_queries_become_promql(query, promql):
    assert cd.variable_promql(query) == promql


def test_expressions_come_from_variables_and_targets_including_nested_rows():
    dash = make_dashboard(exprs=("up", "sum(up)"))
    dash["panels"][0]["panels"] = [
        {
            "type": "stat",
            "id": 3,
            "title": "Nested",
            "datasource": DS,
            "targets": [{"refId": "A", "expr": "node_load1"}],
        }
    ]
    found = cd.expressions(dash, "x.json")
    assert [e.expr for e in found] == ["up", "node_load1", "up", "sum(up)"]
    assert found[0].where == "x.json: variable $host"
    assert found[1].where == "x.json: panel 3 'Nested' target A"


def test_variable_query_string_form_is_read():
    assert cd.variable_query_text({"query": "label_values(up, job)"}) == "label_values(up, job)"
    assert cd.variable_query_text({"query": {"query": "label_values(up, job)"}}) == "label_values(up, job)"
    assert cd.variable_query_text({"definition": "label_values(up, job)"}) == "label_values(up, job)"


# ------------------------------------------------------------------------------------------------ structure


def test_a_good_dashboard_has_no_problems():
    assert cd.structure_problems({"a.json": make_dashboard()}) == []


def test_duplicate_dashboard_uids_are_caught():
    problems = cd.structure_problems({"a.json": make_dashboard("same"), "b.json": make_dashboard("same")})
    assert problems == ["b.json: dashboard uid 'same' also used by a.json"]


def test_duplicate_panel_ids_are_caught_across_rows():
    dash = make_dashboard()
    dash["panels"][0]["panels"] = [{"type": "text", "id": 2, "title": "Nested"}]
    assert cd.structure_problems({"a.json": dash}) == ["a.json: panel id 2 used by 'Nested' and 'Panel'"]


def test_wrong_datasource_uid_is_caught_on_panels_targets_and_variables():
    dash = make_dashboard()
    dash["panels"][1]["datasource"] = {"type": "prometheus", "uid": "other"}
    dash["panels"][1]["targets"][0]["datasource"] = {"uid": "other"}
    dash["templating"]["list"][0]["datasource"] = "other"
    problems = cd.structure_problems({"a.json": dash})
    assert "a.json: variable $host does not use datasource uid flowerlab-prometheus" in problems
    assert "a.json: panel 2 'Panel' does not use datasource uid flowerlab-prometheus" in problems
    assert "a.json: panel 2 'Panel' target A does not use datasource uid flowerlab-prometheus" in problems


def test_undefined_variables_are_caught():
    dash = make_dashboard(exprs=('up{client=~"$client"}', "rate(x[$__rate_interval])"))
    dash["templating"]["list"][0]["query"]["query"] = 'label_values(up{tier=~"${tier}"}, host)'
    problems = cd.structure_problems({"a.json": dash})
    assert problems == [
        "a.json: variable $host references undefined variable $tier",
        "a.json: panel 2 'Panel' target A references undefined variable $client",
    ]


def test_missing_uid_schema_refid_and_expression_are_caught():
    dash = make_dashboard(exprs=("up", " "))
    del dash["uid"]
    dash["schemaVersion"] = 16
    dash["panels"][1]["targets"][1]["refId"] = "A"
    problems = cd.structure_problems({"a.json": dash})
    assert "a.json: no dashboard uid" in problems
    assert any(p.startswith("a.json: schemaVersion 16 is not Grafana 11's") for p in problems)
    assert "a.json: panel 2 'Panel' has refId A more than once" in problems
    assert "a.json: panel 2 'Panel' target A has no expression" in problems


def test_unparsable_and_missing_files_are_reported(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    dashboards, problems = cd.load_dashboards(tmp_path)
    assert dashboards == {}
    assert problems[0].startswith("bad.json: does not parse")
    assert cd.load_dashboards(tmp_path / "empty")[1] == [f"{tmp_path / 'empty'}: no dashboards (*.json)"]


def test_the_lab_dashboards_are_well_formed():
    dashboards, problems = cd.load_dashboards(cd.DEFAULT_DIR)
    assert problems == []
    assert cd.structure_problems(dashboards) == []
    titles = {d["title"] for d in dashboards.values()}
    assert titles == {"Flower lab — overview", "Flower lab — containers", "Flower lab — hosts"}
    for name, dash in dashboards.items():
        variables = {v["name"]: v for v in dash["templating"]["list"]}
        assert "host" in variables, name
        for var in variables.values():
            assert var["type"] == "query" and var["multi"] and var["includeAll"], (name, var["name"])
            assert var["query"]["query"].startswith("label_values("), (name, var["name"])
        used = {ref for e in cd.expressions(dash, name) for ref in cd.variable_refs(e.expr)}
        assert set(variables) <= used, f"{name}: variables never used in an expression"


def test_cli_exit_status(tmp_path, capsys):
    good = tmp_path / "good"
    good.mkdir()
    (good / "a.json").write_text(json.dumps(make_dashboard()))
    assert cd.main(["--dashboards", str(good)]) == 0
    assert "OK: 1 dashboards, 2 expressions" in capsys.readouterr().out
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.json").write_text(json.dumps(make_dashboard("x")))
    (bad / "b.json").write_text(json.dumps(make_dashboard("x")))
    assert cd.main(["--dashboards", str(bad)]) == 1
    assert "PROBLEM b.json: dashboard uid 'x' also used by a.json" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ real Prometheus

# Series shaped like the lab's targets (docs/design.md, metric conventions), served to a real Prometheus
# so that expressions are not only parsed but evaluated with data (label matching of binary operators).
CLIENT = 'client="{c}",tier="{t}",host="edge-{h}"'
APP_METRICS = "\n".join(
    [
        "model_accuracy 0.5",
        "model_loss 1.2",
        "flowerlab_central_accuracy 0.4",
        "flowerlab_central_loss 1.4",
        "flowerlab_round 2",
        "flowerlab_rounds_total 5",
        "flowerlab_round_duration_seconds 30",
        "flowerlab_round_overhead_seconds 4",
        "flowerlab_run_active 1",
        "flowerlab_nodes_connected 2",
        'flowerlab_run_info{run_id="123",policy="deadline"} 1',
        "flowerlab_round_idle_fraction 0.05",
        "flowerlab_round_budget_seconds 12.5",
        "flowerlab_dropped_replies 0",
        'flowerlab_run_status{run_id="123",status="running"} 1',
        'flowerlab_run_status{run_id="123",status="failed"} 0',
    ]
    + [
        f"{metric}{{{CLIENT.format(c=c, t=t, h=h)}}} {value}"
        for c, t, h in (("client-a", "iot", "a"), ("client-b", "phone", "b"))
        for metric, value in (
            ("flowerlab_client_fit_seconds", 20),
            ("flowerlab_client_samples_per_second", 100),
            ("flowerlab_client_examples", 2000),
            ("flowerlab_client_train_loss", 1.1),
            ("flowerlab_client_train_accuracy", 0.6),
            ("flowerlab_client_cpu_limit_cores", 0.5),
            ("flowerlab_client_memory_limit_bytes", 2e9),
            ("flowerlab_client_memory_peak_bytes", 1e9),
            ("flowerlab_client_cpu_seconds", 9),
            ("flowerlab_client_batch_size", 32),
            ("flowerlab_client_idle_seconds", 1.5),
            ("flowerlab_client_samples_trained", 416),
        )
    ]
)
CONTAINER = (
    'id="/docker/{n}",name="flowerlab-{n}",image="img",container_label_org_flowerlab_lab="flowerlab",'
    'container_label_org_flowerlab_component="{comp}",container_label_org_flowerlab_client="{c}",'
    'container_label_org_flowerlab_tier="{t}",container_label_org_flowerlab_host="{h}"'
)
CADVISOR_METRICS = "\n".join(
    f"{metric}{{{CONTAINER.format(n=n, comp=comp, c=c, t=t, h=h)}{extra}}} {value}"
    for n, comp, c, t, h in (
        ("supernode-client-a", "supernode", "client-a", "iot", "h"),
        ("supernode-client-b", "supernode", "client-b", "phone", "h"),
        ("prometheus", "prometheus", "", "", ""),
    )
    for metric, extra, value in (
        ("container_cpu_usage_seconds_total", ',cpu="total"', 100),
        ("container_memory_working_set_bytes", "", 5e8),
        ("container_spec_memory_limit_bytes", "", 2e9),
        ("container_spec_cpu_quota", "", 50000),
        ("container_spec_cpu_period", "", 100000),
        ("container_network_receive_bytes_total", ',interface="eth0"', 1000),
        ("container_network_transmit_bytes_total", ',interface="eth0"', 1000),
        ("container_oom_events_total", "", 0),
        ("container_last_seen", "", 1.7e9),
    )
)
NODE_METRICS = "\n".join(
    [
        f'node_cpu_seconds_total{{cpu="{cpu}",mode="{mode}"}} 100'
        for cpu in ("0", "1")
        for mode in ("idle", "user", "system")
    ]
    + [
        "node_memory_MemTotal_bytes 8e9",
        "node_memory_MemAvailable_bytes 6e9",
        "node_load1 0.5",
        "node_load5 0.4",
        "node_load15 0.3",
    ]
    + [
        f'node_network_{d}_bytes_total{{device="{dev}"}} 1000'
        for d in ("receive", "transmit")
        for dev in ("eth0", "lo")
    ]
)
SERIES = {"/app": APP_METRICS, "/cadvisor": CADVISOR_METRICS, "/node": NODE_METRICS}


class FakeTargets(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server API
        body = SERIES.get(self.path, "").encode() + b"\n"
        self.send_response(200 if self.path in SERIES else 404)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    """A real Prometheus (Debian's binary) on a free loopback port, scraping fake lab targets."""
    assert shutil.which(PROMETHEUS_BIN) or Path(PROMETHEUS_BIN).is_file(), (
        f"{PROMETHEUS_BIN} not found: install Debian's prometheus package (tests/setup.sh does)"
    )
    targets = ThreadingHTTPServer(("127.0.0.1", 0), FakeTargets)
    threading.Thread(target=targets.serve_forever, daemon=True).start()
    target = f"127.0.0.1:{targets.server_address[1]}"
    jobs = (("flower-serverapp", "/app", True), ("cadvisor", "/cadvisor", False), ("node-exporter", "/node", False))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": job,
                "metrics_path": path,
                "honor_labels": honor,
                "static_configs": [{"targets": [target], "labels": {"host": "lab-server"}}],
            }
            for job, path, honor in jobs
        ],
    }
    work = tmp_path_factory.mktemp("prometheus")
    (work / "prometheus.yml").write_text(json.dumps(config))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(work / "prometheus.log", "wb")  # noqa: SIM115 - closed in the teardown below
    proc = subprocess.Popen(
        [
            PROMETHEUS_BIN,
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (work / "prometheus.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "Prometheus did not become ready in 60 s"
            time.sleep(0.3)
        # Wait until every job was scraped at least three times (rate() needs two samples).
        while True:
            answer = get_json(f"{url}/api/v1/query?query=count_over_time(up[1m])")
            counts = [float(r["value"][1]) for r in answer["data"]["result"]]
            if len(counts) == len(jobs) and min(counts) >= 3:
                break
            assert time.monotonic() < deadline, f"targets not scraped: {answer}"
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        targets.shutdown()


def test_prometheus_rejects_a_broken_expression(prometheus):
    dashboards = {"a.json": make_dashboard(exprs=("sum(up", 'up{host=~"$host"}'))}
    exprs = cd.expressions(dashboards["a.json"], "a.json")
    problems, with_data = cd.check_with_prometheus(exprs, dashboards, prometheus)
    assert len(problems) == 1
    assert problems[0].startswith("a.json: panel 2 'Panel' target A: rejected (bad_data:")
    assert with_data == 2


def test_prometheus_rejects_a_many_to_many_match(prometheus):
    bad = copy.deepcopy(make_dashboard(exprs=("node_cpu_seconds_total / on (host) node_load1",)))
    problems, _ = cd.check_with_prometheus(cd.expressions(bad, "a.json"), {"a.json": bad}, prometheus)
    assert len(problems) == 1 and "rejected (execution:" in problems[0]


def test_every_dashboard_expression_is_accepted_by_prometheus(prometheus, capsys):
    assert cd.main(["--prometheus", prometheus]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK: 3 dashboards")
    # Nearly every expression found the fake series: they were evaluated, not only parsed.
    dashboards, _ = cd.load_dashboards(cd.DEFAULT_DIR)
    exprs = [e for name, dash in dashboards.items() for e in cd.expressions(dash, name)]
    problems, with_data = cd.check_with_prometheus(exprs, dashboards, prometheus)
    assert problems == []
    assert with_data == len(exprs), f"{len(exprs) - with_data} expressions returned no data"
