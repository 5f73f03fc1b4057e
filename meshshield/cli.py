"""meshshield command line: one entry point, a small function per subcommand.

Exit codes (SPEC §2): 0 success, 1 refused or invalid (reason on stderr), 2 usage error.
Nothing a user or a peer can cause ends in a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshshield.errors import MeshError

if TYPE_CHECKING:
    from meshshield.httpserver import ConnectionLimits

Command = Callable[[argparse.Namespace], int]
MAX_EVIDENCE_BYTES = 16 << 20  # a quote with its certificate chain is a few KiB


class UsageError(Exception):
    """A command-line value is unusable (exit 2)."""


def _err(msg: str) -> None:
    """One message on stderr; control characters from peers or files shown escaped."""
    from meshshield.status import clean

    print(f"meshshield: {chr(10).join(clean(x) for x in str(msg).splitlines())}",
          file=sys.stderr)


def _duration_flag(text: str, flag: str, *, minimum: float, maximum: float) -> float:
    """A duration flag's value in seconds, or a usage error naming the flag."""
    from meshshield.clock import parse_duration

    try:
        return parse_duration(text, what=flag, minimum=minimum, maximum=maximum,
                              allow_zero=minimum <= 0)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _read_input(path: str, what: str, limit: int) -> bytes:
    """A file named on the command line (or - for stdin), bounded; usage error if it is
    not a regular file or is over the cap."""
    from meshshield.inputs import InputFileError, read_bounded

    try:
        return read_bounded(path, what=what, limit=limit)
    except InputFileError as e:
        raise UsageError(str(e)) from None


# -- policy ------------------------------------------------------------------------------


def cmd_policy_validate(args: argparse.Namespace) -> int:
    from meshshield.policy import MAX_POLICY_BYTES, PolicyInvalid, parse_policy

    try:
        data = _read_input(args.file, "policy file", MAX_POLICY_BYTES)
    except OSError as e:
        _err(f"cannot read {args.file}: {e.strerror}")
        return 1
    try:
        pol = parse_policy(data, args.file, cas_dns=tuple(args.cas_dns or ("localhost",)))
    except PolicyInvalid as e:
        for p in e.problems:
            print(str(p), file=sys.stderr)
        return 1
    from meshshield.policy import policy_hash

    print(f"{args.file}: valid: session {pol.name}, {len(pol.services)} service(s), "
          f"sha256:{policy_hash(data)}")
    return 0


def _client(args: argparse.Namespace, admin: bool = True) -> Any:
    from meshshield.adminauth import load_admin_key
    from meshshield.casclient import CasClient

    if not args.cas_bundle:
        raise UsageError("this command needs --cas-bundle PEM (the CAS's bundle.pem)")
    key = None
    if admin:
        if not args.admin_key:
            raise UsageError("this command needs --admin-key DIR")
        try:
            key = load_admin_key(Path(args.admin_key))
        except ValueError as e:
            raise UsageError(str(e)) from None
    try:
        return CasClient(args.cas, Path(args.cas_bundle), key)
    except ValueError as e:
        raise UsageError(str(e)) from None


def cmd_policy_apply(args: argparse.Namespace) -> int:
    import yaml

    from meshshield.policy import MAX_POLICY_BYTES
    from meshshield.safeyaml import YamlRefused, guard_yaml

    try:
        data = _read_input(args.file, "policy file", MAX_POLICY_BYTES)
    except OSError as e:
        _err(f"cannot read {args.file}: {e.strerror}")
        return 1
    try:  # only to find the name; the CAS validates the policy itself
        guard_yaml(data.decode("utf-8", "replace"))
        doc = yaml.safe_load(data)
        name = doc.get("name") if isinstance(doc, dict) else None
    except (yaml.YAMLError, YamlRefused):
        name = None
    client = _client(args)
    if isinstance(name, str) and "/" not in name and "?" not in name and (
        doc.get("predecessor") is not None
    ):
        r = client.request("PUT", f"/v1/sessions/{name}", data,
                           content_type="application/yaml", sign=True).json()
        print(f"updated session {r['session']} (policy sha256:{r['policy_hash']}, "
              f"epoch {r['epoch']})")
    else:
        r = client.request("POST", "/v1/sessions", data,
                           content_type="application/yaml", sign=True).json()
        print(f"created session {r['session']} (policy sha256:{r['policy_hash']}, "
              f"epoch {r['epoch']})")
    return 0


def cmd_policy_get(args: argparse.Namespace) -> int:
    client = _client(args)
    r = client.request("GET", f"/v1/sessions/{_name(args.name)}", sign=True)
    sys.stdout.buffer.write(r.body)
    sys.stdout.flush()
    h = r.headers.get("X-Policy-Hash")
    if h:
        print(f"policy sha256:{h}", file=sys.stderr)
    return 0


def _name(name: str) -> str:
    import re

    if not re.fullmatch(r"[a-z0-9-]{1,63}", name):
        raise UsageError(f"session name {name!r} must match [a-z0-9-]{{1,63}}")
    return name


def cmd_revoke(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.serial is not None:
        from meshshield.pki.ca import normalize_serial

        body: dict[str, str | bool]
        try:
            body = {"serial": normalize_serial(args.serial)}
        except ValueError as e:
            raise UsageError(str(e)) from None
        if args.mesh_wide:
            raise UsageError("--mesh-wide applies to --measurement; a serial names one "
                             "certificate, refused everywhere once revoked")
    else:
        body = {"measurement": args.measurement.lower()}
        if args.mesh_wide:
            body["mesh_wide"] = True
    r = client.post_json(f"/v1/sessions/{_name(args.session)}/revocations", body, sign=True)
    if "serial" in r:
        print(f"revoked serial {r['serial']} of session {r['session']} (epoch {r['epoch']})")
    elif r.get("scope") == "mesh-wide":
        print(f"revoked measurement {r['measurement']} mesh-wide (epoch {r['epoch']})")
    else:
        print(f"revoked measurement {r['measurement']} in session {r['session']} only "
              f"(epoch {r['epoch']})")
    return 0


# -- secrets ----------------------------------------------------------------------------


def _secret_path(args: argparse.Namespace, tail: str = "") -> str:
    session = _name(args.session)
    if tail:
        return f"/v1/sessions/{session}/{tail}"
    import re

    if not re.fullmatch(r"[a-z0-9-]{1,63}", args.name):
        raise UsageError(f"secret name {args.name!r} must match [a-z0-9-]{{1,63}}")
    return f"/v1/sessions/{session}/secrets/{args.name}"


def cmd_secret_put(args: argparse.Namespace) -> int:
    from meshshield.policy import SECRET_VALUE_MAX_BYTES

    path = _secret_path(args)
    try:
        value = _read_input(args.from_file, "secret value file", SECRET_VALUE_MAX_BYTES)
    except OSError as e:
        _err(f"cannot read {args.from_file}: {e.strerror}")
        return 1
    r = _client(args).request("PUT", path, value, content_type="application/octet-stream",
                              sign=True).json()
    print(f"stored secret {r['secret']} of session {r['session']} (version {r['version']})")
    return 0


def cmd_secret_rotate(args: argparse.Namespace) -> int:
    r = _client(args).post_json(_secret_path(args) + "/rotation", {}, sign=True)
    print(f"rotated secret {r['secret']} of session {r['session']} (version {r['version']}); "
          "services get the new value at their next attestation")
    return 0


def cmd_secret_audit(args: argparse.Namespace) -> int:
    r = _client(args).request("GET", _secret_path(args, "secret-releases"), sign=True).json()
    if args.json:
        print(json.dumps(r, indent=2, sort_keys=True))
        return 0
    print("AT                    SERVICE              SERIAL                            "
          "MEASUREMENT       SECRETS")
    for rel in r["releases"]:
        names = ",".join(f"{x['name']}@{x['version']}" for x in rel["secrets"])
        print(f"{rel['at']:<21} {rel['service']:<20} {rel['serial']:<33} "
              f"{rel['measurement'][:16]:<17} {names}")
    return 0


# -- keys & measurement ------------------------------------------------------------------


def cmd_admin_keygen(args: argparse.Namespace) -> int:
    from meshshield.adminauth import write_admin_key

    try:
        _key, fp = write_admin_key(Path(args.out))
    except FileExistsError:
        _err(f"{args.out} already holds an admin key; choose another --out")
        return 1
    except OSError as e:
        _err(f"cannot write the admin key to {args.out}: {e.strerror}")
        return 1
    print(fp)
    return 0


def cmd_sim_keygen(args: argparse.Namespace) -> int:
    from meshshield.attestation.sim import (
        generate_sim_platform_key,
        sim_platform_key_id,
        write_sim_platform_key,
    )

    key = generate_sim_platform_key()
    try:
        priv, pub = write_sim_platform_key(key, Path(args.out))
    except (OSError, ValueError) as e:
        _err(f"cannot write the sim platform key: {e}")
        return 1
    print(f"wrote {priv} and {pub} (sim platform key id "
          f"{sim_platform_key_id(key.public_key())}; SIMULATED attestation, no hardware "
          "guarantee)")
    return 0


def cmd_measure(args: argparse.Namespace) -> int:
    from meshshield.attestation.measure import MeasureError, measure_paths

    try:
        print(measure_paths(args.paths))
    except MeasureError as e:
        _err(str(e))
        return 1
    return 0


# -- CAS ---------------------------------------------------------------------------------


def _install_uvloop() -> None:
    """uvloop when installed, unless MESHSHIELD_EVENT_LOOP=asyncio asks for the default."""
    if os.environ.get("MESHSHIELD_EVENT_LOOP") == "asyncio":
        return
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"--listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8443")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - operator's choice


