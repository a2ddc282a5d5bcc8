"""`genset up` draws ports for what it starts (etcd's peer port, status ports) and must never
draw one that the command line already names for NATS, etcd or the API."""
from __future__ import annotations

import random

import pytest

from genset.launch import Launcher, LaunchError, build_parser, etcd_address, nats_address
from genset.runtime.infra import free_port, pick_listen_port


def test_ports_named_on_the_command_line_are_reserved_before_any_is_drawn():
    args = build_parser().parse_args(["--port", "21001", "--nats", "nats://127.0.0.1:21002",
                                      "--etcd", "http://127.0.0.1:21003"])
    assert {21001, 21002, 21003} <= Launcher(args).ports_given


def test_default_and_bare_host_port_forms_are_reserved_too():
    args = build_parser().parse_args(["--nats", "127.0.0.1:21004", "--etcd", "127.0.0.1:21005"])
    assert {21004, 21005} <= Launcher(args).ports_given
    defaults = Launcher(build_parser().parse_args([])).ports_given
    assert {4222, 2379, 8000} <= defaults


def test_a_reserved_port_is_never_drawn_even_when_it_is_free():
    # Two ports nothing listens on; the first is reserved (as `genset up` reserves --etcd's
    # client port before etcd binds it), and the draw offers it first, twice.
    reserved, other = free_port(), free_port()

    class ReservedFirst(random.Random):
        def __init__(self):
            super().__init__(0)
            self.offers = [reserved, reserved, other]

        def randrange(self, low, high):
            return self.offers.pop(0) if self.offers else super().randrange(low, high)

    taken = {reserved}
    port = pick_listen_port(taken, rng=ReservedFirst())
    assert port != reserved and port in taken and len(taken) == 2


def test_nats_and_etcd_addresses_are_read_one_way_for_reserving_and_starting():
    assert nats_address("nats://127.0.0.1:21008") == ("127.0.0.1", 21008)
    assert nats_address("localhost") == ("localhost", 4222)
    assert etcd_address("http://127.0.0.1:21009,http://10.0.0.2:2379") == ("127.0.0.1", 21009)
    assert etcd_address("127.0.0.1") == ("127.0.0.1", 2379)
    with pytest.raises(LaunchError, match="--etcd"):
        etcd_address("127.0.0.1:x")
    with pytest.raises(LaunchError, match="--nats"):
        nats_address("nats://127.0.0.1:99999")
    args = build_parser().parse_args(["--nats", "nats://127.0.0.1:99999", "--etcd", "h:x"])
    assert Launcher(args).ports_given == {args.port}  # reported when used, not here
