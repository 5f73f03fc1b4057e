"""Sidecar settings: the flag forms of SPEC §7 and clear errors for the rest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from meshshield.sidecar.config import (
    ConfigError,
    build_config,
    load_config_file,
    parse_inbound,
    parse_outbound,
)

BASE: dict[str, Any] = {"cas": "https://cas:8443", "cas_bundle": "b.pem", "session": "shop",
                        "service": "web", "platform": "sim",
                        "inbound": ["0.0.0.0:15006=127.0.0.1:8080"]}


def test_spec_examples() -> None:
    r = parse_inbound("0.0.0.0:15006=127.0.0.1:8080")
    assert (r.listen.port, r.forward.host, r.forward.port) == (15006, "127.0.0.1", 8080)
    o = parse_outbound("127.0.0.1:15001=payments@payments.shop.svc:15006")
    assert (o.session, o.service, o.target.host, o.target.port) == (
        None, "payments", "payments.shop.svc", 15006)
    o = parse_outbound("[::1]:15001=bank/ledger@10.0.0.5:15006")
    assert (o.listen.host, o.session, o.service) == ("::1", "bank", "ledger")


@pytest.mark.parametrize(("field", "value", "fragment"), [
    ("inbound", ["15006"], "LISTEN=FORWARD"),
    ("inbound", ["a:1=b"], "HOST:PORT"),
    ("outbound", ["127.0.0.1:1=nope"], "SERVICE@HOST:PORT"),
    ("outbound", ["0.0.0.0:1=api@h:1"], "loopback"),
    ("outbound", ["127.0.0.1:1=Bad_Name@h:1"], "SERVICE must be"),
    ("cas", "http://cas", "https://"),
    ("platform", "vmware", "one of"),
    ("session", "Shop", "a-z"),
    ("max_connections", "many", "integer"),
    ("max_handshakes", 0, "1..1000000"),
    ("max_handshakes_per_source", True, "integer"),
    ("max_handshakes_per_source", 2000, "cannot exceed max_handshakes"),
    ("inbound", ["127.0.0.1:1=127.0.0.1:2", "127.0.0.1:1=127.0.0.1:3"], "two routes"),
    ("bogus", 1, "unknown setting"),
])
def test_bad_settings_name_the_setting(field: str, value: Any, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        build_config({**BASE, field: value})


def test_config_file_uses_the_flag_names(tmp_path: Path) -> None:
    p = tmp_path / "sidecar.yaml"
    p.write_text("cas: https://cas:8443\ncas-bundle: b.pem\nsession: shop\nservice: web\n"
                 "platform: sim\noutbound: ['127.0.0.1:15001=api@api:15006']\n"
                 "drain-timeout: 3s\n")
    cfg = build_config(load_config_file(p))
    assert cfg.drain_timeout == 3 and cfg.outbound[0].service == "api"
    p.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config_file(p)


def test_connection_budgets_from_file_and_defaults(tmp_path: Path) -> None:
    cfg = build_config(BASE)
    assert (cfg.max_connections, cfg.max_handshakes, cfg.max_handshakes_per_source) == (
        4096, 1024, 128)
    # A smaller handshake budget brings the per-source default down with it.
    assert build_config({**BASE, "max_handshakes": 64}).max_handshakes_per_source == 64
    p = tmp_path / "sidecar.yaml"
    p.write_text("cas: https://cas:8443\ncas-bundle: b.pem\nsession: shop\nservice: web\n"
                 "platform: sim\ninbound: ['0.0.0.0:15006=127.0.0.1:8080']\n"
                 "max-connections: 500\nmax-handshakes: 200\nmax-handshakes-per-source: 20\n")
    cfg = build_config(load_config_file(p))
    assert (cfg.max_connections, cfg.max_handshakes, cfg.max_handshakes_per_source) == (
        500, 200, 20)


@pytest.mark.parametrize(("values", "idle", "lifetime"), [
    ({}, 0.0, 0.0),  # both off by default: the peer certificate's expiry still bounds
    ({"idle_timeout": "5m", "max_connection_lifetime": "1h"}, 300.0, 3600.0),
    ({"idle_timeout": "off", "max_connection_lifetime": 0}, 0.0, 0.0),
    ({"idle_timeout": "0.5s"}, 0.5, 0.0),
])
def test_connection_bounds(values: dict[str, Any], idle: float, lifetime: float) -> None:
    cfg = build_config({**BASE, **values})
    assert (cfg.idle_timeout, cfg.max_connection_lifetime) == (idle, lifetime)


@pytest.mark.parametrize(("key", "value"), [
    ("idle_timeout", "nan"), ("idle_timeout", "-5"), ("idle_timeout", "soon"),
    ("max_connection_lifetime", "0.01s"), ("max_connection_lifetime", "inf"),
])
def test_bad_connection_bounds_name_the_setting(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=key):
        build_config({**BASE, key: value})


def test_connection_bounds_from_a_config_file(tmp_path: Path) -> None:
    p = tmp_path / "sidecar.yaml"
    p.write_text("cas: https://cas:8443\ncas-bundle: b.pem\nsession: shop\nservice: web\n"
                 "platform: sim\ninbound: ['0.0.0.0:15006=127.0.0.1:8080']\n"
                 "idle-timeout: 90s\nmax-connection-lifetime: 2h\n")
    cfg = build_config(load_config_file(p))
    assert (cfg.idle_timeout, cfg.max_connection_lifetime) == (90.0, 7200.0)
