"""Run the app alone on loopback: one flower-superlink, N flower-supernode processes, `flwr run`.

    python -m flowerlab_app.loopback --clients 2 --rounds 2

Prepares the offline dataset, starts the processes on free ports the way the lab's containers do
(each under `flowerlab-supervise` with its SuperExec, and a warm trainer per SuperNode; TLS with a
CA of its own and SuperNode authentication with one EC key per SuperNode, registered by
`flowerlab-supernode-keys` beside the SuperLink), runs the app, waits for the run, prints per-round
figures (round seconds, per-client fit seconds, overhead = round seconds minus the slowest client's
fit seconds) and stops every process. Used by the end-to-end test and the benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import control, data

APP_DIR = Path(__file__).resolve().parents[1]
CONNECTION = "loopback"
# (tier, batch size, learning rate) of the emulated devices, cycled over the clients.
TIERS = [("small", 16, 0.01), ("large", 64, 0.02), ("medium", 32, 0.01)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bin_path(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def write_tls(directory: Path, names: list[str]) -> None:
    """A CA (ca.crt), the SuperLink's certificate for 127.0.0.1 and localhost (superlink.crt/.key), and
    one EC P-384 key pair per SuperNode name (<name>.key, OpenSSH private key; keys/<name>.pub)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def pem_key(key, fmt=serialization.PrivateFormat.PKCS8) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())

    def certificate(subject: str, key, issuer: str, issuer_key, ca: bool, sans=()) -> bytes:
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        return builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    (directory / "keys").mkdir(parents=True, exist_ok=True)
    ca_key, key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    (directory / "ca.crt").write_bytes(certificate("loopback CA", ca_key, "loopback CA", ca_key, ca=True))
    sans = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    (directory / "superlink.crt").write_bytes(certificate("superlink", key, "loopback CA", ca_key, False, sans))
    (directory / "superlink.key").write_bytes(pem_key(key))
    for name in names:
        node_key = ec.generate_private_key(ec.SECP384R1())
        (directory / f"{name}.key").write_bytes(pem_key(node_key, serialization.PrivateFormat.OpenSSH))
        public = node_key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        (directory / "keys" / f"{name}.pub").write_bytes(public + b"\n")
    for path in directory.glob("*.key"):
        path.chmod(0o600)


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else str(value)