_DNS_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"


def _cas_names(trust_domain: str, dns: Sequence[str]) -> tuple[str, tuple[str, ...]]:
    """--trust-domain and --dns checked at once (not when the CA is made)."""
    import ipaddress
    import re

    from meshshield.pki.spiffe import validate_trust_domain

    try:
        validate_trust_domain(trust_domain)
    except ValueError as e:
        raise UsageError(f"--trust-domain {trust_domain!r}: {e}") from None
    names = []
    for name in dns:
        try:
            ipaddress.ip_address(name)
        except ValueError:
            if len(name) > 253 or not re.fullmatch(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*",
                                                   name.lower().rstrip(".").removeprefix("*.")):
                raise UsageError(f"--dns {name!r}: expected a DNS name (e.g. cas.mesh.example)"
                                 " or an IP address") from None
        names.append(name.lower().rstrip("."))
    return trust_domain, tuple(names)


def _connection_limits(args: argparse.Namespace) -> ConnectionLimits:
    from meshshield.httpserver import ConnectionLimits

    kw: dict[str, Any] = {}
    for name in ("max_connections", "max_handshakes"):
        text = getattr(args, name)
        if text is not None:
            if not text.isdigit() or int(text) < 1:
                raise UsageError(f"--{name.replace('_', '-')} {text!r}: expected a count >= 1")
            kw[name] = int(text)
    for name in ("handshake_timeout", "header_timeout", "body_timeout", "idle_timeout"):
        text = getattr(args, name)
        if text is not None:
            kw[name] = _duration_flag(text, f"--{name.replace('_', '-')}", minimum=0.1,
                                      maximum=86400)
    try:
        return ConnectionLimits(**kw)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _connection_flags(p: argparse.ArgumentParser) -> None:
    from meshshield.httpserver import ConnectionLimits

    d = ConnectionLimits()
    g = p.add_argument_group("client connections")
    g.add_argument("--max-connections", metavar="N",
                   help=f"open client connections at most (default {d.max_connections}; "
                   "each sidecar holds one); when full, the oldest idle one is closed")
    g.add_argument("--max-handshakes", metavar="N",
                   help=f"TLS handshakes in progress at most (default {d.max_handshakes})")
    g.add_argument("--handshake-timeout", metavar="DURATION",
                   help=f"to finish the TLS handshake (default {d.handshake_timeout:g}s)")
    g.add_argument("--header-timeout", metavar="DURATION",
                   help=f"to send a request's headers (default {d.header_timeout:g}s)")
    g.add_argument("--body-timeout", metavar="DURATION",
                   help=f"to send a request's body (default {d.body_timeout:g}s)")
    g.add_argument("--idle-timeout", metavar="DURATION",
                   help=f"keep-alive between requests (default {d.idle_timeout:g}s)")


