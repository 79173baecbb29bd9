"""Experiments: a matrix of straggler policies x training seeds, run one after another, and their report.

    flowerlab-experiment plan NAME --policies static,deadline --seeds 1,2 --config '{"num-server-rounds": 6}'
    flowerlab-experiment run NAME                 # every run of the plan not completed yet, in order
    flowerlab-experiment report NAME              # plots (PNG), report.md, report.html, summary.json

Runs inside the SuperLink container of the lab (the flwr CLI's connection, the results volume). An
experiment lives in RESULTS_DIR/experiments/NAME/: experiment.json (the plan and each run's id and
status), runs/POLICY-seedN/ (the run's history and its plots), and the report. Running an experiment
again runs only what did not complete, so an interrupted experiment resumes and a finished one is left
as it is. The seeds vary the initial model and the local shuffling (run config `training-seed`); the
data partitions stay as prepared on the hosts.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
import tomllib
from functools import partial
from pathlib import Path
from statistics import mean

from . import report
from .policy import POLICIES
from .settings import ConfigError, RunSettings

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DEFAULT_TARGET = 0.85
TIER_COLOURS = ("#d62728", "#ff7f0e", "#2ca02c", "#1f77b4", "#9467bd", "#8c564b")
POLICY_COLOURS = {"static": "#7f7f7f", "deadline": "#1f77b4", "drop-stragglers": "#d62728"}


class ExperimentError(RuntimeError):
    """A plan that cannot run, or a run that did not complete."""


def app_config(app_dir: Path) -> dict:
    """[tool.flwr.app.config] of the app: the defaults every run starts from."""
    return tomllib.loads((app_dir / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def toml_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def plan_runs(policies: list[str], seeds: list[int], config: dict, defaults: dict) -> list[dict]:
    """The runs of a matrix in running order (seed by seed, every policy), each checked as the ServerApp would."""
    unknown = [p for p in policies if p not in POLICIES]
    if unknown or not policies:
        raise ExperimentError(f"policies: {', '.join(unknown) or 'none given'}; allowed: {', '.join(POLICIES)}")
    if not seeds or any(s < 1 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ExperimentError(f"seeds: {seeds}; expected distinct integers >= 1")
    if len(set(policies)) != len(policies):
        raise ExperimentError(f"policies: {policies}; each at most once")
    unknown_keys = sorted(set(config) - set(defaults))
    if unknown_keys:
        raise ExperimentError(f"run config: unknown key(s) {', '.join(unknown_keys)}; allowed: {', '.join(defaults)}")
    runs = []
    for seed in seeds:
        for name in policies:
            run_config = {**config, "straggler-policy": name, "training-seed": seed}
            try:
                RunSettings.from_run_config({**defaults, **run_config})
            except ConfigError as err:
                raise ExperimentError(f"{name}, seed {seed}: {err}") from err
            runs.append({"key": f"{name}-seed{seed}", "policy": name, "seed": seed, "config": run_config})
    return runs


def experiment_dir(results: Path, name: str) -> Path:
    if not NAME.match(name):
        raise ExperimentError(f"experiment name {name!r}: use letters, digits, '.', '_' and '-' (at most 64)")
    return results / "experiments" / name


def load(directory: Path) -> dict:
    try:
        return json.loads((directory / "experiment.json").read_text())
    except FileNotFoundError:
        raise ExperimentError(f"no experiment at {directory}: run `flowerlab-experiment plan` first") from None


def save(directory: Path, experiment: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "experiment.json.tmp"
    tmp.write_text(json.dumps(experiment, indent=2) + "\n")
    tmp.replace(directory / "experiment.json")


def plan(directory: Path, runs: list[dict], target: float) -> tuple[dict, bool]:
    """Write the plan, or keep the existing one when it is the same; (experiment, whether it was written)."""
    if not 0 < target <= 1:
        raise ExperimentError(f"target accuracy {target}; expected 0 < target <= 1")
    wanted = {"name": directory.name, "target": target, "runs": runs}
    if (directory / "experiment.json").exists():
        existing = load(directory)
        same = (
            existing["target"] == target
            and [{k: r[k] for k in ("key", "policy", "seed", "config")} for r in existing["runs"]] == runs
        )
        if not same:
            raise ExperimentError(
                f"experiment {directory.name} exists at {directory} with another plan; "
                "choose another name or remove that directory"
            )
        return existing, False
    save(directory, wanted)
    return wanted, True


def flwr(args: list[str]) -> dict:
    done = subprocess.run(["flwr", *args, "--format", "json"], capture_output=True, text=True, check=False)
    try:
        answer = json.loads(done.stdout)
    except ValueError:
        answer = {}
    if done.returncode != 0 or not answer.get("success", False):
        raise ExperimentError(f"flwr {' '.join(args)} failed: {done.stdout.strip()} {done.stderr.strip()}")
    return answer


def run_one(run: dict, app_dir: Path, connection: str, results: Path, timeout: float, out=print) -> dict:
    """Start one run with its config, print its rounds as they complete, wait until it ends."""
    overrides = [arg for key, value in sorted(run["config"].items()) for arg in ("-c", f"{key}={toml_value(value)}")]
    run_id = str(flwr(["run", str(app_dir), connection, *overrides])["run-id"])
    out(f"{run['key']}: run {run_id} started")
    deadline = time.monotonic() + timeout
    printed = 0
    status = "pending"
    while time.monotonic() < deadline:
        history, status = report.read(results / run_id)
        rounds = history["rounds"] if history else []
        for rnd in rounds[printed:]:
            out(f"{run['key']}: {report.round_line(rnd)}")
        printed = len(rounds)
        if status in ("completed", "failed", "stopped"):
            break
        listed = flwr(["ls", connection, "--run-id", run_id]).get("runs", [])
        if listed and listed[0]["status"].startswith("finished"):
            time.sleep(1)  # the history's last write
            history, status = report.read(results / run_id)
            status = status if status != "running" else listed[0]["status"].split(":", 1)[1]
            break
        time.sleep(3)
    else:
        status = "timeout"
    return {"run_id": run_id, "status": status}


def run_all(
    directory: Path, app_dir: Path, connection: str, results: Path, timeout: float, out=print, only: str | None = None
) -> dict:
    """Run every run of the plan (or only the one named `only`) that has not completed; copy each history in."""
    experiment = load(directory)
    keys = [r["key"] for r in experiment["runs"]]
    if only is not None and only not in keys:
        raise ExperimentError(f"experiment {experiment['name']} has no run {only!r}; its runs: {', '.join(keys)}")
    for run in experiment["runs"]:
        if only is not None and run["key"] != only:
            continue
        if run.get("status") == "completed":
            out(f"{run['key']}: completed before (run {run['run_id']}), kept")
            continue
        run.update(run_one(run, app_dir, connection, results, timeout, out))
        save(directory, experiment)
        source, target = results / run["run_id"], directory / "runs" / run["key"]
        target.mkdir(parents=True, exist_ok=True)
        for name in ("history.json", "history.csv"):
            if (source / name).exists():
                shutil.copy2(source / name, target / name)
        history, _ = report.read(target)
        final = history["rounds"][-1]["accuracy"] if history and history["rounds"] else None
        reached = report.time_to_accuracy(history or {}, experiment["target"])
        out(
            f"{run['key']}: run {run['run_id']} {run['status']}, final accuracy {report._pct(final)}, "
            f"{experiment['target']} reached " + (f"after {reached:.0f} s" if reached is not None else "never")
        )
    failed = [r["key"] for r in experiment["runs"] if r.get("status") != "completed" and only in (None, r["key"])]
    if failed:
        raise ExperimentError(f"runs not completed: {', '.join(failed)} (see flwr log RUN_ID)")
    return experiment


# ---------------------------------------------------------------- the report


def run_row(history: dict, target: float) -> dict:
    rounds = history.get("rounds", [])
    return {
        "time_to_target": report.time_to_accuracy(history, target),
        "final_accuracy": rounds[-1]["accuracy"] if rounds else None,
        "mean_round_seconds": mean(r["round_seconds"] for r in rounds) if rounds else None,
        "idle_fraction": report.mean_idle_fraction(history),
        "dropped": sum(r.get("dropped", 0) for r in rounds),
        "steps": {
            name: [r["clients"].get(name, {}).get("steps") for r in rounds]
            for name in sorted({n for r in rounds for n in r["clients"]})
        },
        "rounds": len(rounds),
        "elapsed_seconds": rounds[-1].get("elapsed_seconds") if rounds else None,
    }


def spread(values: list[float | None]) -> dict:
    """Mean, min and max of the values that exist; `missing` counts the others."""
    present = [v for v in values if v is not None]
    if not present:
        return {"mean": None, "min": None, "max": None, "missing": len(values)}
    return {"mean": mean(present), "min": min(present), "max": max(present), "missing": len(values) - len(present)}


def compare(experiment: dict, histories: dict[str, dict]) -> dict:
    """Per policy: each measure's mean and spread over the seeds; the speed-up of every policy against static."""
    target = experiment["target"]
    rows = {key: run_row(h, target) for key, h in histories.items()}
    policies: dict[str, dict] = {}
    for run in experiment["runs"]:
        if run["key"] not in rows:
            continue
        policies.setdefault(run["policy"], []).append(rows[run["key"]])
    table = {}
    for name, entries in policies.items():
        table[name] = {
            "seeds": len(entries),
            **{
                measure: spread([e[measure] for e in entries])
                for measure in ("time_to_target", "final_accuracy", "mean_round_seconds", "idle_fraction", "dropped")
            },
        }
    base = table.get("static", {}).get("time_to_target", {}).get("mean")
    for entry in table.values():
        mine = entry["time_to_target"]["mean"]
        entry["speedup_vs_static"] = base / mine if base and mine and not entry["time_to_target"]["missing"] else None
    return {"target": target, "policies": table, "runs": rows}


