"""The warm trainer of a SuperNode: one long-lived process that trains for the per-message ClientApps.

Flower 1.41 starts a new ClientApp process for every message. Importing TensorFlow, building the model
and tracing its train function would cost every round 15-20 CPU s, more than training itself, and hide
the device's tier. So each SuperNode container also runs

    flowerlab-trainer --socket /tmp/flowerlab/trainer.sock

which keeps TensorFlow, the compiled models and the partition in memory; the ClientApp sends it the
received weights and its settings over a Unix socket (in a directory only the container's user can
open) and returns what it answers. Without FLOWERLAB_TRAINER_SOCKET the ClientApp trains in its own
process with the same `Trainer` (cold: every message pays the start-up).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
import traceback
from multiprocessing.connection import Client, Listener
from pathlib import Path

SOCKET_ENV = "FLOWERLAB_TRAINER_SOCKET"
OPS = ("train", "evaluate", "speed", "ping")


class TrainerError(RuntimeError):
    """The trainer could not be reached or failed on a request."""


def socket_path() -> Path | None:
    value = os.environ.get(SOCKET_ENV)
    return Path(value) if value else None


def call(path: Path, op: str, request: dict | None = None, timeout: float = 60.0) -> dict:
    """Send one request to the trainer at `path`; wait for it to come up for at most `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = Client(str(path), family="AF_UNIX")
            break
        except OSError as err:
            if time.monotonic() > deadline:
                raise TrainerError(f"no trainer answers on {path} after {timeout:.0f} s: {err}") from err
            time.sleep(0.5)
    with conn:
        conn.send((op, request or {}))
        try:
            ok, answer = conn.recv()
        except (EOFError, OSError) as err:
            raise TrainerError(f"the trainer died during {op} ({type(err).__name__})") from err
    if not ok:
        raise TrainerError(f"trainer failed on {op}: {answer}")
    return answer


def serve(path: Path) -> None:
    """Answer requests one at a time until SIGTERM. TensorFlow is imported with the first request."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    path.unlink(missing_ok=True)
    trainer = None
    started = time.time()
    served = 0
    with Listener(str(path), family="AF_UNIX") as listener:
        os.chmod(path, 0o600)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        print(f"trainer: listening on {path}", flush=True)
        while True:
            with listener.accept() as conn:
                try:
                    op, request = conn.recv()
                    if op == "ping":
                        answer = {"pid": os.getpid(), "uptime": time.time() - started, "served": served}
                    elif op in ("train", "evaluate", "speed"):
                        if trainer is None:
                            from .task import Trainer

                            trainer = Trainer()
                            print(f"trainer: TensorFlow ready ({trainer.threads} threads)", flush=True)
                        answer = getattr(trainer, op)(request)
                        served += 1
                    else:
                        raise ValueError(f"unknown operation {op!r}; allowed: {', '.join(OPS)}")
                    conn.send((True, answer))
                except (EOFError, ConnectionError):
                    continue
                except Exception as err:  # one bad request must not stop the device
                    traceback.print_exc()
                    with contextlib.suppress(OSError):
                        conn.send((False, f"{type(err).__name__}: {err}"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flowerlab-trainer", description=__doc__.splitlines()[0])
    parser.add_argument("--socket", type=Path, default=socket_path(), help=f"Unix socket (default ${SOCKET_ENV})")
    parser.add_argument("--ping", action="store_true", help="ask a running trainer whether it answers, then exit")
    args = parser.parse_args(argv)
    if args.socket is None:
        parser.error(f"--socket or ${SOCKET_ENV} is required")
    if args.ping:
        try:
            print(call(args.socket, "ping", timeout=2.0))
        except TrainerError as err:
            print(err, file=sys.stderr)
            return 1
        return 0
    serve(args.socket)
    return 0


if __name__ == "__main__":
    sys.exit(main())
