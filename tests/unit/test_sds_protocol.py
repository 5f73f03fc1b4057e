"""The SDS stream state machine (xDS state of the world), fed requests without sockets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from google.rpc import status_pb2

from meshshield._proto.envoy.config.core.v3 import base_pb2
from meshshield._proto.envoy.extensions.transport_sockets.tls.v3 import (
    secret_pb2,
    tls_spiffe_validator_config_pb2,
)
from meshshield._proto.envoy.service.discovery.v3 import discovery_pb2
from meshshield.sidecar.sds import prepare_socket_path
from meshshield.sidecar.sdsprotocol import (
    SECRET_TYPE_URL,
    SPIFFE_VALIDATOR,
    SPIFFE_VALIDATOR_TYPE_URL,
    ProtocolError,
    SdsMaterial,
    SdsStream,
    make_snapshot,
)

ID = "spiffe://meshshield.local/shop/frontend"
TD = "spiffe://meshshield.local"


def snap(gen: int, chain: bytes = b"CHAIN", bundle: str = "BUNDLE"):  # type: ignore[no-untyped-def]
    return make_snapshot(SdsMaterial(ID, "meshshield.local", chain, b"KEY", bundle), gen)


def req(names: list[str], nonce: str = "", version: str = "",
        error: str | None = None) -> discovery_pb2.DiscoveryRequest:
    r = discovery_pb2.DiscoveryRequest(
        resource_names=names, response_nonce=nonce, version_info=version,
        type_url=SECRET_TYPE_URL, node=base_pb2.Node(id="envoy-1", cluster="c"))
    if error is not None:
        r.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return r


def secrets(resp: discovery_pb2.DiscoveryResponse) -> dict[str, secret_pb2.Secret]:
    out = {}
    for a in resp.resources:
        assert a.type_url == SECRET_TYPE_URL
        s = secret_pb2.Secret.FromString(a.value)
        out[s.name] = s
    return out


def test_subscribe_is_answered_with_both_secrets_by_name() -> None:
    st, s1 = SdsStream(1), snap(1)
    o = st.on_request(req([ID, TD]), s1)
    assert o.kind == "subscribe" and o.response is not None and not o.unknown
    assert o.response.version_info == s1.version and o.response.nonce
    assert o.response.type_url == SECRET_TYPE_URL
    got = secrets(o.response)
    cert = got[ID].tls_certificate
    assert cert.certificate_chain.inline_bytes == b"CHAIN"
    assert cert.private_key.inline_bytes == b"KEY"
    cv = got[TD].validation_context.custom_validator_config
    assert cv.name == SPIFFE_VALIDATOR and cv.typed_config.type_url == SPIFFE_VALIDATOR_TYPE_URL
    cfg = tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig.FromString(
        cv.typed_config.value)
    assert [(t.name, t.trust_bundle.inline_bytes) for t in cfg.trust_domains] == [
        ("meshshield.local", b"BUNDLE")]
    assert st.node == "envoy-1"


def test_aliases_and_unknown_names() -> None:
    o = SdsStream(1).on_request(req(["default", "ROOTCA", "other"]), snap(1))
    assert o.response is not None
    assert set(secrets(o.response)) == {"default", "ROOTCA"}
    assert o.unknown == ["other"]


def test_before_a_certificate_nothing_is_sent_then_the_first_one_is_pushed() -> None:
    st = SdsStream(1)
    assert st.on_request(req([ID]), None).response is None
    o = st.on_change(snap(1))
    assert o.kind == "push" and o.response is not None


def test_ack_then_change_is_pushed_once() -> None:
    st, s1, s2 = SdsStream(1), snap(1), snap(2, chain=b"NEW")
    first = st.on_request(req([ID]), s1).response
    assert first is not None
    assert st.on_request(req([ID], first.nonce, first.version_info), s1).kind == "ack"
    assert st.acked_version == s1.version
    assert st.on_change(s1).kind == "none"  # nothing new
    push = st.on_change(s2)
    assert push.kind == "push" and push.response is not None
    assert push.response.version_info == s2.version and push.response.nonce != first.nonce
    assert st.on_change(s2).kind == "none"


def test_nack_is_counted_with_envoys_detail_and_the_stream_goes_on() -> None:
    st, s1 = SdsStream(1), snap(1)
    first = st.on_request(req([ID]), s1).response
    assert first is not None
    o = st.on_request(req([ID], first.nonce, "", error="bad\ncert\x00"), s1)
    assert o.kind == "nack" and o.response is None and st.nacks == 1
    assert o.detail == "bad\\ncert\\x00" and o.version == s1.version
    assert st.acked_version == ""
    push = st.on_change(snap(2, bundle="B2"))
    assert push.kind == "push" and push.response is not None


def test_stale_nonce_is_ignored() -> None:
    st, s1 = SdsStream(1), snap(1)
    first = st.on_request(req([ID]), s1).response
    assert first is not None
    st.on_change(snap(2, chain=b"X"))  # a newer response went out meanwhile
    o = st.on_request(req([ID], first.nonce, first.version_info, error="late"), s1)
    assert o.kind == "stale" and st.nacks == 0


def test_changed_names_are_answered() -> None:
    st, s1 = SdsStream(1), snap(1)
    first = st.on_request(req([ID]), s1).response
    assert first is not None
    o = st.on_request(req([ID, TD], first.nonce, first.version_info), s1)
    assert o.kind == "resubscribe" and o.response is not None
    assert set(secrets(o.response)) == {ID, TD}


def test_wrong_type_url_is_refused() -> None:
    r = req([ID])
    r.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
    with pytest.raises(ProtocolError):
        SdsStream(1).on_request(r, snap(1))


def test_versions_differ_with_content_and_generation() -> None:
    assert snap(1).version != snap(1, chain=b"other").version
    assert snap(1).version != snap(2).version


def test_socket_directory_checks(tmp_path: Path) -> None:
    d = tmp_path / "run"
    prepare_socket_path(d / "sds.sock")  # created, 0700
    assert (d.stat().st_mode & 0o777) == 0o700
    os.chmod(d, 0o777)
    with pytest.raises(OSError, match="writable by others"):
        prepare_socket_path(d / "sds.sock")
    os.chmod(d, 0o700)
    (d / "sds.sock").write_text("not a socket")
    with pytest.raises(OSError, match="other than a socket"):
        prepare_socket_path(d / "sds.sock")
    link = tmp_path / "link"
    link.symlink_to(d)
    with pytest.raises(OSError, match="not a directory"):
        prepare_socket_path(link / "x.sock")


BASE = {"cas": "https://cas:8443", "cas_bundle": "b.pem", "session": "shop",
        "service": "web", "platform": "sim"}


def test_sds_setting_from_flag_or_file(tmp_path: Path) -> None:
    from meshshield.sidecar.config import ConfigError, build_config, load_config_file

    # SDS alone is enough: an Envoy beside the app may carry all the traffic.
    assert build_config({**BASE, "sds": "unix:///run/ms/sds.sock"}).sds == Path(
        "/run/ms/sds.sock")
    p = tmp_path / "sidecar.yaml"
    p.write_text("cas: https://cas:8443\ncas-bundle: b.pem\nsession: shop\nservice: web\n"
                 "platform: sim\nsds: unix:///run/ms/sds.sock\n")
    assert build_config(load_config_file(p)).sds == Path("/run/ms/sds.sock")
    for bad in ("/run/sds.sock", "unix://relative.sock", "tcp://127.0.0.1:1",
                "unix:///" + "a" * 120):
        with pytest.raises(ConfigError, match="--sds"):
            build_config({**BASE, "sds": bad})
    with pytest.raises(ConfigError, match="at least one"):
        build_config(BASE)


def test_sidecar_refuses_a_socket_directory_writable_by_others(tmp_path: Path) -> None:
    import datetime
    import subprocess
    import sys

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    r = subprocess.run(
        [sys.executable, "-m", "meshshield.cli", "sidecar", "--cas", "https://127.0.0.1:1",
         "--cas-bundle", str(bundle), "--session", "shop", "--service", "web",
         "--platform", "sim", "--admin-listen", "127.0.0.1:0",
         "--sds", f"unix://{shared}/sds.sock"],
        capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "writable by others" in r.stderr and "Traceback" not in r.stderr
    assert not (shared / "sds.sock").exists()