class LoopbackLab:
    """The processes of a lab on 127.0.0.1, in a work directory; a context manager that stops them."""

    def __init__(self, work: Path, clients: int = 2, metrics_port: int | None = None):
        self.work = work
        self.clients = clients
        self.superlink_port = free_port()
        self.metrics_port = metrics_port or free_port()
        self.data_dir = work / "data"
        self.results_dir = work / "results"
        self.procs: list[subprocess.Popen] = []
        self.commands: dict[str, tuple[list[str], dict, subprocess.Popen]] = {}
        self.node_configs: list[dict] = []
        # Unix socket paths must stay short (108 bytes): not under a deep test directory.
        self.sockets = Path(tempfile.mkdtemp(prefix="flowerlab-"))
        self.tls = work / "tls"
        self.ca = str(self.tls / "ca.crt")

    def env(self, name: str) -> dict:
        home = self.work / "flwr-home" / name
        home.mkdir(parents=True, exist_ok=True)
        return dict(
            os.environ,
            FLOWERLAB_SUPERVISOR_STATUS=str(self.sockets / f"{name}.json"),
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # flower-superexec
            FLWR_HOME=str(home),
            FLWR_TELEMETRY_ENABLED="0",
            FLWR_DISABLE_UPDATE_CHECK="1",
            FLOWERLAB_DATA_DIR=str(self.data_dir),
            FLOWERLAB_RESULTS_DIR=str(self.results_dir),
        )

    def start(self, name: str, cmd: list[str], env: dict | None = None) -> None:
        log = open(self.work / f"{name}.log", "ab")  # noqa: SIM115 - closed when the process ends
        env = {**self.env(name), **(env or {})}
        self.procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True))
        self.commands[name] = (cmd, env, self.procs[-1])

    def crash(self, name: str) -> None:
        """SIGKILL every process of `name` (a crash), then start it again as it was (a restart policy)."""
        cmd, env, proc = self.commands[name]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        self.start(name, cmd, env)

    def supervised(self, superexec: str, *main: str, keep: tuple[str, ...] = (), retry: float = 0) -> list[str]:
        """The main Flower command under flowerlab-supervise, with its SuperExec (and more), as in the lab."""
        keep = (f"{bin_path('flowerlab-superexec')} {superexec}", *keep)
        options = ["--retry-main", str(retry)] if retry else []
        return [bin_path("flowerlab-supervise"), *options, *(a for k in keep for a in ("--keep", k)), "--", *main]

    def wait_health(self, port: int, timeout: float = 60, tls: bool = False) -> None:
        """Wait for /health on `port` (over TLS verified with the lab's CA for the SuperLink)."""
        from .supervisor import health

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if health(f"127.0.0.1:{port}", self.ca if tls else None) is None:
                return
            time.sleep(0.5)
        raise TimeoutError(f"nothing healthy on port {port} after {timeout:.0f} s (logs in {self.work})")

    def supernode(self, name: str, node_port: int, *extra: str, key: str | None = None, ca: str | None = None):
        """flowerlab-supernode's command line for this lab (TLS verified with `ca`, authenticated with `key`)."""
        return [
            bin_path("flowerlab-supernode"), "--isolation", "process",
            "--root-certificates", ca or self.ca, "--auth-supernode-private-key", key or str(self.tls / f"{name}.key"),
            "--superlink", f"127.0.0.1:{self.superlink_port}", "--host", "127.0.0.1", "--port", str(node_port), *extra,
        ]  # fmt: skip

    def registered(self) -> list[str]:
        """Names of the SuperNodes whose keys the SuperLink has registered."""
        from flwr.proto.control_pb2 import ListNodesRequest

        client = control.control_client(f"127.0.0.1:{self.superlink_port}", self.ca)
        try:
            nodes = client.ListNodes(ListNodesRequest()).nodes_info
        finally:
            client.close()
        return sorted(n.name for n in nodes if n.status != "unregistered")

    def __enter__(self) -> LoopbackLab:
        data.prepare("offline:digits", self.clients, "iid", 0.5, 42, self.data_dir)
        names = [f"client-{i}" for i in range(self.clients)]
        write_tls(self.tls, names)
        address = f"127.0.0.1:{self.superlink_port}"
        registrar = f"{bin_path('flowerlab-supernode-keys')} --superlink {address} --root-certificates {self.ca}"
        self.start(
            "superlink",
            self.supervised(
                f"--root-certificates {self.ca} --runtime-api-address {address}",
                bin_path("flower-superlink"), "--host", "127.0.0.1", "--port", str(self.superlink_port),
                "--ssl-ca-certfile", self.ca, "--ssl-certfile", str(self.tls / "superlink.crt"),
                "--ssl-keyfile", str(self.tls / "superlink.key"), "--enable-supernode-auth",
                "--isolation", "process", "--disable-runtime-dependency-installation",
                keep=(f"{registrar} --keys {self.tls / 'keys'} --interval 1",),
            ),
        )  # fmt: skip
        self.wait_health(self.superlink_port, tls=True)
        deadline = time.monotonic() + 60
        while self.registered() != names:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"SuperNode keys not registered after 60 s: {self.registered()} (logs in {self.work})"
                )
            time.sleep(0.5)
        for i, name in enumerate(names):
            tier, batch_size, lr = TIERS[i % len(TIERS)]
            config = {
                "partition-id": i,
                "num-partitions": self.clients,
                "client": name,
                "tier": tier,
                "host": "loopback",
                "batch-size": batch_size,
                "learning-rate": lr,
            }
            self.node_configs.append(config)
            node_port = free_port()
            trainer = str(self.sockets / f"trainer-{i}.sock")
            self.start(
                f"supernode-{i}",
                self.supervised(
                    f"--insecure --runtime-api-address 127.0.0.1:{node_port}",
                    *self.supernode(
                        name, node_port, "--node-config", " ".join(f"{k}={toml_value(v)}" for k, v in config.items())
                    ),
                    keep=(f"{bin_path('flowerlab-trainer')} --socket {trainer}",),
                    retry=300,
                ),
                env={"FLOWERLAB_TRAINER_SOCKET": trainer},
            )  # fmt: skip
            self.wait_health(node_port)
        cli_home = self.work / "flwr-home" / "cli"
        cli_home.mkdir(parents=True, exist_ok=True)
        (cli_home / "config.toml").write_text(
            f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.superlink_port}"\nroot-certificates = "{self.ca}"\n'
        )
        return self

    def flwr(self, *args: str) -> str:
        proc = subprocess.run(
            [bin_path("flwr"), *args], env=self.env("cli"), capture_output=True, text=True, timeout=300
        )
        if proc.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed: {proc.stdout}\n{proc.stderr}")
        return proc.stdout

    def run(self, overrides: dict) -> str:
        config = {"min-nodes": self.clients, "dataset": "offline:digits", "metrics-port": self.metrics_port}
        config.update(overrides)
        arg = " ".join(f"{k}={toml_value(v)}" for k, v in config.items())
        out = self.flwr("run", str(APP_DIR), CONNECTION, "--format", "json", "-c", arg)
        return str(json.loads(out)["run-id"])

    def status(self, run_id: str) -> str:
        """The run's `flwr ls` status, read in this process (a `flwr` CLI process costs about 2 CPU s)."""
        runs = control.list_runs(f"127.0.0.1:{self.superlink_port}", self.ca)
        return next(r["status"] for r in runs if r["run-id"] == run_id)

    def wait(self, run_id: str, timeout: float = 1200) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status(run_id)
            if status.startswith("finished"):
                return status
            time.sleep(3)
        raise TimeoutError(f"run {run_id} not finished after {timeout:.0f} s (logs in {self.work})")

    def history(self, run_id: str) -> dict:
        return json.loads((self.results_dir / run_id / "history.json").read_text())

    def __exit__(self, *exc) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(self.sockets, ignore_errors=True)
        pid_file = self.results_dir / "exporter.pid"
        if pid_file.exists():  # the metrics exporter outlives runs by design; stop it with the lab
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGTERM)


