"""The argparse wiring cli.py is expected to use for `inject` and `webhook [certs]`."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from meshshield.kube.cli_support import (
    add_inject_arguments,
    add_webhook_arguments,
    inject_command,
    webhook_command,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "kube"


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="meshshield")
    sub = top.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inject")
    add_inject_arguments(p)
    p.set_defaults(func=inject_command)
    p = sub.add_parser("webhook")
    add_webhook_arguments(p)
    p.set_defaults(func=webhook_command)
    return top


def run(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args))


def test_inject_with_flags(capsys: pytest.CaptureFixture[str]) -> None:
    code = run(["inject", "-f", str(FIXTURES / "workloads.yaml"), "--image", "reg/ms:2",
                "--cas", "https://cas.example:8443", "--sidecar-memory-limit", "128Mi"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "image: reg/ms:2" in out and "https://cas.example:8443" in out
    assert "memory: 128Mi" in out


def test_inject_bad_flag_value_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code = run(["inject", "-f", "-", "--cas", "http://plain:80"])
    assert code == 2
    assert "CAS URL: expected https://" in capsys.readouterr().err


def test_inject_without_file_is_an_argparse_usage_error() -> None:
    with pytest.raises(SystemExit) as exit_:
        run(["inject"])
    assert exit_.value.code == 2


def test_webhook_needs_its_certificate(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["webhook", "--listen", "127.0.0.1:0"]) == 2
    assert "--tls-cert and --tls-key are required" in capsys.readouterr().err


def test_webhook_bad_listen_is_a_usage_error(capsys: pytest.CaptureFixture[str],
                                            tmp_path: Path) -> None:
    assert run(["webhook", "--listen", "nowhere", "--tls-cert", "c", "--tls-key", "k"]) == 2
    assert "expected HOST:PORT" in capsys.readouterr().err


def test_webhook_certs_subcommand(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert run(["webhook", "certs", "--out", str(tmp_path), "--days", "10"]) == 0
    assert capsys.readouterr().out.strip()
    assert (tmp_path / "tls.crt").exists() and (tmp_path / "tls.key").exists()
