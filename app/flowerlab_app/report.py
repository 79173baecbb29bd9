"""What a run shows a person: one line per round, per-tier fit seconds, the final accuracy.

    flowerlab-report RESULTS_DIR/RUN_ID                             # every round so far and the summary
    flowerlab-report RESULTS_DIR/RUN_ID --round 3 --wait 600 --json # round 3, waiting for it (the play)

Reads the history.json the ServerApp writes after every round. A run whose ServerApp died without
a word stays "running" there; the SuperLink's status, as the metrics exporter last wrote it to
runs.json beside the run directories, corrects it (and a run that a SuperLink polled after the
history was written no longer lists was lost with its state when it restarted: failed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from statistics import mean, median

from .control import lab_status

RUNS_FRESH_SECONDS = 120


def superlink_status(run_dir: Path) -> str | None:
    """The run's status as the SuperLink last reported it (runs.json of the exporter), if fresh."""
    try:
        runs = json.loads((run_dir.parent / "runs.json").read_text())
    except (OSError, ValueError):
        return None
    if time.time() - runs.get("polled_unix", 0) > RUNS_FRESH_SECONDS:
        return None
    found = [r for r in runs.get("runs", []) if str(r.get("run-id")) == run_dir.name]
    if found:
        return lab_status(found[0]["status"])
    try:  # polled after the history was written and the run is not there: a restarted SuperLink lost it
        lost = runs.get("polled_unix", 0) > (run_dir / "history.json").stat().st_mtime
    except OSError:
        lost = False
    return "failed" if lost else None


def run_status(history: dict | None, run_dir: Path) -> str:
    """The history's status, unless the SuperLink says the run ended otherwise."""
    status = (history or {}).get("status", "unknown")
    if status in ("running", "unknown"):
        linked = superlink_status(run_dir)
        if linked in ("completed", "failed", "stopped"):
            return linked
    return status


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def clients_by_tier(rounds: list[dict]) -> dict[str, list[dict]]:
    """Every client entry of these rounds that trained (has fit seconds), grouped by tier."""
    tiers: dict[str, list[dict]] = {}
    for rnd in rounds:
        for client in rnd["clients"].values():
            if client.get("fit-seconds") is not None:
                tiers.setdefault(client["tier"], []).append(client)
    return tiers


def tier_fit_seconds(rnd: dict) -> dict[str, float]:
    """Mean fit seconds per tier in one round."""
    return {tier: mean(c["fit-seconds"] for c in entries) for tier, entries in clients_by_tier([rnd]).items()}


def round_line(rnd: dict) -> str:
    """One line per round: accuracy, round and overhead seconds, fit seconds per tier (slowest first)."""
    tiers = sorted(tier_fit_seconds(rnd).items(), key=lambda kv: -kv[1])
    fits = ", ".join(f"{tier} {seconds:.1f}" for tier, seconds in tiers) or "none"
    extra = ""
    if rnd.get("idle_fraction") is not None:
        extra += f", idle {rnd['idle_fraction']:.2f}"
    if rnd.get("budget_seconds"):
        extra += f", budget {rnd['budget_seconds']:.1f} s"
    if rnd.get("deadline_seconds") is not None:
        extra += f", deadline {rnd['deadline_seconds']:.1f} s, dropped {rnd.get('dropped', 0)}"
    elif rnd.get("missing"):
        extra += f", no reply from {', '.join(rnd['missing'])}"
    if rnd.get("failed"):
        extra += f", failed: {', '.join(e['client'] for e in rnd['failed'])}"
    return (
        f"round {rnd['round']}: accuracy {_pct(rnd.get('accuracy'))}, {rnd['round_seconds']:.1f} s "
        f"(overhead {rnd['overhead_seconds']:.1f} s{extra}); fit seconds per tier: {fits}"
    )


def time_to_accuracy(history: dict, target: float) -> float | None:
    """Seconds from the run's start to the end of the first round whose accuracy reached `target`."""
    for rnd in history.get("rounds", []):
        if rnd.get("accuracy") is not None and rnd["accuracy"] >= target:
            return rnd.get("elapsed_seconds")
    return None


def mean_idle_fraction(history: dict) -> float | None:
    values = [r["idle_fraction"] for r in history.get("rounds", []) if r.get("idle_fraction") is not None]
    return mean(values) if values else None


def summary(history: dict) -> list[str]:
    """Status, final accuracy, wall time, and per-tier fit seconds (median, min, max) and throughput."""
    rounds = history.get("rounds", [])
    lines = [
        f"run {history['run_id']}: {history.get('status', '?')}, {len(rounds)} of {history['num_rounds']} rounds, "
        f"straggler policy {history.get('policy', 'static')}"
    ]
    if history.get("error"):
        lines.append(f"error: {history['error']}")
    if not rounds:
        return lines
    last = rounds[-1]
    lines.append(
        f"final accuracy {_pct(last.get('accuracy'))} after {last.get('elapsed_seconds', 0):.0f} s; "
        f"mean round {mean(r['round_seconds'] for r in rounds):.1f} s, "
        f"mean overhead {mean(r['overhead_seconds'] for r in rounds):.1f} s, "
        f"mean straggler idle fraction {_pct(mean_idle_fraction(history))}"
    )
    per_tier = clients_by_tier(rounds)
    for tier, entries in sorted(per_tier.items(), key=lambda kv: -median(c["fit-seconds"] for c in kv[1])):
        fits = [c["fit-seconds"] for c in entries]
        rates = [c.get("samples-per-second") or 0.0 for c in entries]
        cpus = mean(c.get("cpu-limit-cores") or 0.0 for c in entries)
        per_core = f", {median(rates) / cpus:.0f} samples/s per core of budget" if cpus else ""
        lines.append(
            f"tier {tier}: fit {median(fits):.1f} s per round (median; min {min(fits):.1f}, "
            f"max {max(fits):.1f}), {median(rates):.0f} samples/s{per_core}"
        )
    return lines


def read(run_dir: Path) -> tuple[dict | None, str]:
    """The run's history (None before the ServerApp wrote it) and status."""
    try:
        history = json.loads((run_dir / "history.json").read_text())
    except (OSError, ValueError):
        history = None
    return history, run_status(history, run_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flowerlab-report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="the run's results directory (RESULTS_DIR/RUN_ID)")
    parser.add_argument("--round", type=int, help="report only this round, once recorded (0: the history exists)")
    parser.add_argument("--json", action="store_true", help="print JSON (status, done, num_rounds, lines)")
    parser.add_argument(
        "--wait", type=float, default=0, metavar="SECONDS", help="wait until the round (or the run) is done"
    )
    args = parser.parse_args(argv)
    path = args.run_dir / "history.json"
    deadline = time.monotonic() + args.wait
    while True:
        history, status = read(args.run_dir)
        found = [r for r in history["rounds"] if r["round"] == args.round] if history else []
        if args.round is not None:
            done = history is not None and (args.round == 0 or bool(found))
        else:
            done = status not in ("running", "unknown")
        if done or status not in ("running", "unknown") or time.monotonic() >= deadline:
            break
        time.sleep(1)
    if history is None:
        lines = []
    elif args.round is not None:
        lines = [round_line(found[0])] if found else []
    else:
        lines = [round_line(r) for r in history["rounds"]] + summary({**history, "status": status})
    if args.json:
        num_rounds = history["num_rounds"] if history else None
        print(json.dumps({"status": status, "done": done, "num_rounds": num_rounds, "lines": lines}))
    else:
        print("\n".join(lines) if lines else f"no history yet at {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