def cmd_cas_serve(args: argparse.Namespace) -> int:
    import asyncio

    from meshshield.attestation.sim import SimKeyError, load_sim_public_key
    from meshshield.cas.authority import CasConfig
    from meshshield.cas.server import default_kek_path, serve, state_files
    from meshshield.cas.stores import check_database_flag, is_postgres
    from meshshield.pki.seal import SealedKeyError, load_kek, load_or_create_kek

    problem = check_database_flag(args.database)
    if problem:
        raise UsageError(problem)
    host, port = _listen(args.listen)
    nonce_ttl = _duration_flag(args.nonce_ttl, "--nonce-ttl", minimum=1, maximum=3600)
    max_ttl = (_duration_flag(args.max_cert_ttl, "--max-cert-ttl", minimum=1,
                              maximum=86400) if args.max_cert_ttl else None)
    trust_domain, dns = _cas_names(args.trust_domain, args.dns or ("localhost",))
    if args.collateral and not Path(args.collateral).is_dir():
        raise UsageError(f"--collateral {args.collateral}: not a folder")
    if Path(args.data).exists() and not Path(args.data).is_dir():
        raise UsageError(f"--data {args.data}: not a folder")
    limits = _connection_limits(args)
    fps = []
    for fp in args.admin_fingerprint or []:
        fp = fp.lower().removeprefix("sha256:")
        if len(fp) != 64 or any(c not in "0123456789abcdef" for c in fp):
            raise UsageError(f"--admin-fingerprint {fp!r}: expected 64 hex digits")
        fps.append(fp)
    try:
        sim_keys = tuple(load_sim_public_key(p) for p in args.trust_sim_platform or [])
    except SimKeyError as e:
        raise UsageError(str(e)) from None
    data = Path(args.data)
    explicit_kek = bool(args.kek_file or os.environ.get("MESHSHIELD_CAS_KEK_FILE"))
    if args.platform and not explicit_kek:
        # An attested CAS keeps its KEK in the store, sealed to its TEE (cas/kekstore.py).
        return _cas_serve_attested(args, host, port, limits, trust_domain, dns, fps,
                                   sim_keys, nonce_ttl, max_ttl)
    if getattr(args, "recovery_key_private", None) or args.peer or args.recovery_key:
        raise UsageError("--peer, --recovery-key and cas recover are for an attested CAS "
                         "(--platform, no --kek-file) that keeps its KEK in the store; a CAS "
                         "with a KEK file uses that file (--expect alone lets it hand its "
                         "KEK to attested replicas)")
    expect = _cas_kek_expect(args)  # before any state is made: a bad file creates none
    kek_path = Path(
        args.kek_file or os.environ.get("MESHSHIELD_CAS_KEK_FILE") or default_kek_path(data)
    )
    # The KEK is created on a first start only: with state present, a new one could
    # never open the sealed CA key, so a missing one is restored, never replaced.
    # With PostgreSQL the state is the database's records (and a bundle.pem in --data).
    holder = str(data)
    if is_postgres(args.database):
        from meshshield.cas.stores import where

        holder = f"{data} and the database {where(args.database, data)}"
        try:
            found = [*(["bundle.pem"] if (data / "bundle.pem").is_file() else []),
                     *_database_records(args.database, data)]
        except MeshError as e:
            _err(e.message)
            return 1
    else:
        found = state_files(data) if data.is_dir() else []
    if not found and not explicit_kek and kek_path.exists():
        # A KEK the CAS made itself beside its data folder outlives only a lost data
        # folder: initialising now would silently start a new mesh. A KEK provisioned
        # by the operator (--kek-file, a Kubernetes secret) is expected before a first start.
        _err(f"{holder} holds no CAS state, but the key-encryption secret {kek_path} this "
             "CAS created beside it exists: the data folder was lost or moved. Restore it "
             f"from its backup, or, to start a new mesh on purpose, remove {kek_path}")
        return 1
    try:
        kek = load_kek(kek_path) if found else load_or_create_kek(kek_path)
    except FileNotFoundError:
        _err(f"key-encryption secret {kek_path} is missing, but {holder} holds CAS state "
             f"({', '.join(found)}) sealed under it; restore the KEK file from its backup "
             "or secret store (or point --kek-file / MESHSHIELD_CAS_KEK_FILE at it) and "
             "start again. A new KEK cannot open the existing CA key, so none is created")
        return 1
    except (OSError, ValueError, MeshError) as e:
        _err(f"key-encryption secret {kek_path}: {e}")
        return 1
    config = CasConfig(
        data_dir=data,
        trust_domain=trust_domain,
        dns=dns,
        admin_fingerprints=frozenset(fps),
        sim_platform_keys=sim_keys,
        collateral_dir=Path(args.collateral) if args.collateral else None,
        nonce_ttl=nonce_ttl,
        max_cert_ttl=max_ttl,
        kek=kek,
        database=args.database if is_postgres(args.database) else None,
    )
    if sim_keys:
        print("WARNING: trusting sim platform keys: SIMULATED attestation has no hardware "
              "guarantee; use it for development only", file=sys.stderr, flush=True)
    self_attest = _cas_self_attest(args)
    _install_uvloop()
    try:
        asyncio.run(serve(config, host, port, limits, self_attest, expect))
    except OSError as e:
        _err(f"cannot serve on {args.listen}: {e.strerror or e}")
        return 1
    except SealedKeyError as e:
        _err(f"{e.message}. Key-encryption secret used: {kek_path}; restore the KEK file "
             f"this data folder was created with (from its backup or secret store), or "
             "restore the data folder that matches this KEK")
        return 1
    except MeshError as e:
        _err(e.message)
        return 1
    return 0


def _cas_kek_expect(args: argparse.Namespace) -> Any:
    """`--expect FILE`: what a CAS replica must run to be given the KEK (and to give it)."""
    from meshshield.casverify import load_expectation
    from meshshield.policy import PolicyInvalid

    if not args.expect:
        if args.peer:
            raise UsageError("--peer needs --expect FILE: the replica to recover the KEK "
                             "from is verified against it first")
        return None
    try:
        return load_expectation(args.expect)
    except ValueError as e:
        raise UsageError(str(e)) from None
    except PolicyInvalid as e:
        raise UsageError("\n".join(str(p) for p in e.problems)) from None


def _cas_serve_attested(
    args: argparse.Namespace, host: str, port: int, limits: Any, trust_domain: str,
    dns: tuple[str, ...], fps: list[str], sim_keys: tuple[Any, ...], nonce_ttl: float,
    max_ttl: float | None,
) -> int:
    """`cas serve --platform ...` without --kek-file (and `cas recover`): the KEK from
    the store's wraps or a peer replica (cas/kekstore.py), never from a file."""
    import asyncio

    from meshshield.attestation.collateral import load_collateral
    from meshshield.attestation.verify import VerifierConfig
    from meshshield.cas.authority import CasConfig
    from meshshield.cas.kekstore import KekPlan, KekUnavailable, obtain_kek
    from meshshield.cas.recoverykey import load_recovery_private, load_recovery_public
    from meshshield.cas.sealing import SealingUnavailable, sealing_for
    from meshshield.cas.selfattest import SelfAttestation
    from meshshield.cas.server import serve
    from meshshield.cas.stores import is_postgres, open_store
    from meshshield.casverify import split_url
    from meshshield.pki.seal import SealedKeyError

    expect = _cas_kek_expect(args)
    try:
        for url in args.peer or []:
            split_url(url)
        recovery = tuple(load_recovery_public(p) for p in args.recovery_key or [])
        private = tuple(k for p in getattr(args, "recovery_key_private", None) or []
                        for k in load_recovery_private(p))
    except ValueError as e:
        raise UsageError(str(e).replace("--cas", "--peer")) from None
    peer_timeout = _duration_flag(args.peer_timeout, "--peer-timeout", minimum=1,
                                  maximum=3600)
    if args.collateral and not Path(args.collateral).is_dir():
        raise UsageError(f"--collateral {args.collateral}: not a folder")
    collateral = load_collateral(Path(args.collateral)) if args.collateral else None
    verifier = VerifierConfig(sim_platform_keys=sim_keys, collateral=collateral)
    if sim_keys:
        print("WARNING: trusting sim platform keys: SIMULATED attestation has no hardware "
              "guarantee; use it for development only", file=sys.stderr, flush=True)
    try:
        attestation = SelfAttestation(_cas_self_attest(args), verifier)
    except MeshError as e:
        _err(e.message)
        return 1
    claims = attestation.claims
    try:
        sealing = sealing_for(attestation.config.platform,
                              None if claims is None else claims.measurement,
                              attestation._sim_key)
    except (ValueError, SealingUnavailable) as e:
        _err(str(e))
        return 1
    plan = KekPlan(sealing=sealing, platform=attestation.config.platform,
                   evidence_of=attestation.evidence, peers=tuple(args.peer or ()),
                   expect=expect, verifier=verifier, recovery_keys=recovery,
                   recovery_private=private, peer_timeout=peer_timeout)
    data = Path(args.data)
    data.mkdir(parents=True, exist_ok=True, mode=0o700)
    database = args.database if is_postgres(args.database) else None

    def say(line: str) -> None:
        from meshshield.status import clean

        print(clean(line), file=sys.stderr, flush=True)  # peers' words are untrusted

    try:
        store = open_store(database, data)
        try:
            outcome = obtain_kek(store, plan, say=say)
        finally:
            store.close()
    except KekUnavailable as e:
        _err(e.message)
        return 1
    except MeshError as e:
        _err(e.message)
        return 1
    config = CasConfig(
        data_dir=data, trust_domain=trust_domain, dns=dns, admin_fingerprints=frozenset(fps),
        sim_platform_keys=sim_keys, collateral_dir=Path(args.collateral) if args.collateral
        else None, nonce_ttl=nonce_ttl, max_cert_ttl=max_ttl, kek=outcome.kek,
        database=database)
    print(f"kek {outcome.source}; {outcome.sealing}", flush=True)
    _install_uvloop()
    try:
        asyncio.run(serve(config, host, port, limits, attestation, expect, outcome))
    except OSError as e:
        _err(f"cannot serve on {args.listen}: {e.strerror or e}")
        return 1
    except (SealedKeyError, MeshError) as e:
        _err(e.message)
        return 1
    return 0


