"""What several benchmarks share: percentiles and median-of-runs lines, and the `genset up`
stack the side-by-side benchmarks against the Dynamo peer start (bench_frontend, bench_aiperf).

Imported by its sibling scripts as `_common` (they run as `python bench/NAME.py`, which puts
this folder first on sys.path).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# the Dynamo peer's install (../shared/peers/dynamo/setup.sh): its venv and its model directory,
# whose tokenizer both systems serve under one name
PEER_DIR = Path(os.environ.get("DYNAMO_PEER_DIR", "/tmp/dynamo-peer"))
MODEL_NAME = "dynpeer-mock"


def pct(values: list[float], q: float) -> float:
    """The `q` quantile (0..1) of `values`, nearest rank below (no interpolation); nan when
    there are none."""
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def median_of_runs(values: list[float]) -> str:
    """'median M (runs: a, b, c)', two decimals each."""
    return (f"median {statistics.median(values):.2f} "
            f"(runs: {', '.join(f'{v:.2f}' for v in values)})")


def med(values) -> float | None:
    """The median of the values that are not None, two decimals (None if there is none)."""
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 2) if values else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 2.0):
    """GET `url` as JSON, never through a proxy (the stack is on 127.0.0.1)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as r:
        return json.loads(r.read())


def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every descendant of `pid` (Linux /proc)."""
    parent_of: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                parent_of[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    out, frontier = [], {pid}
    while frontier:
        nxt = {p for p, pp in parent_of.items() if pp in frontier}
        for p in nxt:
            try:
                cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                cmd = ""
            out.append((p, cmd))
        frontier = nxt
    return out


def own_cpu_s(pid: int) -> float:
    """utime + stime of one process (not its children)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


class GensetUp:
    """`genset up` with mocker workers serving the Dynamo peer's model as MODEL_NAME, on free
    ports with its own NATS and etcd under a temporary state directory: started from scratch
    for each run and stopped after it, so one system never loads the machine while the other
    is measured.

    `source`: another checkout of genset to run instead of this one (a before/after
    comparison); it runs with this checkout's venv and its own code first on the path.
    `router`: `--router` (None: genset up's default). `extra_args` / `env` go to genset up as
    they are. The log is `log_dir / log_name` (`{port}` in it is the API port). After
    `start()`: `url` (the API), `pids` ({"frontend", "router", ..., worker_label + "1", ...,
    "nats", "etcd"}: what the load generators sample the CPU of)."""

    def __init__(self, *, workers: int, speedup: float, log_dir: Path, kv_blocks: int = 8192,
                 router: str | None = None, source: Path | None = None,
                 extra_args: list[str] | tuple[str, ...] = (), env: dict[str, str] | None = None,
                 log_name: str = "genset-up.log", worker_label: str = "worker",
                 ready_s: float = 180.0, stop_s: float = 40.0) -> None:
        self.workers = workers
        self.speedup = speedup
        self.log_dir = log_dir
        self.kv_blocks = kv_blocks
        self.router = router
        self.source = source or REPO
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})
        self.log_name = log_name
        self.worker_label = worker_label
        self.ready_s = ready_s
        self.stop_s = stop_s
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.pids: dict[str, int] = {}
        self.log_path: Path | None = None
        self._log = None
        self._launcher_cpu0 = 0.0
        # genset up's --state-dir (etcd's data: ~62 MB, its preallocated WAL); removed by stop()
        # so that hundreds of benchmark runs do not fill the disk (they once left 24 GB in /tmp)
        self.state_dir = Path(tempfile.mkdtemp(prefix="genset-bench-"))

    def command(self, port: int) -> list[str]:
        cmd = [str(REPO / ".venv" / "bin" / "python"), "-m", "genset.cli", "up",
               "--port", str(port), "--workers", str(self.workers), "--engine", "mocker",
               "--model", str(PEER_DIR / "model"), "--served-model-name", MODEL_NAME,
               "--speedup", f"{self.speedup:g}", "--state-dir", str(self.state_dir),
               "--nats", f"nats://127.0.0.1:{free_port()}", "--etcd", f"127.0.0.1:{free_port()}",
               "--log-level", "warning", f"--worker-arg=--kv-blocks={self.kv_blocks}",
               "--worker-arg=--block-size=16", "--worker-arg=--max-running=256",
               "--worker-arg=--max-batch-tokens=8192"]
        if self.router is not None:
            cmd += ["--router", self.router]
        return cmd + self.extra_args

    def start(self) -> None:
        port = free_port()
        self.state_dir.mkdir(parents=True, exist_ok=True)  # again after a stop()
        cmd = self.command(port)
        # the frontend reads its options from GENSET_* too; genset up passes its env on
        env = {**os.environ, "PYTHONPATH": str(self.source), **self.extra_env}
        self.log_path = self.log_dir / self.log_name.format(port=port)
        self._log = open(self.log_path, "wb")
        # -m genset.cli from the checkout's root: its code, not the venv's installed copy
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=self.source, start_new_session=True, env=env)
        self.url = f"http://127.0.0.1:{port}"
        self._wait_ready()
        self.pids = self._find_pids()
        self._launcher_cpu0 = own_cpu_s(self.proc.pid)

    def _wait_ready(self) -> None:
        """Until genset up says it is up and the model lists every worker."""
        deadline = time.monotonic() + self.ready_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"genset up exited with {self.proc.returncode}; "
                                   f"see {self.log_path}")
            try:
                if b"genset is up" in self.log_path.read_bytes():
                    models = get_json(self.url + "/v1/models")["data"]
                    if models and models[0].get("workers", 0) >= self.workers:
                        return
            except (OSError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"genset did not become ready in {self.ready_s:.0f} s; "
                                   f"see {self.log_path}")
            time.sleep(0.3)

    def _find_pids(self) -> dict[str, int]:
        pids: dict[str, int] = {}
        workers = 0
        for pid, cmd_line in descendants(self.proc.pid):
            argv = cmd_line.split()
            if "genset.cli" in argv and argv.index("genset.cli") + 1 < len(argv):
                role = argv[argv.index("genset.cli") + 1]
                if role == "worker":
                    workers += 1
                    pids[f"{self.worker_label}{workers}"] = pid
                else:  # a second frontend (--frontends 2) is frontend2, ...
                    n = sum(1 for k in pids if k.rstrip("0123456789") == role)
                    pids[role if n == 0 else f"{role}{n + 1}"] = pid
            elif argv and argv[0].endswith("nats-server"):
                pids["nats"] = pid
            elif argv and argv[0].endswith("etcd"):
                pids["etcd"] = pid
        return pids

    def launcher_cpu(self) -> float:
        """CPU seconds genset up itself (not its children) spent since it was ready."""
        return own_cpu_s(self.proc.pid) - self._launcher_cpu0 if self.proc else 0.0

    def stop(self) -> None:
        """SIGTERM (genset up stops its children), then SIGKILL the group after `stop_s`."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self._log is not None:
            self._log.close()
        shutil.rmtree(self.state_dir, ignore_errors=True)
