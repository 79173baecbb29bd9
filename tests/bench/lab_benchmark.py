"""Benchmark of the deployed local lab: what a round costs besides training, whether the tiers show,
how fast the model learns, and how much memory each tier's client needs.

    .venv/bin/python tests/bench/lab_benchmark.py                 # one warm run on inventory/local
    .venv/bin/python tests/bench/lab_benchmark.py --cold          # and, side by side, one with every
                                                                  # ClientApp training in its own process
    .venv/bin/python tests/bench/lab_benchmark.py --soak 5        # N runs in a row: how many completed
    .venv/bin/python tests/bench/lab_benchmark.py --memory 1536m,1g,768m   # one round per limit on client-a

Needs a lab brought up with `ansible-playbook site.yml -i inventory/local`; every run is started with
that playbook (`flower_run_policy=always`), so it measures exactly what a user gets. Prints figures;
asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean, pstdev

from flowerlab_app.report import clients_by_tier

ROOT = Path(__file__).resolve().parents[2]
INVENTORY = ROOT / "inventory" / "local"
SUPERLINK = "flowerlab-superlink"
TARGET = 0.85


def site(*extra: str, inventory: Path = INVENTORY) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).parent / "ansible-playbook"), "site.yml", "-i", str(inventory), *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def runs() -> list[dict]:
    out = subprocess.run(
        ["docker", "exec", SUPERLINK, "flwr", "ls", "lab", "--format", "json"], capture_output=True, text=True
    ).stdout
    return json.loads(out)["runs"]


def history(run_id: str) -> dict:
    out = subprocess.run(
        ["docker", "exec", SUPERLINK, "cat", f"/results/{run_id}/history.json"], capture_output=True, text=True
    ).stdout
    return json.loads(out)


def one_run(*extra: str, inventory: Path = INVENTORY) -> tuple[str, dict | None]:
    """Start one run with site.yml; its flwr status and history."""
    before = {r["run-id"] for r in runs()}
    started = time.monotonic()
    proc = site("-e", "flower_run_policy=always", *extra, inventory=inventory)
    new = [r for r in runs() if r["run-id"] not in before]
    if not new:
        print(proc.stdout[-3000:], proc.stderr[-2000:])
        return "not started", None
    print(f"  run {new[0]['run-id']}: {new[0]['status']} (site.yml {time.monotonic() - started:.0f} s)")
    return new[0]["status"], history(new[0]["run-id"])


def figures(label: str, hist: dict) -> dict:
    rounds = hist["rounds"]
    later = rounds[1:] or rounds  # round 1 of a container's life also traces the model
    print(f"\n== {label}: run {hist['run_id']} ({hist['status']}), {len(rounds)} rounds")
    print("round  acc    round_s  slowest_fit_s  overhead_s  dispatch_s  return_s  fit_s per client")
    for r in rounds:
        slow = max(r["clients"].values(), key=lambda c: c.get("fit-seconds", 0))
        fits = " ".join(f"{n}({c['tier']})={c['fit-seconds']:.1f}" for n, c in sorted(r["clients"].items()))
        print(
            f"{r['round']:>5}  {r['accuracy'] or 0:.3f}  {r['round_seconds']:7.1f}  {r['slowest_fit_seconds']:13.1f}"
            f"  {r['overhead_seconds']:10.1f}  {slow.get('dispatch-seconds', float('nan')):10.1f}"
            f"  {slow.get('return-seconds', float('nan')):8.1f}  {fits}"
        )
    by_tier = {
        tier: {
            "fit": [c["fit-seconds"] for c in entries],
            "per_core": [c["samples-per-second"] / c["cpu-limit-cores"] for c in entries],
            "peak": [c["memory-peak-bytes"] for c in entries],
            "cpus": [c["cpu-limit-cores"] for c in entries],
        }
        for tier, entries in clients_by_tier(later).items()
    }
    for tier, t in sorted(by_tier.items(), key=lambda kv: mean(kv[1]["cpus"])):
        print(
            f"tier {tier:<8} cpus {mean(t['cpus']):.2f}: fit {mean(t['fit']):.2f} s (sd {pstdev(t['fit']):.2f}), "
            f"{mean(t['per_core']):.0f} samples/s per core of budget, peak memory {max(t['peak']) / 2**20:.0f} MiB"
        )
    tiers = sorted(by_tier, key=lambda k: mean(by_tier[k]["cpus"]))
    ratio = mean(by_tier[tiers[0]]["fit"]) / mean(by_tier[tiers[-1]]["fit"])
    overhead = mean(r["overhead_seconds"] for r in later)
    reached = next((r for r in rounds if (r["accuracy"] or 0) >= TARGET), None)
    print(f"tier fidelity: {tiers[0]} fit / {tiers[-1]} fit = {ratio:.2f}")
    worst = max(r["overhead_seconds"] for r in later)
    print(f"overhead per round (rounds 2+): mean {overhead:.1f} s, max {worst:.1f} s")
    when = f"round {reached['round']}, {reached['elapsed_seconds']:.0f} s after the run started" if reached else "never"
    print(f"accuracy {TARGET}: {when}; final {rounds[-1]['accuracy']:.3f}")
    return {"ratio": ratio, "overhead": overhead}


def memory_sweep(limits: list[str]) -> None:
    """One round with client-a (tier iot) at each memory limit: did it train, or was it OOM-killed?"""
    import yaml

    for limit in limits:
        work = Path(tempfile.mkdtemp(prefix="flowerlab-bench-"))
        inv = work / "inventory"
        shutil.copytree(INVENTORY, inv)
        hv = inv / "host_vars" / "localhost.yml"
        data = yaml.safe_load(hv.read_text())
        data["lab_clients"][0]["memory"] = limit
        hv.write_text(yaml.safe_dump(data))
        run = inv / "group_vars" / "all" / "run.yml"
        cfg = yaml.safe_load(run.read_text())
        cfg["lab_run_config"]["num-server-rounds"] = 1
        run.write_text(yaml.safe_dump(cfg))
        status, hist = one_run(inventory=inv)
        name = data["lab_clients"][0]["name"]
        oom = subprocess.run(
            ["docker", "inspect", "-f", "{{.State.OOMKilled}} {{.RestartCount}}", f"flowerlab-supernode-{name}"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        peak = None
        if hist and hist["rounds"] and name in hist["rounds"][0]["clients"]:
            peak = hist["rounds"][0]["clients"][name]["memory-peak-bytes"] / 2**20
        print(f"memory {limit}: run {status}; peak {peak and f'{peak:.0f} MiB'}; OOMKilled/restarts {oom}")
        shutil.rmtree(work, ignore_errors=True)
    site("-e", "flower_run_policy=never")  # back to the committed inventory


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cold", action="store_true", help="also one run with cold ClientApps, side by side")
    parser.add_argument("--soak", type=int, default=0, help="N runs in a row; print how many completed")
    parser.add_argument("--memory", help="comma-separated memory limits to try on client-a, one round each")
    args = parser.parse_args()
    if args.soak:
        done = 0
        for i in range(args.soak):
            status, hist = one_run()
            done += status == "finished:completed"
            if hist and hist["rounds"]:
                print(f"  run {i + 1}: final accuracy {hist['rounds'][-1]['accuracy']:.3f}")
        print(f"soak: {done} of {args.soak} runs completed")
        return 0
    if args.memory:
        memory_sweep(args.memory.split(","))
        return 0
    status, warm = one_run()
    if warm is None:
        return 1
    w = figures("warm trainer (the lab's default)", warm)
    if args.cold:
        status, cold = one_run("-e", '{"flower_supernodes_env": {"FLOWERLAB_TRAINER_SOCKET": ""}}')
        site("-e", "flower_run_policy=never")  # the warm containers back
        if cold:
            c = figures("cold: every ClientApp builds and traces the model in its own process", cold)
            print(
                f"\nside by side: overhead {w['overhead']:.1f} s warm vs {c['overhead']:.1f} s cold; "
                f"tier fidelity {w['ratio']:.2f} warm vs {c['ratio']:.2f} cold"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