def cmd_cas_recovery_key(args: argparse.Namespace) -> int:
    from meshshield.cas.recoverykey import write_recovery_key

    try:
        priv, pub, fp = write_recovery_key(Path(args.out))
    except (FileExistsError, OSError) as e:
        _err(f"cannot write the recovery key in {args.out}: {getattr(e, 'strerror', None) or e}")
        return 1
    print(f"recovery key sha256:{fp}\npublic  {pub} (give it to `cas serve --recovery-key`)"
          f"\nprivate {priv} (keep it offline; `cas recover --recovery-key-private`)")
    return 0


def _database_records(database: str, data: Path) -> list[str]:
    """What the database holds ("2 sessions", ...): empty for a first start."""
    from meshshield.cas.stores import open_store

    store = open_store(database, data)
    try:
        counts = store.record_counts()
    finally:
        store.close()
    return [f"{n} {kind}{'' if n == 1 else 's'}" for kind, n in counts.items() if n]


def _store_flags(args: argparse.Namespace) -> tuple[str | None, Path]:
    from meshshield.cas.stores import check_database_flag

    problem = check_database_flag(args.database)
    if problem:
        raise UsageError(problem)
    return args.database, Path(args.data or ".")


def cmd_cas_migrate(args: argparse.Namespace) -> int:
    from meshshield.cas.stores import open_store, where

    database, data = _store_flags(args)
    store = open_store(database, data, migrate=True, create=False)
    try:
        applied: list[int] = getattr(store, "applied", [])
        version: int = store.schema_version()  # type: ignore[attr-defined]
    finally:
        store.close()
    done = f"applied {', '.join(map(str, applied))}" if applied else "already current"
    print(f"{where(database, data)}: schema version {version} ({done})")
    return 0


def cmd_cas_backup(args: argparse.Namespace) -> int:
    from meshshield.cas.backup import make_backup, write_backup
    from meshshield.cas.stores import open_store, where

    database, data = _store_flags(args)
    out = Path(args.out)
    if out.exists():
        _err(f"--out {out} exists; a backup never replaces a file: choose another name")
        return 1
    store = open_store(database, data, create=False)
    try:
        doc = make_backup(store, datetime.now(UTC))  # type: ignore[arg-type]
    finally:
        store.close()
    if not doc["ca_fingerprints"]:
        _err(f"{where(database, data)} holds no CA: it is not the store of a CAS that has "
             "started, so there is nothing to back up; check --database / --data")
        return 1
    try:
        write_backup(doc, out)
    except OSError as e:
        _err(f"cannot write the backup to {out}: {e.strerror or e}")
        return 1
    counts = {name: len(t["rows"]) for name, t in doc["tables"].items()}
    print(f"backed up {where(database, data)} (epoch {doc['epoch']}, CA "
          f"{', '.join('sha256:' + fp for fp in doc['ca_fingerprints'])}; "
          f"{counts['sessions']} sessions, {counts['policy_history']} policy versions, "
          f"{counts['certificates']} certificates, {counts['revocations']} revocations) to "
          f"{out}. The CA key in it is sealed under the CAS's key-encryption secret: keep "
          "that secret's backup apart from this file")
    return 0


def cmd_cas_restore(args: argparse.Namespace) -> int:
    from meshshield.cas.backup import MAX_BACKUP_BYTES, parse_backup, restore
    from meshshield.cas.stores import is_postgres, open_store, where

    database, data = _store_flags(args)
    try:
        raw = _read_input(args.input, "--in", MAX_BACKUP_BYTES)
    except OSError as e:
        _err(f"cannot read {args.input}: {e.strerror}")
        return 1
    doc, rows = parse_backup(raw, args.input)
    if not is_postgres(database):
        if data.exists() and not data.is_dir():
            raise UsageError(f"--data {data}: not a folder")
        data.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = open_store(database, data)
    try:
        epoch = restore(store, doc, rows, datetime.now(UTC))  # type: ignore[arg-type]
    finally:
        store.close()
    print(f"restored {args.input} into {where(database, data)} (CA "
          f"{', '.join('sha256:' + fp for fp in doc['ca_fingerprints'])}; epoch {epoch}). "
          "Start the CAS with the key-encryption secret (--kek-file) of the CAS this backup "
          "came from: the CA key is sealed under it")
    return 0


def _cas_self_attest(args: argparse.Namespace) -> Any:
    """`cas serve`'s own evidence flags (the sidecar's), or None for an unattested CAS."""
    from meshshield.attestation.claims import Platform
    from meshshield.cas.selfattest import SelfAttestConfig

    if args.platform is None:
        if args.workload or args.sim_key or args.evidence_source or args.coco_aa_url:
            raise UsageError("--workload, --sim-key, --evidence-source and --coco-aa-url "
                             "are the CAS's own evidence settings; they need --platform")
        print("WARNING: this CAS is not attested (no --platform): clients cannot verify "
              "what it runs, and `meshshield cas verify` refuses it", file=sys.stderr,
              flush=True)
        return None
    if args.platform == "sim":
        if not args.sim_key or not args.workload:
            raise UsageError("--platform sim needs --sim-key FILE and --workload PATH")
        print("WARNING: the CAS's own attestation is SIMULATED (--platform sim): no "
              "hardware guarantee; development only", file=sys.stderr, flush=True)
    return SelfAttestConfig(
        platform=Platform(args.platform), workload=tuple(args.workload or ()),
        sim_key=Path(args.sim_key) if args.sim_key else None,
        evidence_source=args.evidence_source, coco_aa_url=args.coco_aa_url,
    )


def _cas_evidence_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("the CAS's own attestation (as the sidecar's evidence flags)")
    g.add_argument("--platform", choices=["sim", "sev-snp", "tdx", "sgx"],
                   help="the TEE this CAS runs in; without it the CAS is not attested")
    g.add_argument("--workload", action="append", metavar="PATH",
                   help="sim: the files whose measurement the CAS attests")
    g.add_argument("--sim-key", metavar="FILE", help="sim: sim-platform.key")
    g.add_argument("--evidence-source", choices=["configfs-tsm", "coco-aa", "gramine"],
                   help="hardware evidence source (default: as MESHSHIELD_EVIDENCE_SOURCE, "
                   "else chosen by platform)")
    g.add_argument("--coco-aa-url", metavar="URL",
                   help="the CoCo attestation agent (default: MESHSHIELD_COCO_AA_URL)")


def _cas_kek_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("the attested CAS's key-encryption key (with --platform and "
                             "no --kek-file)")
    g.add_argument("--expect", metavar="FILE",
                   help="YAML (as cas verify's): what a CAS replica must run to be given "
                   "this CAS's KEK, and what the --peer replicas must run")
    g.add_argument("--peer", action="append", metavar="URL",
                   help="a running replica to recover the KEK from (repeatable)")
    g.add_argument("--peer-timeout", default="60s", metavar="DURATION",
                   help="give up peer recovery after this long (default 60s)")
    g.add_argument("--recovery-key", action="append", metavar="PUB.pem",
                   help="also keep the KEK encrypted to this recovery public key "
                   "(repeatable; `meshshield cas recovery-key` makes one)")


