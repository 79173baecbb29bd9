"""What a run shows a person: one line per round, per-tier fit seconds, the final accuracy.

    flowerlab-report RESULTS_DIR/RUN_ID                     # every round so far and the summary
    flowerlab-report RESULTS_DIR/RUN_ID --round 3 --json    # round 3 once recorded (for the play)

Reads the history.json the ServerApp writes after every round.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from statistics import mean


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def tier_fit_seconds(rnd: dict) -> dict[str, float]:
    """Mean fit seconds per tier in one round."""
    tiers: dict[str, list[float]] = {}
    for client in rnd["clients"].values():
        if client.get("fit-seconds") is not None:
            tiers.setdefault(client["tier"], []).append(client["fit-seconds"])
    return {tier: mean(values) for tier, values in tiers.items()}


def round_line(rnd: dict) -> str:
    """One line per round: accuracy, round and overhead seconds, fit seconds per tier (slowest first)."""
    tiers = sorted(tier_fit_seconds(rnd).items(), key=lambda kv: -kv[1])
    fits = ", ".join(f"{tier} {seconds:.1f}" for tier, seconds in tiers) or "none"
    return (
        f"round {rnd['round']}: accuracy {_pct(rnd.get('accuracy'))}, {rnd['round_seconds']:.1f} s "
        f"(overhead {rnd['overhead_seconds']:.1f} s); fit seconds per tier: {fits}"
    )


def summary(history: dict) -> list[str]:
    """Status, final accuracy, wall time, and per-tier fit seconds and throughput over the run."""
    rounds = history.get("rounds", [])
    lines = [f"run {history['run_id']}: {history.get('status', '?')}, {len(rounds)} of {history['num_rounds']} rounds"]
    if history.get("error"):
        lines.append(f"error: {history['error']}")
    if not rounds:
        return lines
    last = rounds[-1]
    lines.append(
        f"final accuracy {_pct(last.get('accuracy'))} after {last.get('elapsed_seconds', 0):.0f} s; "
        f"mean round {mean(r['round_seconds'] for r in rounds):.1f} s, "
        f"mean overhead {mean(r['overhead_seconds'] for r in rounds):.1f} s"
    )
    per_tier: dict[str, dict[str, list[float]]] = {}
    for r in rounds:
        for c in r["clients"].values():
            entry = per_tier.setdefault(c["tier"], {"fit": [], "rate": [], "cpus": []})
            if c.get("fit-seconds") is not None:
                entry["fit"].append(c["fit-seconds"])
                entry["rate"].append(c.get("samples-per-second") or 0.0)
                entry["cpus"].append(c.get("cpu-limit-cores") or 0.0)
    for tier, v in sorted(per_tier.items(), key=lambda kv: -mean(kv[1]["fit"] or [0])):
        if not v["fit"]:
            continue
        cpus = mean(v["cpus"])
        per_core = f", {mean(v['rate']) / cpus:.0f} samples/s per core of budget" if cpus else ""
        lines.append(
            f"tier {tier}: fit {mean(v['fit']):.1f} s per round (min {min(v['fit']):.1f}, max {max(v['fit']):.1f}), "
            f"{mean(v['rate']):.0f} samples/s{per_core}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flowerlab-report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="the run's results directory (RESULTS_DIR/RUN_ID)")
    parser.add_argument("--round", type=int, help="report only this round, once recorded")
    parser.add_argument("--json", action="store_true", help="print JSON (status, done, lines)")
    args = parser.parse_args(argv)
    path = args.run_dir / "history.json"
    try:
        history = json.loads(path.read_text())
    except (OSError, ValueError):
        history = None
    if history is None:
        lines, status, done = [], "unknown", False
    elif args.round is not None:
        found = [r for r in history["rounds"] if r["round"] == args.round]
        lines = [round_line(found[0])] if found else []
        status, done = history.get("status", "running"), bool(found)
    else:
        lines = [round_line(r) for r in history["rounds"]] + summary(history)
        status, done = history.get("status", "running"), history.get("status") != "running"
    if args.json:
        print(json.dumps({"status": status, "done": done, "lines": lines}))
    else:
        print("\n".join(lines) if lines else f"no history yet at {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
