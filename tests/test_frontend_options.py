"""`genset frontend`'s options: every bad value is refused with the flag (or environment
variable) it came from, before anything starts, or at start-up for an address it cannot use."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from services.frontend.__main__ import main
from tests.stack import REPO_ROOT

BAD_FLAGS = [
    (["--port", "99999"], "--port"),
    (["--port", "http"], "--port"),
    (["--router", "bogus"], "--router"),
    (["--request-timeout", "0"], "--request-timeout"),
    (["--request-timeout", "soon"], "--request-timeout"),
    (["--migration-limit", "-1"], "--migration-limit"),
    (["--heartbeat-timeout", "0.1"], "--heartbeat-timeout"),
    (["--nats-max-concurrent", "0"], "--nats-max-concurrent"),
    (["--coalesce=yes"], "--coalesce"),
]
BAD_ENV = [
    ("GENSET_PORT", "x", "GENSET_PORT"),
    ("GENSET_COALESCE", "maybe", "GENSET_COALESCE"),
    ("GENSET_ROUTER", "bogus", "GENSET_ROUTER"),
    ("GENSET_MIGRATION_LIMIT", "-2", "GENSET_MIGRATION_LIMIT"),
]


@pytest.mark.parametrize(("argv", "named"), BAD_FLAGS)
def test_bad_flag_is_named(argv, named, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err, err


@pytest.mark.parametrize(("var", "value", "named"), BAD_ENV)
def test_bad_environment_variable_is_named(var, value, named, capsys, monkeypatch):
    monkeypatch.setenv(var, value)
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert named in err and repr(value) in err, err


@pytest.mark.slow
def test_an_address_in_use_names_the_flags(nats_server, etcd_server):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "services.frontend", "--nats", nats_server.url,
             "--etcd", etcd_server.endpoint, "--namespace", "optionstest", "--port", str(port),
             "--log-format", "json"],
            capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert f"127.0.0.1:{port} (--host, --port)" in out and "Traceback" not in out, out
