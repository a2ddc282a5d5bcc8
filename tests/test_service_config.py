"""Config precedence and errors, logging output, and the status HTTP server (no NATS/etcd)."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
from dataclasses import dataclass, field

import pytest
import structlog

from genset.runtime.config import (
    CommonConfig,
    ConfigError,
    FieldError,
    add_common_args,
    add_dataclass_args,
    common_config,
    dataclass_from_args,
    opt,
)
from genset.runtime.logging import bind_request, configure_logging
from genset.runtime.metrics import Metrics
from genset.runtime.status_http import StatusServer, json_response


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_common_args(parser)
    return parser.parse_args(argv)


def test_flags_beat_env_beat_defaults():
    env = {"GENSET_NAMESPACE": "from-env", "GENSET_METRICS_PORT": "9100",
           "GENSET_DRAIN_TIMEOUT": "7.5", "GENSET_ETCD": "etcd-env:2379"}
    cfg = common_config(parse(["--namespace", "from-flag", "--drain-timeout", "2"]), env)
    assert cfg.namespace == "from-flag"  # flag over env
    assert cfg.drain_timeout == 2.0  # flag over env
    assert cfg.metrics_port == 9100  # env over default
    assert cfg.etcd == "etcd-env:2379"
    assert cfg.nats == CommonConfig.nats  # default
    assert cfg.log_level == "info"
    assert common_config(parse([]), {}) == CommonConfig()


def test_bad_env_value_names_the_variable():
    with pytest.raises(ConfigError, match=r"GENSET_METRICS_PORT='ninety' is not an integer"):
        common_config(parse([]), {"GENSET_METRICS_PORT": "ninety"})
    with pytest.raises(ConfigError, match=r"GENSET_DRAIN_TIMEOUT='-1'.*>= 0"):
        common_config(parse([]), {"GENSET_DRAIN_TIMEOUT": "-1"})
    with pytest.raises(ConfigError, match=r"GENSET_LOG_LEVEL='loud' is not one of"):
        common_config(parse([]), {"GENSET_LOG_LEVEL": "loud"})
    with pytest.raises(ConfigError, match=r"GENSET_METRICS_PORT='70000' must be <= 65535"):
        common_config(parse([]), {"GENSET_METRICS_PORT": "70000"})
    with pytest.raises(ConfigError, match=r"namespace 'a.b'.*GENSET_NAMESPACE"):
        common_config(parse([]), {"GENSET_NAMESPACE": "a.b"})
    # a bad env value is ignored when the flag is given (the flag wins)
    assert common_config(parse(["--metrics-port", "1"]),
                         {"GENSET_METRICS_PORT": "x"}).metrics_port == 1


def test_bad_flag_value_is_a_clear_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        parse(["--metrics-port", "abc"])
    assert exc.value.code == 2
    assert "argument --metrics-port: 'abc' is not an integer" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"--log-format='xml' is not one of: auto, json"):
        common_config(parse(["--log-format", "xml"]), {})


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "1e400"])
def test_non_finite_numbers_are_refused_by_name(text, capsys):
    # nan passed every range check (--lease-ttl nan started a service with a NaN lease) and
    # inf is no limit any option offers
    with pytest.raises(SystemExit) as exc:
        parse([f"--lease-ttl={text}"])
    assert exc.value.code == 2
    assert f"argument --lease-ttl: {text!r} is not a finite number" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=rf"GENSET_LEASE_TTL='{text}' is not a finite number"):
        common_config(parse([]), {"GENSET_LEASE_TTL": text})


def test_service_specific_options_and_booleans():
    @dataclass
    class Opts:
        block_size: int = field(default=16, metadata=opt("block", min=1))
        offload: bool = False
        model: str | None = None

    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, Opts)
    opts = dataclass_from_args(Opts, parser.parse_args(["--offload"]),
                               {"GENSET_BLOCK_SIZE": "32", "GENSET_MODEL": "tiny"})
    assert opts == Opts(block_size=32, offload=True, model="tiny")
    opts = dataclass_from_args(Opts, parser.parse_args(["--no-offload"]), {"GENSET_OFFLOAD": "yes"})
    assert opts.offload is False
    assert dataclass_from_args(Opts, parser.parse_args([]), {"GENSET_OFFLOAD": "on"}).offload
    with pytest.raises(ConfigError, match=r"GENSET_OFFLOAD='maybe' is not a boolean"):
        dataclass_from_args(Opts, parser.parse_args([]), {"GENSET_OFFLOAD": "maybe"})
    with pytest.raises(ConfigError, match=r"GENSET_BLOCK_SIZE='0' must be >= 1"):
        dataclass_from_args(Opts, parser.parse_args([]), {"GENSET_BLOCK_SIZE": "0"})


def test_post_init_field_errors_name_the_flag_or_variable():
    @dataclass
    class Opts:
        engine: str = "mocker"
        speedup: float = 1.0

        def __post_init__(self):
            if self.engine == "mocker" and self.speedup <= 0:
                raise FieldError("speedup", f"must be > 0 with --engine mocker, got {self.speedup}")
            if self.engine == "none":
                raise FieldError("engine", "--engine none: no such engine")
            if self.engine == "old":
                raise ValueError("a plain ValueError still works")

    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, Opts)
    with pytest.raises(ConfigError, match=r"^--speedup: must be > 0 with --engine mocker"):
        dataclass_from_args(Opts, parser.parse_args(["--speedup", "0"]), {})
    with pytest.raises(ConfigError, match=r"^GENSET_SPEEDUP: must be > 0"):
        dataclass_from_args(Opts, parser.parse_args([]), {"GENSET_SPEEDUP": "-1"})
    # a message that already names the flag is not prefixed twice
    with pytest.raises(ConfigError, match=r"^--engine none: no such engine$"):
        dataclass_from_args(Opts, parser.parse_args(["--engine", "none"]), {})
    with pytest.raises(ConfigError, match=r"^invalid Opts: a plain ValueError still works"):
        dataclass_from_args(Opts, parser.parse_args(["--engine", "old"]), {})


def test_secrets_are_redacted():
    cfg = common_config(parse(["--etcd-user", "u", "--etcd-password", "hunter2"]), {})
    assert cfg.redacted()["etcd_password"] == "***"
    assert "hunter2" not in json.dumps(cfg.redacted())
    with pytest.raises(ConfigError, match="both --etcd-user and --etcd-password"):
        common_config(parse(["--etcd-user", "u"]), {})


@pytest.fixture
def restore_logging():
    """configure_logging changes process-wide state; put it back for the other tests."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    noisy = {name: logging.getLogger(name).level for name in ("asyncio", "grpc", "aetcd",
                                                               "uvicorn.access")}
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, lvl in noisy.items():
        logging.getLogger(name).setLevel(lvl)