def cmd_cas_verify(args: argparse.Namespace) -> int:
    """Verify the CAS's own attestation against --expect; only then write its bundle."""
    from meshshield.attestation.collateral import load_collateral
    from meshshield.attestation.sim import SimKeyError
    from meshshield.attestation.verify import VerifierConfig
    from meshshield.casverify import load_expectation, sim_keys, split_url, verify_cas
    from meshshield.policy import PolicyInvalid

    try:
        split_url(args.cas)
        keys = sim_keys(args.trust_sim_platform or [])
    except (ValueError, SimKeyError) as e:
        raise UsageError(str(e)) from None
    if args.collateral and not Path(args.collateral).is_dir():
        raise UsageError(f"--collateral {args.collateral}: not a folder")
    timeout = _duration_flag(args.timeout, "--timeout", minimum=0.1, maximum=300)
    try:
        expect = load_expectation(args.expect)
    except ValueError as e:
        raise UsageError(str(e)) from None
    except PolicyInvalid as e:
        for p in e.problems:
            print(str(p), file=sys.stderr)
        return 1
    collateral = load_collateral(Path(args.collateral)) if args.collateral else None
    verifier = VerifierConfig(sim_platform_keys=keys, collateral=collateral)
    try:
        result = verify_cas(args.cas, expect, verifier, timeout=timeout)
    except MeshError as e:
        if args.json:
            print(json.dumps({"cas": args.cas, "verified": False, "reason": e.reason.value,
                              "message": e.message}, sort_keys=True))
        _err(f"refused the CAS at {args.cas}: {e.reason.value}: {e.message}")
        return 1
    doc = result.to_json()
    if args.out:
        from meshshield.attestclient import write_public_file

        try:
            write_public_file(Path(args.out), result.bundle_pem.encode())
        except OSError as e:
            _err(f"cannot write {args.out}: {e.strerror}")
            return 1
        doc["out"] = args.out
    if args.json:
        print(json.dumps(doc, sort_keys=True))
    else:
        print(result.summary())
        if result.simulated:
            print("WARNING: the CAS's attestation is SIMULATED: no hardware guarantee",
                  file=sys.stderr)
        if args.out:
            print(f"wrote {args.out}: the attested CAS's bundle")
    return 0


def cmd_cas_rotate(args: argparse.Namespace) -> int:
    after = _duration_flag(args.activate_after, "--activate-after", minimum=1,
                           maximum=30 * 86400)
    body: dict[str, object] = {"force": True} if args.force else {"activate_after_seconds": after}
    r = _client(args).post_json("/v1/ca/rotate", body, sign=True)
    for ca in r["cas"]:
        print(f"{ca['state']:8} sha256:{ca['fingerprint']} signing={ca['signing']} "
              f"activate_at={ca['activate_at']} retire_after={ca['retire_after']}")
    return 0


# -- attest ------------------------------------------------------------------------------


