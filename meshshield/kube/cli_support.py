"""Command-line glue for `meshshield inject`, `meshshield webhook` and `webhook certs`.

meshshield/cli.py owns the top-level parser; it calls `add_*_arguments` on its
subparsers and `*_command(args)` to run them. Each returns the exit code of SPEC §2:
0 success, 1 refused or invalid (reason on stderr), 2 usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import ssl
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TextIO

from meshshield.inputs import InputFileError, describe_size, read_bounded_text
from meshshield.kube.annotations import InjectError
from meshshield.kube.certs import make_webhook_certs
from meshshield.kube.config import DEFAULT_CONFIG, InjectConfig
from meshshield.kube.stream import inject_stream
from meshshield.kube.webhook import parse_listen, serve_webhook

MAX_MANIFEST_BYTES = 64 << 20


# ---- shared injector configuration flags ----------------------------------------------

def add_inject_config_arguments(parser: argparse.ArgumentParser) -> None:
    d = DEFAULT_CONFIG
    group = parser.add_argument_group("sidecar injection")
    group.add_argument("--image", default=d.image, help=f"sidecar image (default {d.image})")
    group.add_argument("--image-pull-policy", default=d.image_pull_policy,
                       choices=("Always", "IfNotPresent", "Never"))
    group.add_argument("--cas", dest="cas_url", default=d.cas_url, metavar="URL",
                       help=f"CAS URL the sidecars attest to (default {d.cas_url})")
    group.add_argument("--cas-bundle-configmap", default=d.cas_bundle_configmap, metavar="NAME",
                       help="ConfigMap, in each injected namespace, holding the CAS trust "
                            f"bundle under key {d.cas_bundle_key} (default %(default)s)")
    group.add_argument("--sim-key-secret", default=d.sim_key_secret, metavar="NAME",
                       help="Secret holding sim-platform.key for platform sim (development)")
    group.add_argument("--sidecar-cpu-request", default=d.cpu_request, metavar="QTY")
    group.add_argument("--sidecar-memory-request", default=d.memory_request, metavar="QTY")
    group.add_argument("--sidecar-cpu-limit", default=d.cpu_limit, metavar="QTY")
    group.add_argument("--sidecar-memory-limit", default=d.memory_limit, metavar="QTY")
    group.add_argument("--coco-aa-url", default=d.coco_aa_url, metavar="URL",
                       help="the Confidential Containers evidence API inside a pod")
    group.add_argument("--no-coco-kernel-params", dest="coco_kernel_params",
                       action="store_false",
                       help="do not add agent.guest_components_rest_api=all to the Kata "
                            "kernel_params annotation (the runtime class sets it)")


def config_from_args(args: argparse.Namespace) -> InjectConfig:
    """Raises ValueError naming every bad flag."""
    return InjectConfig(
        image=args.image,
        image_pull_policy=args.image_pull_policy,
        cas_url=args.cas_url,
        cas_bundle_configmap=args.cas_bundle_configmap,
        sim_key_secret=args.sim_key_secret,
        cpu_request=args.sidecar_cpu_request,
        memory_request=args.sidecar_memory_request,
        cpu_limit=args.sidecar_cpu_limit,
        memory_limit=args.sidecar_memory_limit,
        coco_aa_url=args.coco_aa_url,
        coco_kernel_params=args.coco_kernel_params,
    )


# ---- meshshield inject -f FILE ---------------------------------------------------------

def add_inject_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Print a manifest with the meshshield sidecar injected into every Pod, Deployment, "
        "StatefulSet, DaemonSet, ReplicaSet, Job and CronJob annotated "
        'meshshield.io/inject: "true"; other documents pass through unchanged.'
    )
    parser.add_argument("-f", "--filename", required=True, metavar="FILE",
                        help="multi-document YAML manifest, or - for standard input")
    add_inject_config_arguments(parser)


def run_inject(
    path: str,
    config: InjectConfig = DEFAULT_CONFIG,
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    name = "<stdin>" if path == "-" else path
    try:
        if path == "-":
            text = stdin.read(MAX_MANIFEST_BYTES + 1)
            if len(text) > MAX_MANIFEST_BYTES:
                raise InputFileError(f"-f - (standard input): more than the "
                                     f"{describe_size(MAX_MANIFEST_BYTES)} limit")
        else:
            text = read_bounded_text(path, what="-f", limit=MAX_MANIFEST_BYTES)
    except InputFileError as err:
        print(f"meshshield inject: {err}", file=stderr)
        return 2
    except OSError as err:
        print(f"meshshield inject: cannot read {name}: {_reason(err)}", file=stderr)
        return 1
    try:
        result = inject_stream(text, config)
    except InjectError as err:
        print(f"meshshield inject: {name}: {err.message}", file=stderr)
        return 1
    stdout.write(result)
    stdout.flush()
    return 0


def inject_command(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ValueError as err:
        print(f"meshshield inject: {err}", file=sys.stderr)
        return 2
    return run_inject(args.filename, config)


# ---- meshshield webhook [certs] --------------------------------------------------------

def add_webhook_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Serve the mutating admission webhook that injects the meshshield sidecar, or "
        "(webhook certs) make its serving certificate."
    )
    parser.add_argument("--listen", default="0.0.0.0:9443", metavar="HOST:PORT",  # noqa: S104
                        help="address to serve HTTPS on (default %(default)s)")
    parser.add_argument("--tls-cert", metavar="PEM", help="serving certificate (and chain)")
    parser.add_argument("--tls-key", metavar="PEM", help="serving private key")
    add_inject_config_arguments(parser)
    sub = parser.add_subparsers(dest="webhook_command", metavar="{certs}")
    certs = sub.add_parser(
        "certs",
        help="make a self-signed CA and the webhook's serving certificate",
        description="Write ca.crt, tls.crt and tls.key (0600) for <service>.<namespace>.svc "
                    "into DIR and print the caBundle for the MutatingWebhookConfiguration. "
                    "The CA key is used once and not kept.",
    )
    certs.add_argument("--service", default="meshshield-webhook")
    certs.add_argument("--namespace", default="meshshield")
    certs.add_argument("--out", required=True, metavar="DIR")
    certs.add_argument("--days", type=int, default=365)
    certs.add_argument("--force", action="store_true", help="overwrite existing files")


def run_webhook_certs(
    service: str,
    namespace: str,
    out_dir: str,
    *,
    days: int = 365,
    force: bool = False,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    try:
        certs = make_webhook_certs(service, namespace, days=days)
    except ValueError as err:
        print(f"meshshield webhook certs: {err}", file=stderr)
        return 2
    out = Path(out_dir)
    files = {"ca.crt": certs.ca_pem, "tls.crt": certs.cert_pem, "tls.key": certs.key_pem}
    try:
        out.mkdir(parents=True, exist_ok=True)
        existing = [n for n in files if (out / n).exists()]
        if existing and not force:
            print(f"meshshield webhook certs: {out_dir} already holds {', '.join(existing)}; "
                  "pass --force to replace them", file=stderr)
            return 1
        for name, data in files.items():
            _write_private(out / name, data, 0o600 if name.endswith(".key") else 0o644)
    except OSError as err:
        print(f"meshshield webhook certs: cannot write {out_dir}: {_reason(err)}", file=stderr)
        return 1
    print(certs.ca_bundle, file=stdout)
    print(
        f"wrote {out / 'ca.crt'}, {out / 'tls.crt'}, {out / 'tls.key'} for "
        f"{', '.join(certs.dns_names)}\n"
        f"next: kubectl -n {namespace} create secret tls {service}-tls "
        f"--cert={out / 'tls.crt'} --key={out / 'tls.key'}\n"
        "and set webhooks[0].clientConfig.caBundle to the line printed on stdout",
        file=stderr,
    )
    return 0


def _write_private(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def run_webhook(
    listen: str,
    tls_cert: str,
    tls_key: str,
    config: InjectConfig = DEFAULT_CONFIG,
) -> int:
    try:
        parse_listen(listen)
    except ValueError as err:
        print(f"meshshield webhook: {err}", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run: Callable[[Coroutine[Any, Any, None]], None] = asyncio.run
    try:
        import uvloop  # optional accelerator

        run = uvloop.run
    except ImportError:
        pass
    try:
        run(serve_webhook(listen, tls_cert, tls_key, config))
    except (OSError, ssl.SSLError) as err:
        print(f"meshshield webhook: cannot serve on {listen} with {tls_cert}: {_reason(err)}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


def webhook_command(args: argparse.Namespace) -> int:
    if args.webhook_command == "certs":
        return run_webhook_certs(args.service, args.namespace, args.out,
                                 days=args.days, force=args.force)
    if not args.tls_cert or not args.tls_key:
        print("meshshield webhook: --tls-cert and --tls-key are required "
              "(make them with `meshshield webhook certs --out DIR`)", file=sys.stderr)
        return 2
    try:
        config = config_from_args(args)
    except ValueError as err:
        print(f"meshshield webhook: {err}", file=sys.stderr)
        return 2
    return run_webhook(args.listen, args.tls_cert, args.tls_key, config)


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err) or type(err).__name__