def test_json_logs_carry_service_instance_and_request_id(restore_logging):
    out = io.StringIO()
    configure_logging("json", "info", service="decode", instance_id=0xABC, stream=out)
    log = structlog.get_logger("genset.test")
    with bind_request("req-1", model="tiny"):
        log.info("handled", tokens=3)
    log.debug("hidden")  # below the level
    logging.getLogger("somelib").warning("from stdlib")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 2
    first, second = lines
    assert first["event"] == "handled" and first["tokens"] == 3
    assert first["request_id"] == "req-1" and first["model"] == "tiny"
    assert first["service"] == "decode" and first["instance"] == "abc"
    assert first["level"] == "info" and "timestamp" in first
    assert second["event"] == "from stdlib" and second["service"] == "decode"
    assert "request_id" not in second  # unbound after the block
    with pytest.raises(ValueError, match="log level 'loud'"):
        configure_logging("json", "loud", service="x")


def test_console_format_is_readable(restore_logging):
    out = io.StringIO()
    configure_logging("auto", "info", service="router", stream=out)  # StringIO: no TTY
    structlog.get_logger().info("hello")
    assert json.loads(out.getvalue())["service"] == "router"  # auto -> json off a TTY
    out2 = io.StringIO()
    configure_logging("console", "info", service="router", stream=out2)
    structlog.get_logger().info("hello", k=1)
    text = out2.getvalue()
    assert "hello" in text and "k=1" in text and not text.startswith("{")


async def _http_get(port: int, raw: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


async def test_status_server_routes_and_bad_requests():
    metrics = Metrics()
    metrics.counter("things_total", "things").inc(3)
    assert metrics.counter("things_total", "things") is metrics.counter("genset_things_total", "")
    server = await StatusServer("127.0.0.1", 0).start()
    server.route("/metrics", lambda: (200, metrics.content_type, metrics.render()))
    server.route("/health", lambda: json_response({"status": "ok"}))

    async def failing():
        raise RuntimeError("boom")

    server.route("/broken", failing)
    try:
        status, body = await _http_get(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200 and b"genset_things_total 3.0" in body
        assert b"process_cpu_seconds_total" in body
        status, body = await _http_get(server.port, b"GET /health?x=1 HTTP/1.1\r\n\r\n")
        assert status == 200 and json.loads(body) == {"status": "ok"}
        assert (await _http_get(server.port, b"GET /nope HTTP/1.1\r\n\r\n"))[0] == 404
        assert (await _http_get(server.port, b"POST /health HTTP/1.1\r\n\r\n"))[0] == 405
        assert (await _http_get(server.port, b"garbage\r\n\r\n"))[0] == 400
        assert (await _http_get(server.port, b"GET /health HTTP/1.1\r\nX: "
                                + b"a" * 20000 + b"\r\n\r\n"))[0] == 431
        status, body = await _http_get(server.port, b"GET /broken HTTP/1.1\r\n\r\n")
        assert status == 500 and b"boom" in body
    finally:
        await server.close()