def cmd_attest(args: argparse.Namespace) -> int:
    from meshshield.attestclient import AttestRequest, attest_once, write_attest_output

    client = _client(args, admin=False)
    req = AttestRequest(
        session=args.session,
        service=args.service,
        platform=args.platform,
        workload=tuple(args.workload or ()),
        sim_key=Path(args.sim_key) if args.sim_key else None,
    )
    result = attest_once(client, req)
    paths = write_attest_output(Path(args.out), result)
    sim = result.response["claims"]["simulated"]
    print(f"attested {result.response['spiffe_id']} until {result.response['expires_at']}"
          f"{' (SIMULATED: no hardware guarantee)' if sim else ''}")
    print(f"wrote {', '.join(str(p) for p in paths)}; key.pem holds the PRIVATE KEY "
          "(a debugging aid: a sidecar never writes its key)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from meshshield.attestclient import AttestRequest
    from meshshield.runsecrets import exec_program, prepare

    command = list(args.command_line or [])
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise UsageError("name the program to run after --: meshshield run ... -- CMD ARGS")
    req = AttestRequest(
        session=_name(args.session), service=_name(args.service), platform=args.platform,
        workload=tuple(args.workload or ()),
        sim_key=Path(args.sim_key) if args.sim_key else None,
    )
    env = prepare(_client(args, admin=False), req,
                  Path(args.secrets_dir) if args.secrets_dir else None,
                  args.secrets_dir_on_disk, dict(os.environ))
    try:
        exec_program(command, env)
    except OSError as e:
        _err(f"cannot run {command[0]}: {e.strerror or e}")
    return 1


def cmd_bundle(args: argparse.Namespace) -> int:
    """Fetch the mesh trust bundle, as PEM or as a SPIFFE bundle document (JWK Set)."""
    from meshshield.pki.ca import load_pem_chain
    from meshshield.pki.spiffe_bundle import SpiffeBundleError, x509_authorities

    client = _client(args, admin=False)
    if args.format == "spiffe":
        doc = client.request("GET", "/v1/bundle/spiffe").json()
        try:
            cas = x509_authorities(doc)
        except SpiffeBundleError as e:
            _err(f"the CAS's SPIFFE bundle is invalid: {e}")
            return 1
        text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
        what = f"SPIFFE bundle, sequence {doc.get('spiffe_sequence')}"
    else:
        body = client.request("GET", "/v1/bundle").json()
        pem = body.get("bundle") if isinstance(body, dict) else None
        text = pem if isinstance(pem, str) else ""
        try:
            cas = load_pem_chain(text)
        except ValueError as e:
            _err(f"the CAS's bundle is invalid: {e}")
            return 1
        what = f"PEM bundle of trust domain {body.get('trust_domain')}, epoch {body.get('epoch')}"
    if not cas:
        _err("the CAS's bundle holds no X.509 CA certificate")
        return 1
    if args.out is None:
        sys.stdout.write(text)
        return 0
    try:
        Path(args.out).write_text(text)
    except OSError as e:
        _err(f"cannot write {args.out}: {e.strerror}")
        return 1
    print(f"wrote {args.out}: {what}, {len(cas)} CA certificate(s)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from meshshield.dev.demo import run_demo

    return run_demo()


def cmd_evidence_verify(args: argparse.Namespace) -> int:
    from meshshield.attestation.claims import Platform
    from meshshield.attestation.collateral import load_collateral
    from meshshield.attestation.sgx import verify_sgx_quote
    from meshshield.attestation.snp import verify_snp_evidence, verify_snp_report
    from meshshield.attestation.tdx import verify_tdx_quote
    from meshshield.attestation.verify import VerifierConfig, verify_evidence
    from meshshield.clock import parse_rfc3339
    from meshshield.errors import EvidenceError, Reason

    try:
        at = parse_rfc3339(args.at) if args.at else datetime.now(UTC)
    except ValueError as e:
        raise UsageError(f"--at: {e}") from None
    platform = Platform(args.platform)
    if args.certs and platform is not Platform.SEV_SNP:
        raise UsageError(f"--certs is for sev-snp; {platform.value} quotes carry their PCK chain")
    if args.collateral and not Path(args.collateral).is_dir():
        raise UsageError(f"--collateral {args.collateral}: not a folder")
    try:
        data = _read_input(args.file, "evidence file", MAX_EVIDENCE_BYTES)
        certs = _read_input(args.certs, "--certs", MAX_EVIDENCE_BYTES) if args.certs else None
    except OSError as e:
        _err(f"cannot read {e.filename}: {e.strerror}")
        return 1
    collateral = load_collateral(Path(args.collateral)) if args.collateral else None
    # Raw reports and quotes start with their version (2-5); only JSON starts with "{".
    if data.lstrip()[:1] == b"{":
        try:
            evidence = json.loads(data)
        except (ValueError, RecursionError):
            raise EvidenceError(
                Reason.EVIDENCE_MALFORMED, f"{args.file} starts with '{{' but is not valid JSON"
            ) from None
        if platform is Platform.SEV_SNP:
            claims = verify_snp_evidence(evidence, at=at, extra_certs=certs)
        else:
            claims = verify_evidence(platform, evidence, VerifierConfig(collateral=collateral), at)
    elif platform is Platform.SEV_SNP:
        if certs is None:
            raise UsageError("--platform sev-snp with a raw report needs --certs (VCEK or VLEK)")
        claims = verify_snp_report(data, certs, at=at)
    elif platform is Platform.TDX:
        claims = verify_tdx_quote(data, at=at, collateral=collateral)
    else:
        claims = verify_sgx_quote(data, at=at, collateral=collateral)
    out = claims.to_json()
    if args.json:
        print(json.dumps(out, sort_keys=True))
    else:
        print(f"verified {platform.value} evidence at {at.isoformat()}")
        for k, v in out.items():
            print(f"  {k}: {json.dumps(v) if not isinstance(v, str) else v}")
    return 0


def cmd_sidecar(args: argparse.Namespace) -> int:
    import asyncio

    from meshshield.sidecar.config import ConfigError, build_config, load_config_file
    from meshshield.sidecar.main import run_sidecar

    flags = {
        "cas": args.cas, "cas_bundle": args.cas_bundle, "session": args.session,
        "service": args.service, "platform": args.platform, "workload": args.workload,
        "sim_key": args.sim_key, "inbound": args.inbound, "outbound": args.outbound,
        "admin_listen": args.admin_listen, "health_listen": args.health_listen,
        "max_connections": args.max_connections, "max_handshakes": args.max_handshakes,
        "max_handshakes_per_source": args.max_handshakes_per_source,
        "handshake_timeout": args.handshake_timeout,
        "drain_timeout": args.drain_timeout,
        "workload_api": args.workload_api, "workload_api_group": args.workload_api_group,
        "idle_timeout": args.idle_timeout,
        "max_connection_lifetime": args.max_connection_lifetime,
        "sds": args.sds,
        "cas_expect": args.cas_expect, "cas_trust_sim_platform": args.cas_trust_sim_platform,
        "dataplane": args.dataplane, "workers": args.workers,
        "secrets_dir": args.secrets_dir, "secrets_dir_on_disk": args.secrets_dir_on_disk or None,
    }
    try:
        values = load_config_file(Path(args.config)) if args.config else {}
        values.update({k: v for k, v in flags.items() if v is not None})
        config = build_config(values)
        if config.cas_bundle is not None and not config.cas_bundle.is_file():
            raise ConfigError(f"--cas-bundle {config.cas_bundle}: no such file")
        from meshshield.sidecar.castrust import check_trust_settings

        check_trust_settings(config)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    _install_uvloop()
    try:
        return asyncio.run(run_sidecar(config))
    except OSError as e:
        _err(f"sidecar {config.session}/{config.service}: {e.strerror or e}")
        return 1
    except MeshError as e:  # e.g. a Workload API socket directory that is not safe
        _err(f"sidecar {config.session}/{config.service}: {e.reason.value}: {e.message}")
        return 1


def cmd_status(args: argparse.Namespace) -> int:
    import time
    import urllib.error

    from meshshield import status

    if bool(args.sidecar) == bool(args.cas):
        raise UsageError("give either --sidecar URL or --cas URL (with --cas-bundle, --admin-key)")
    timeout = _duration_flag(args.timeout, "--timeout", minimum=0.1, maximum=300)
    interval = _duration_flag(args.interval, "--interval", minimum=0.1, maximum=3600)
    try:
        base = status.check_url(args.sidecar or args.cas, "--sidecar" if args.sidecar
                                else "--cas")
    except ValueError as e:
        raise UsageError(str(e)) from None
    rounds = 0
    while True:
        try:
            if args.sidecar:
                doc, text = status.render_sidecar(base, timeout=timeout)
            else:
                client = _client(args)
                doc = client.request("GET", "/v1/edges", sign=True).json()
                text = status.table(status.EDGE_HEADERS, status.edge_rows(doc))
                cas_line, cas_doc = _cas_attestation_line(client)
                text = f"{cas_line}\n{text}"
                doc = {**doc, "cas_attestation": cas_doc} if isinstance(doc, dict) else doc
        except (urllib.error.URLError, OSError, ValueError, status.StatusError) as e:
            _err(f"cannot read {base}: {status.fetch_error(e)}")
            return 1
        if args.watch:
            print("\x1b[2J\x1b[H", end="")
        print(json.dumps(doc, indent=2, sort_keys=True) if args.json else text, flush=True)
        rounds += 1
        if not args.watch:
            return 0
        time.sleep(interval)


def _cas_attestation_line(client: Any) -> tuple[str, dict[str, Any]]:
    """What the CAS says it runs (platform, measurement, TCB status, simulated), as one
    line and as JSON; self-reported here, checked by `meshshield cas verify`."""
    import base64

    try:
        doc = client.post_json("/v1/cas/attestation",
                               {"nonce": base64.b64encode(os.urandom(32)).decode()})
        me = doc.get("self_reported") if isinstance(doc, dict) else None
    except MeshError as e:
        if e.reason.value == "cas_not_attested":
            return "CAS: NOT ATTESTED (started without --platform)", {"attested": False}
        return f"CAS: attestation unavailable ({e.reason.value})", {"attested": None}
    if not isinstance(me, dict):
        return "CAS: attestation answer without self_reported", {"attested": None}
    from meshshield.status import clean

    out = {k: me.get(k) for k in ("platform", "measurement", "tcb_status", "simulated",
                                  "debug")}
    label = " SIMULATED (no hardware guarantee)" if me.get("simulated") else ""
    line = (f"CAS: platform {clean(str(out['platform']))}{label}, measurement "
            f"{clean(str(out['measurement']))}, tcb_status {clean(str(out['tcb_status']))} "
            "(self-reported; `meshshield cas verify --expect FILE` checks it)")
    kek = me.get("kek")
    if isinstance(kek, dict):
        shown = {k: str(kek.get(k))[:300] for k in ("source", "sealing")}
        out["kek"] = shown
        line += (f"\nCAS key-encryption key: from {clean(shown['source'])}; "
                 f"{clean(shown['sealing'])}")
    return line, {"attested": True, **out, "verified": False}


def cmd_dev_up(args: argparse.Namespace) -> int:
    from meshshield.dev.devfile import MAX_DEV_FILE_BYTES, DevFileInvalid, parse_dev_file
    from meshshield.dev.devup import run_dev_up

    path = Path(args.file)
    try:
        text = _read_input(args.file, "-f", MAX_DEV_FILE_BYTES).decode("utf-8")
    except OSError as e:
        _err(f"cannot read {args.file}: {e.strerror}")
        return 1
    except UnicodeDecodeError as e:
        _err(f"{args.file}: not UTF-8 text (offset {e.start})")
        return 1
    try:
        dev = parse_dev_file(path, text)
    except DevFileInvalid as e:
        for p in e.problems:
            print(p, file=sys.stderr)
        return 1
    state = Path(args.state) if args.state else path.parent / ".meshshield-dev"
    return run_dev_up(dev, state)


# -- parser ------------------------------------------------------------------------------


def _cas_flags(p: argparse.ArgumentParser, admin: bool = True) -> None:
    p.add_argument("--cas", required=True, help="CAS URL, e.g. https://127.0.0.1:8443")
    p.add_argument("--cas-bundle", required=True, help="PEM trust bundle of the CAS")
    if admin:
        p.add_argument("--admin-key", required=True, help="folder made by `admin keygen`")


def _attester_flags(p: argparse.ArgumentParser) -> None:
    """What a one-off attestation needs (`attest`, `run`): the CAS, who, and the TEE."""
    _cas_flags(p, admin=False)
    p.add_argument("--session", required=True)
    p.add_argument("--service", required=True)
    p.add_argument("--platform", required=True, choices=["sim", "sev-snp", "tdx", "sgx"])
    p.add_argument("--workload", action="append", metavar="PATH")
    p.add_argument("--sim-key", metavar="FILE")


def build_parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="meshshield", description=__doc__.splitlines()[0])
    top.add_argument("--log-level", default=os.environ.get("MESHSHIELD_LOG", "info"))
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pol = sub.add_parser("policy", help="validate, apply and fetch session policies")
    psub = pol.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    p = psub.add_parser("validate", help="check a policy file offline")
    p.add_argument("file")
    p.add_argument("--cas-dns", action="append", metavar="NAME",
                   help="a DNS name the CAS serves (reserved; default: localhost)")
    p.set_defaults(func=cmd_policy_validate)
    p = psub.add_parser("apply", help="create a session, or update it (predecessor set)")
    p.add_argument("file")
    _cas_flags(p)
    p.set_defaults(func=cmd_policy_apply)
    p = psub.add_parser("get", help="print a session's current policy")
    p.add_argument("name")
    _cas_flags(p)
    p.set_defaults(func=cmd_policy_get)

    p = sub.add_parser("revoke", help="revoke a certificate serial or a measurement")
    p.add_argument("session")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--serial")
    g.add_argument("--measurement", help="revoked in SESSION only, unless --mesh-wide")
    p.add_argument("--mesh-wide", action="store_true",
                   help="revoke the measurement in every session (a CAS admin key only)")
    _cas_flags(p)
    p.set_defaults(func=cmd_revoke)

    sec = sub.add_parser("secret", help="upload, rotate and audit a session's secrets")
    ssub = sec.add_subparsers(dest="secret_command", required=True, metavar="ACTION")
    p = ssub.add_parser("put", help="upload the value of a `kind: value` secret")
    p.add_argument("session")
    p.add_argument("name")
    p.add_argument("--from-file", required=True, metavar="FILE", help="the value (- for stdin)")
    _cas_flags(p)
    p.set_defaults(func=cmd_secret_put)
    p = ssub.add_parser("rotate", help="replace a generated secret with a fresh value")
    p.add_argument("session")
    p.add_argument("name")
    _cas_flags(p)
    p.set_defaults(func=cmd_secret_rotate)
    p = ssub.add_parser("audit", help="every release of the session's secrets")
    p.add_argument("session")
    p.add_argument("--json", action="store_true")
    _cas_flags(p)
    p.set_defaults(func=cmd_secret_audit)

    adm = sub.add_parser("admin", help="admin keys")
    asub = adm.add_subparsers(dest="admin_command", required=True, metavar="ACTION")
    p = asub.add_parser("keygen", help="make an admin key; prints its fingerprint")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_admin_keygen)

    sim = sub.add_parser("sim", help="simulated attestation (development only)")
    ssub = sim.add_subparsers(dest="sim_command", required=True, metavar="ACTION")
    p = ssub.add_parser("keygen", help="make a sim platform key pair")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_sim_keygen)

    p = sub.add_parser("measure", help="print the sim measurement of files and folders")
    p.add_argument("paths", nargs="+")
    p.set_defaults(func=cmd_measure)

    cas = sub.add_parser("cas", help="the Configuration and Attestation Service")
    csub = cas.add_subparsers(dest="cas_command", required=True, metavar="ACTION")
    p = csub.add_parser("serve", help="run the CAS")
    p.add_argument("--data", required=True, help="state folder (SQLite, bundle.pem)")
    p.add_argument("--listen", default="127.0.0.1:8443")
    p.add_argument("--database", help="postgresql://... for replicas (default: SQLite)")
    p.add_argument("--trust-domain", default="meshshield.local")
    p.add_argument("--dns", action="append", metavar="NAME")
    p.add_argument("--admin-fingerprint", action="append", metavar="FP")
    p.add_argument("--trust-sim-platform", action="append", metavar="PUB.pem")
    p.add_argument("--collateral", metavar="DIR")
    p.add_argument("--nonce-ttl", default="60s")
    p.add_argument("--kek-file", help="key-encryption secret (default: DATA/../.NAME.kek)")
    p.add_argument("--max-cert-ttl", help="cap every certificate's lifetime (testing)")
    _connection_flags(p)
    _cas_evidence_flags(p)
    _cas_kek_flags(p)
    p.set_defaults(func=cmd_cas_serve)
    serve_parser = p
    p = csub.add_parser("recover", help="start an attested CAS whose KEK no peer can give, "
                        "with a recovery private key", parents=[], add_help=True)
    for action in serve_parser._actions:
        if action.dest != "help":
            p._add_action(action)
    p.add_argument("--recovery-key-private", action="append", required=True,
                   metavar="FILE|DIR", help="the recovery.key `cas recovery-key` wrote")
    p.set_defaults(func=cmd_cas_serve)
    p = csub.add_parser("recovery-key", help="make an administrator's recovery key pair")
    p.add_argument("--out", required=True, metavar="DIR")
    p.set_defaults(func=cmd_cas_recovery_key)

    def store_flags(p: argparse.ArgumentParser) -> None:
        g = p.add_mutually_exclusive_group(required=True)
        g.add_argument("--database", metavar="URL", help="postgresql://USER@HOST/DBNAME")
        g.add_argument("--data", metavar="DIR", help="a CAS data folder (SQLite DIR/cas.db)")

    p = csub.add_parser("migrate", help="bring the CAS database's schema to this release")
    store_flags(p)
    p.set_defaults(func=cmd_cas_migrate)
    p = csub.add_parser("backup", help="write the CAS's state to a JSON file (CA key sealed)")
    store_flags(p)
    p.add_argument("--out", required=True, metavar="FILE")
    p.set_defaults(func=cmd_cas_backup)
    p = csub.add_parser("restore", help="write a backup into an empty CAS database")
    p.add_argument("--in", dest="input", required=True, metavar="FILE")
    store_flags(p)
    p.set_defaults(func=cmd_cas_restore)
    p = csub.add_parser("verify", help="verify the CAS's own attestation before trusting "
                        "it; write its bundle")
    p.add_argument("--cas", required=True, help="CAS URL, e.g. https://cas:8443")
    p.add_argument("--expect", required=True, metavar="FILE",
                   help="YAML: the tee list and security.attestation the CAS must satisfy")
    p.add_argument("--out", metavar="bundle.pem", help="write the attested bundle here")
    p.add_argument("--trust-sim-platform", action="append", metavar="PUB.pem",
                   help="a sim platform key whose SIMULATED evidence may be verified")
    p.add_argument("--collateral", metavar="DIR", help="Intel TCB info / QE identity / CRLs")
    p.add_argument("--timeout", default="10s", metavar="DURATION")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cas_verify)
    p = csub.add_parser("rotate-ca", help="publish a new CA now; it signs after a delay")
    _cas_flags(p)
    p.add_argument("--activate-after", default="1h")
    p.add_argument("--force", action="store_true",
                   help="key compromise: the new CA signs at once and every other CA leaves "
                   "the bundle now; every peer must attest again")
    p.set_defaults(func=cmd_cas_rotate)

    p = sub.add_parser("attest", help="attest once and write key, certificate, bundle")
    _attester_flags(p)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_attest)
    p = sub.add_parser("run", help="attest, then exec a program with its secrets",
                       usage="meshshield run --cas URL --cas-bundle PEM --session S --service "
                             "NAME --platform P [--workload PATH] [--sim-key FILE] "
                             "[--secrets-dir DIR] -- CMD [ARGS...]")
    _attester_flags(p)
    p.add_argument("--secrets-dir", metavar="DIR",
                   help="write file secrets here too (a tmpfs)")
    p.add_argument("--secrets-dir-on-disk", action="store_true",
                   help="development only: accept a --secrets-dir that is not in memory")
    p.add_argument("command_line", nargs=argparse.REMAINDER, metavar="-- CMD ARGS")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("bundle", help="fetch the mesh trust bundle (PEM or SPIFFE JWKS)")
    _cas_flags(p, admin=False)
    p.add_argument("--format", choices=["pem", "spiffe"], default="pem",
                   help="pem: CA certificates; spiffe: a SPIFFE bundle document (JWK Set)")
    p.add_argument("--out", metavar="FILE", help="write here instead of stdout")
    p.set_defaults(func=cmd_bundle)

    ev = sub.add_parser("evidence", help="hardware evidence tools")
    esub = ev.add_subparsers(dest="evidence_command", required=True, metavar="ACTION")
    p = esub.add_parser("verify", help="verify SEV-SNP, TDX or SGX evidence offline")
    p.add_argument("file", help="raw report / quote, or the evidence JSON")
    p.add_argument("--platform", required=True, choices=["sev-snp", "tdx", "sgx"])
    p.add_argument("--certs", help="sev-snp: VCEK or VLEK (DER or PEM), then ASK/ASVK, ARK")
    p.add_argument("--collateral", metavar="DIR", help="Intel TCB info / QE identity / CRLs")
    p.add_argument("--at", metavar="RFC3339", help="verification time (default: now)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evidence_verify)

    from meshshield.kube.cli_support import (
        add_inject_arguments,
        add_webhook_arguments,
        inject_command,
        webhook_command,
    )

    p = sub.add_parser("inject", help="print a manifest with the sidecar injected")
    add_inject_arguments(p)
    p.set_defaults(func=inject_command)
    p = sub.add_parser("webhook", help="sidecar-injecting admission webhook; `webhook certs`")
    add_webhook_arguments(p)
    p.set_defaults(func=webhook_command)

    p = sub.add_parser("sidecar", help="run the attested mTLS proxy beside a service")
    p.add_argument("--config", metavar="FILE", help="YAML with the same settings as the flags")
    p.add_argument("--cas")
    p.add_argument("--cas-bundle")
    p.add_argument("--cas-expect", metavar="FILE",
                   help="verify the CAS's own attestation against this expect file on every "
                   "(re)connect; instead of, or beside, --cas-bundle")
    p.add_argument("--cas-trust-sim-platform", action="append", metavar="PUB.pem",
                   help="sim platform key for a CAS whose attestation is SIMULATED")
    p.add_argument("--session")
    p.add_argument("--service")
    p.add_argument("--platform", choices=["sim", "sev-snp", "tdx", "sgx"])
    p.add_argument("--workload", action="append", metavar="PATH")
    p.add_argument("--sim-key", metavar="FILE")
    p.add_argument("--inbound", action="append", metavar="LISTEN=FORWARD")
    p.add_argument("--outbound", action="append", metavar="LISTEN=SERVICE@HOST:PORT")
    p.add_argument("--admin-listen", metavar="HOST:PORT", help="default 127.0.0.1:15000")
    p.add_argument("--health-listen", metavar="HOST:PORT", help="/ready and /live only")
    p.add_argument("--max-connections", type=int, metavar="N",
                   help="established connections per direction (default 4096)")
    p.add_argument("--max-handshakes", type=int, metavar="N",
                   help="TLS handshakes in progress per direction (default 1024)")
    p.add_argument("--max-handshakes-per-source", type=int, metavar="N",
                   help="inbound TLS handshakes in progress from one address (default 128)")
    p.add_argument("--handshake-timeout", metavar="DURATION")
    p.add_argument("--drain-timeout", metavar="DURATION")
    p.add_argument("--workload-api", metavar="unix:///PATH",
                   help="serve the SPIFFE Workload API on this unix socket")
    p.add_argument("--workload-api-group", metavar="GROUP",
                   help="group (name or gid) that may connect to the Workload API socket")
    p.add_argument("--idle-timeout", metavar="DURATION",
                   help="close a connection that carried no byte for this long (default off)")
    p.add_argument("--max-connection-lifetime", metavar="DURATION",
                   help="close every connection this long after it opened (default off; "
                        "each also ends at its peer certificate's expiry)")
    p.add_argument("--sds", metavar="unix:///PATH",
                   help="serve Envoy's Secret Discovery Service on this unix socket")
    p.add_argument("--dataplane", choices=["python", "native"],
                   help="who carries the bytes: the Rust relay (default) or the asyncio "
                        "one (where the extension meshshield._native is not built)")
    p.add_argument("--workers", type=int, metavar="N",
                   help="relay threads of the native data plane (default 2; each connection "
                        "stays on one)")
    p.add_argument("--secrets-dir", metavar="DIR",
                   help="write the service's file secrets here (a tmpfs; the app sees it as "
                        "/run/secrets)")
    p.add_argument("--secrets-dir-on-disk", action="store_true",
                   help="development only: accept a --secrets-dir that is not in memory")
    p.set_defaults(func=cmd_sidecar)

    p = sub.add_parser("status", help="a sidecar's live connections, or the mesh's edges")
    p.add_argument("--sidecar", metavar="URL", help="the sidecar's admin URL")
    p.add_argument("--cas", metavar="URL")
    p.add_argument("--cas-bundle")
    p.add_argument("--admin-key")
    p.add_argument("--json", action="store_true")
    p.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    p.add_argument("--interval", default="2s", help=argparse.SUPPRESS)
    p.add_argument("--timeout", default="10s", metavar="DURATION",
                   help="give up on an answer after this long (default 10s)")
    p.set_defaults(func=cmd_status)

    dev = sub.add_parser("dev", help="run your own services in a local mesh")
    dsub = dev.add_subparsers(dest="dev_command", required=True, metavar="ACTION")
    p = dsub.add_parser("up", help="CAS + a sidecar per service from mesh.dev.yaml")
    p.add_argument("-f", "--file", required=True, metavar="mesh.dev.yaml")
    p.add_argument("--state", metavar="DIR", help="keys, logs, CAS data "
                   "(default: .meshshield-dev beside the file)")
    p.set_defaults(func=cmd_dev_up)

    p = sub.add_parser("demo", help="see meshshield work on loopback (sim attestation)")
    p.set_defaults(func=cmd_demo)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if str(args.log_level).upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        _err(f"--log-level {args.log_level!r}: expected debug, info, warning, error or "
             "critical")
        return 2
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from meshshield.casclient import CasUnreachable

    func: Command = args.func
    try:
        return func(args)
    except UsageError as e:
        _err(str(e))
        return 2
    except MeshError as e:
        _err(f"{e.reason.value}: {e.message}")
        for p in getattr(e, "problems", []) or []:
            print(p, file=sys.stderr)
        return 1
    except CasUnreachable as e:
        _err(str(e))
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1
    except json.JSONDecodeError:
        _err("the CAS answered with a body that is not JSON")
        return 1


if __name__ == "__main__":
    sys.exit(main())