def _fmt(entry: dict, digits: int = 1, unit: str = "") -> str:
    if entry["mean"] is None:
        return "not reached" if entry.get("missing") else "n/a"
    text = f"{entry['mean']:.{digits}f}{unit}"
    if entry["max"] != entry["min"]:
        text += f" ({entry['min']:.{digits}f}–{entry['max']:.{digits}f})"
    if entry["missing"]:
        text += f", {entry['missing']} never"
    return text


def table_lines(comparison: dict) -> list[str]:
    """The comparison as a Markdown table: one row per policy, mean (min–max over seeds)."""
    target = comparison["target"]
    lines = [
        f"| policy | seeds | time to {target} accuracy (s) | speed-up vs static | final accuracy "
        "| mean round (s) | straggler idle fraction | dropped replies |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, e in comparison["policies"].items():
        speedup = f"{e['speedup_vs_static']:.2f}x" if e["speedup_vs_static"] else "n/a"
        lines.append(
            f"| {name} | {e['seeds']} | {_fmt(e['time_to_target'], 0)} | {speedup} | {_fmt(e['final_accuracy'], 3)} "
            f"| {_fmt(e['mean_round_seconds'])} | {_fmt(e['idle_fraction'], 3)} | {_fmt(e['dropped'], 0)} |"
        )
    return lines


def plot_run(history: dict, directory: Path) -> list[str]:
    """Accuracy against wall time, fit seconds per client and round (coloured by tier), idle seconds per client."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = history.get("rounds", [])
    clients = sorted({n for r in rounds for n in r["clients"]})
    tiers = sorted({r["clients"][n]["tier"] for r in rounds for n in r["clients"]})
    colour = {t: TIER_COLOURS[i % len(TIER_COLOURS)] for i, t in enumerate(tiers)}
    tier_of = {n: r["clients"][n]["tier"] for r in rounds for n in r["clients"]}
    title = f"{history.get('policy', 'static')} run {history['run_id']}"
    files = []

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([0] + [r["elapsed_seconds"] for r in rounds], [0] + [r["accuracy"] or 0 for r in rounds], marker="o")
    ax.set(xlabel="seconds since the run started", ylabel="accuracy", ylim=(0, 1))
    ax.set_title(f"{title}: accuracy", fontsize=10)
    ax.grid(alpha=0.3)
    files.append(_save(fig, directory / "accuracy.png"))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name in clients:
        points = [(r["round"], r["clients"][name]["fit-seconds"]) for r in rounds if name in r["clients"]]
        ax.plot(*zip(*points, strict=True), marker="o", color=colour[tier_of[name]], label=f"{name} ({tier_of[name]})")
    late = [(r["round"], e) for r in rounds for e in r.get("late", []) if e.get("fit-seconds") is not None]
    for i, (rnd, entry) in enumerate(late):
        ax.scatter(rnd, entry["fit-seconds"], marker="x", color=colour.get(entry["tier"], "black"),
                   label="late reply (discarded)" if i == 0 else None)  # fmt: skip
    ax.set(xlabel="round", ylabel="fit seconds")
    ax.set_title(f"{title}: fit seconds per client", fontsize=10)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    files.append(_save(fig, directory / "fit_seconds.png"))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / max(len(clients), 1)
    for i, name in enumerate(clients):
        points = [(r["round"], r["clients"][name].get("idle-seconds", 0.0)) for r in rounds if name in r["clients"]]
        xs, ys = zip(*points, strict=True) if points else ((), ())
        ax.bar([x + (i - (len(clients) - 1) / 2) * width for x in xs], ys, width, color=colour[tier_of[name]],
               label=f"{name} ({tier_of[name]})")  # fmt: skip
    ax.set(xlabel="round", ylabel="seconds waiting for the slowest")
    ax.set_title(f"{title}: idle seconds per client", fontsize=10)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3, axis="y")
    files.append(_save(fig, directory / "idle_seconds.png"))
    return files


def plot_comparison(experiment: dict, histories: dict[str, dict], directory: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    styles = ("-", "--", ":", "-.")
    seeds = sorted({r["seed"] for r in experiment["runs"]})
    for run in experiment["runs"]:
        history = histories.get(run["key"])
        if not history:
            continue
        rounds = history["rounds"]
        ax.plot(
            [0] + [r["elapsed_seconds"] for r in rounds],
            [0] + [r["accuracy"] or 0 for r in rounds],
            marker="o",
            markersize=3,
            color=POLICY_COLOURS.get(run["policy"]),
            linestyle=styles[seeds.index(run["seed"]) % len(styles)],
            label=run["key"],
        )
    ax.axhline(experiment["target"], color="black", linewidth=0.8, linestyle=":")
    ax.set(xlabel="seconds since the run started", ylabel="accuracy", ylim=(0, 1),
           title=f"experiment {experiment['name']}: accuracy against wall time")  # fmt: skip
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, directory / "accuracy_vs_time.png")


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


def build_report(directory: Path) -> dict:
    """Plots per run and for the experiment, report.md, report.html and summary.json; returns the comparison."""
    experiment = load(directory)
    histories = {}
    for run in experiment["runs"]:
        history, _ = report.read(directory / "runs" / run["key"])
        if history and history.get("rounds"):
            histories[run["key"]] = history
            plot_run(history, directory / "runs" / run["key"])
    if not histories:
        raise ExperimentError(f"no run of experiment {experiment['name']} has a history yet: run it first")
    comparison = compare(experiment, histories)
    overview = plot_comparison(experiment, histories, directory)
    md = [
        f"# Experiment {experiment['name']}",
        "",
        f"Straggler policies compared on the same lab, one run after another. Target accuracy {experiment['target']}"
        " on the central test split. Each figure is the mean over the seeds, with the range in parentheses.",
        "Straggler idle fraction: per round, the sum over clients of (slowest fit - own fit) divided by"
        " (clients x round seconds), averaged over the rounds.",
        "",
        *table_lines(comparison),
        "",
        f"![accuracy against wall time]({overview})",
        "",
        "## Runs",
        "",
        "| run | run id | status | time to target (s) | final accuracy | mean round (s) | idle fraction "
        "| steps per client and round |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in experiment["runs"]:
        row = comparison["runs"].get(run["key"])
        if row is None:
            md.append(f"| {run['key']} | {run.get('run_id', '-')} | {run.get('status', 'not run')} | | | | | |")
            continue
        steps = "; ".join(f"{n}: {', '.join('-' if s is None else str(s) for s in v)}" for n, v in row["steps"].items())
        ttt = f"{row['time_to_target']:.0f}" if row["time_to_target"] is not None else "not reached"
        md.append(
            f"| {run['key']} | {run.get('run_id', '-')} | {run.get('status', '?')} | {ttt} "
            f"| {report._pct(row['final_accuracy'])} | {row['mean_round_seconds']:.1f} "
            f"| {report._pct(row['idle_fraction'])} | {steps} |"
        )
    for run in experiment["runs"]:
        if run["key"] in histories:
            md += [
                "",
                f"### {run['key']} (run {run.get('run_id')})",
                "",
                *(f"    {line}" for line in [*map(report.round_line, histories[run["key"]]["rounds"])]),
                "",
                f"![accuracy](runs/{run['key']}/accuracy.png) ![fit seconds](runs/{run['key']}/fit_seconds.png) "
                f"![idle seconds](runs/{run['key']}/idle_seconds.png)",
            ]
    (directory / "report.md").write_text("\n".join(md) + "\n")
    (directory / "report.html").write_text(markdown_to_html(md, experiment["name"]))
    (directory / "summary.json").write_text(json.dumps(comparison, indent=2) + "\n")
    return comparison


def markdown_to_html(lines: list[str], name: str) -> str:
    """The report's Markdown (headings, tables, images, indented lines) as one self-contained HTML page."""
    import html

    out = [
        "<!doctype html>",
        f"<html><head><meta charset='utf-8'><title>Experiment {html.escape(name)}</title>",
        "<style>body{font-family:sans-serif;max-width:75em;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.3em .6em}pre{background:#f6f6f6;padding:.5em}</style></head><body>",
    ]
    table = False
    pre: list[str] = []
    for line in lines:
        if line.startswith("    "):
            pre.append(html.escape(line[4:]))
            continue
        if pre:
            out.append("<pre>" + "\n".join(pre) + "</pre>")
            pre = []
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= {"-"}:
                continue
            tag = "td" if table else "th"
            row = "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells)
            out.append(("" if table else "<table>") + "<tr>" + row)
            table = True
            continue
        if table:
            out.append("</table>")
            table = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{html.escape(line[level:].strip())}</h{level}>")
        elif line.startswith("!["):
            for alt, src in re.findall(r"!\[([^\]]*)\]\(([^)]*)\)", line):
                out.append(f"<img src='{html.escape(src)}' alt='{html.escape(alt)}'>")
        elif line:
            out.append(f"<p>{html.escape(line)}</p>")
    if pre:
        out.append("<pre>" + "\n".join(pre) + "</pre>")
    if table:
        out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def summary_lines(comparison: dict) -> list[str]:
    """What the runner prints: one line per policy and the side-by-side figures."""
    lines = []
    target = comparison["target"]
    for name, e in comparison["policies"].items():
        reached = e["time_to_target"]
        when = f"after {_fmt(reached, 0, ' s')}" if reached["mean"] is not None else "not reached"
        line = (
            f"{name}: {target} accuracy {when}, final accuracy "
            f"{_fmt(e['final_accuracy'], 3)}, mean round {_fmt(e['mean_round_seconds'], 1, ' s')}, "
            f"straggler idle fraction {_fmt(e['idle_fraction'], 3)}"
        )
        if name != "static" and e["speedup_vs_static"]:
            line += f"; {e['speedup_vs_static']:.2f}x sooner than static"
        if name == "drop-stragglers":
            line += f"; dropped replies {_fmt(e['dropped'], 0)}"
        lines.append(line)
    return lines


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flowerlab-experiment", description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=None, help="results directory (default: the run config's)")
    parser.add_argument("--app", type=Path, default=Path("/app"), help="the Flower App directory (default /app)")
    parser.add_argument("--connection", default="lab", help="flwr connection name (default lab)")
    parser.add_argument("--json", action="store_true", help="print the outcome as one JSON object")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="write (or check) the experiment's plan; runs nothing")
    p.add_argument("name")
    p.add_argument("--policies", default="static,deadline", help=f"comma-separated, of: {', '.join(POLICIES)}")
    p.add_argument("--seeds", type=_ints, default=[1, 2], help="comma-separated training seeds (default 1,2)")
    p.add_argument("--config", default="{}", help="run config overrides for every run, as JSON")
    p.add_argument("--target", type=float, default=DEFAULT_TARGET, help=f"target accuracy (default {DEFAULT_TARGET})")
    r = sub.add_parser("run", help="run what did not complete, one run after another")
    r.add_argument("name")
    r.add_argument("--timeout", type=float, default=3600, help="seconds to wait for one run (default 3600)")
    r.add_argument("--only", metavar="KEY", help="run only this run of the plan (POLICY-seedN)")
    s = sub.add_parser("report", help="plots, report.md, report.html and summary.json")
    s.add_argument("name")
    args = parser.parse_args(argv)

    defaults = app_config(args.app) if (args.app / "pyproject.toml").exists() else {}
    results = args.results or RunSettings.from_run_config(defaults).results_root()
    try:
        directory = experiment_dir(results, args.name)
        if args.command == "plan":
            try:
                config = json.loads(args.config)
            except ValueError as err:
                raise ExperimentError(f"--config is not JSON: {err}") from None
            runs = plan_runs([p for p in args.policies.split(",") if p], args.seeds, config, defaults)
            experiment, written = plan(directory, runs, args.target)
            outcome = {"directory": str(directory), "written": written, "runs": [r["key"] for r in experiment["runs"]]}
            print(json.dumps(outcome) if args.json else f"experiment {args.name}: {len(runs)} runs in {directory}")
        elif args.command == "run":
            out = partial(print, flush=True)
            run_all(directory, args.app, args.connection, results, args.timeout, out=out, only=args.only)
        else:
            comparison = build_report(directory)
            lines = summary_lines(comparison)
            if args.json:
                print(json.dumps({"directory": str(directory), "lines": lines, "comparison": comparison}))
            else:
                print("\n".join([*lines, f"report: {directory / 'report.md'} ({directory / 'report.html'})"]))
    except ExperimentError as err:
        print(f"flowerlab-experiment: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