def report(history: dict) -> str:
    lines = []
    for r in history["rounds"]:
        fits = ", ".join(
            f"{name} ({c['tier']}, batch {c.get('batch-size')}) {c['fit-seconds']:.1f} s, {c.get('steps')} steps"
            for name, c in sorted(r["clients"].items())
        )
        lines.append(
            f"round {r['round']}: {r['round_seconds']:.1f} s, slowest fit {r['slowest_fit_seconds']:.1f} s, "
            f"overhead {r['overhead_seconds']:.1f} s, accuracy {r['accuracy'] or 0:.3f}, "
            f"budget {r.get('budget_seconds') or 0:.1f} s, idle {r.get('idle_fraction') or 0:.2f}; fit: {fits}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sample-percentage", type=float, default=100.0)
    parser.add_argument("--model-alpha", type=float, default=0.35)
    parser.add_argument("--policy", default="static", help="straggler-policy of the run (static, deadline, ...)")
    parser.add_argument("--deadline-seconds", type=float, default=0.0)
    parser.add_argument("--work", type=Path, help="keep logs and results here (default: a temp dir)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="flowerlab-loopback-"))
    work.mkdir(parents=True, exist_ok=True)
    with LoopbackLab(work, clients=args.clients) as lab:
        started = time.monotonic()
        run_id = lab.run(
            {
                "num-server-rounds": args.rounds,
                "data-sample-percentage": args.sample_percentage,
                "model-alpha": args.model_alpha,
                "straggler-policy": args.policy,
                "deadline-seconds": args.deadline_seconds,
            }
        )
        status = lab.wait(run_id)
        print(f"run {run_id}: {status} in {time.monotonic() - started:.1f} s (work dir {work})")
        if status != "finished:completed":
            return 1
        print(report(lab.history(run_id)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
