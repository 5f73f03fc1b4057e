"""Sidecar injection as pure functions over Kubernetes manifests (plain dicts).

`inject_pod_spec` is the one place that decides what an injected pod looks like; the
admission webhook, `meshshield inject -f` and the tests all go through it. Injection is
"strip what we added before, then add": so injecting twice gives the same pod as
injecting once, and a pod injected by an older configuration is brought up to date.

The rule that nothing bypasses the sidecar: the app listens on 127.0.0.1 only (each app
container gets MESHSHIELD_APP_LISTEN=127.0.0.1 saying so), the sidecar alone listens on
the pod IP, and deploy/ ships a NetworkPolicy admitting only the sidecar's ports.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

from meshshield import __version__
from meshshield.kube.annotations import (
    CONFIDENTIAL_VM_PLATFORMS,
    INBOUND,
    OUTBOUND,
    STATUS,
    InjectError,
    MeshAnnotations,
    injection_requested,
    parse_mesh_annotations,
)
from meshshield.kube.config import DEFAULT_CONFIG, InjectConfig

__all__ = [
    "APP_LISTEN_ENV",
    "DEFAULT_CONFIG",
    "KATA_KERNEL_PARAMS",
    "SIDECAR_NAME",
    "InjectConfig",
    "WORKLOAD_KINDS",
    "describe",
    "inject_document",
    "inject_pod_spec",
]

Manifest = dict[str, Any]

SIDECAR_NAME = "meshshield-proxy"
VOLUME_CAS_BUNDLE = "meshshield-cas-bundle"
VOLUME_TMP = "meshshield-tmp"
VOLUME_SIM_KEY = "meshshield-sim-key"
VOLUME_WORKLOAD_API = "meshshield-workload-api"
VOLUME_CAS_EXPECT = "meshshield-cas-expect"
VOLUME_SECRETS = "meshshield-secrets"
OUR_VOLUMES = (VOLUME_CAS_BUNDLE, VOLUME_TMP, VOLUME_SIM_KEY, VOLUME_WORKLOAD_API,
               VOLUME_CAS_EXPECT, VOLUME_SECRETS)
# File secrets (policy `file: /run/secrets/NAME`): the sidecar writes them into a
# memory-backed emptyDir, mounted read-only into the app's containers at /run/secrets.
SECRETS_SIDECAR_DIR = "/run/meshshield-secrets"
SECRETS_APP_DIR = "/run/secrets"
CAS_EXPECT_DIR = "/etc/meshshield/cas-expect"
# The Workload API, as SPIRE's agent is set up: an emptyDir shared by the sidecar
# (writable) and the app's containers (read-only), SPIFFE_ENDPOINT_SOCKET naming the
# socket. The emptyDir itself is writable by all, so the sidecar makes a directory of
# its own in it (0750, group workload_api_group) and the socket in that (0660).
WORKLOAD_API_DIR = "/run/meshshield"
WORKLOAD_API_SOCKET = f"unix://{WORKLOAD_API_DIR}/workload/agent.sock"
SPIFFE_SOCKET_ENV = "SPIFFE_ENDPOINT_SOCKET"
CAS_BUNDLE_DIR = "/etc/meshshield/cas"
SIM_KEY_DIR = "/etc/meshshield/sim"
SIM_KEY_FILE = "sim-platform.key"
APP_LISTEN_ENV = "MESHSHIELD_APP_LISTEN"

# Evidence source for sev-snp / tdx in a Confidential Containers (Kata) pod: the guest
# components' REST API server listens on 127.0.0.1:8006 inside the pod's VM and answers
# GET /aa/evidence?runtime_data=... for loopback callers, with no root and no device
# node in the container. It is off unless the guest kernel command line carries
# agent.guest_components_rest_api=all (the default, "resource", serves only /cdh).
EVIDENCE_SOURCE_ENV = "MESHSHIELD_EVIDENCE_SOURCE"
COCO_AA_URL_ENV = "MESHSHIELD_COCO_AA_URL"
KATA_KERNEL_PARAMS = "io.katacontainers.config.hypervisor.kernel_params"
COCO_REST_API_PARAM = "agent.guest_components_rest_api"

STATUS_FORMAT = 1
WORKLOAD_KINDS = ("Pod", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob")



def inject_pod_spec(
    pod_meta: Mapping[str, Any] | None,
    pod_spec: Mapping[str, Any],
    config: InjectConfig = DEFAULT_CONFIG,
) -> tuple[Manifest, Manifest]:
    """Return copies of a pod's metadata and spec with the sidecar injected.

    Pods without `meshshield.io/inject: "true"` come back unchanged. Raises
    AnnotationError / InjectError for a pod that asks for injection but cannot have it.
    """
    meta: Manifest = copy.deepcopy(dict(pod_meta or {}))
    spec: Manifest = copy.deepcopy(dict(pod_spec))
    annotations = _mapping(meta, "annotations", "metadata.annotations")
    if not injection_requested(annotations):
        return meta, spec
    labels = _mapping(meta, "labels", "metadata.labels")
    mesh = parse_mesh_annotations(annotations, labels)
    _check_pod(spec, mesh, config)

    _strip(meta, spec)
    spec["initContainers"] = [_sidecar_container(mesh, config), *spec.get("initContainers", [])]
    spec["volumes"] = [*spec.get("volumes", []), *_volumes(mesh, config)]
    for container in spec["containers"]:
        app_listen = {"name": APP_LISTEN_ENV, "value": "127.0.0.1"}
        container["env"] = [*container.get("env", []), app_listen]
    had_security_context = "securityContext" in spec
    group_added = _add_workload_api(spec, config) if mesh.workload_api else None
    if mesh.secrets:
        for container in spec["containers"]:
            if not isinstance(container.get("volumeMounts") or [], list):
                raise InjectError(f"container {container.get('name')}: volumeMounts must be a "
                                  "list")
            mount = {"name": VOLUME_SECRETS, "mountPath": SECRETS_APP_DIR, "readOnly": True}
            container["volumeMounts"] = [*(container.get("volumeMounts") or []), mount]
    annotations = meta.setdefault("annotations", {})
    if mesh.platform in CONFIDENTIAL_VM_PLATFORMS and config.coco_kernel_params:
        annotations[KATA_KERNEL_PARAMS] = _with_rest_api_param(annotations.get(KATA_KERNEL_PARAMS))
    status = _status(mesh, config)
    if group_added is not None:
        status["workloadApiGroupAdded"] = group_added  # so that _strip takes it away again
        if not had_security_context:
            status["workloadApiSecurityContextAdded"] = True
    annotations[STATUS] = json.dumps(status, sort_keys=True, separators=(",", ":"))
    return meta, spec


def inject_document(doc: Any, config: InjectConfig = DEFAULT_CONFIG) -> Any:
    """Inject into one manifest document; anything that is not a workload comes back as is.

    Handles Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob and a `List`
    of them. The result is a new object; `doc` is not modified.
    """
    if not isinstance(doc, dict):
        return copy.deepcopy(doc)
    kind = doc.get("kind")
    if kind == "List" and isinstance(doc.get("items"), list):
        out = copy.deepcopy(doc)
        out["items"] = [inject_document(item, config) for item in doc["items"]]
        return out
    if kind not in WORKLOAD_KINDS:
        return copy.deepcopy(doc)
    out = copy.deepcopy(doc)
    try:
        if kind == "Pod":
            meta, spec = inject_pod_spec(out.get("metadata"), _mapping(out, "spec", "spec"), config)
            _replace(out, meta, spec)
            return out
        if kind == "CronJob":
            holder = _mapping(_mapping(_mapping(out, "spec", "spec"), "jobTemplate",
                                       "spec.jobTemplate"), "spec", "spec.jobTemplate.spec")
            where = "spec.jobTemplate.spec.template"
        else:
            holder = _mapping(out, "spec", "spec")
            where = "spec.template"
        template = _mapping(holder, "template", where)
        if not template:
            return out
        meta, spec = inject_pod_spec(
            template.get("metadata"), _mapping(template, "spec", where + ".spec"), config
        )
        _replace(template, meta, spec)
        return out
    except InjectError as err:
        raise InjectError(f"{describe(doc)}: {err.message}") from err


def _replace(holder: Manifest, meta: Manifest, spec: Manifest) -> None:
    """Set metadata and spec, adding no empty `metadata: {}` to an untouched document."""
    if meta != (holder.get("metadata") or {}):
        holder["metadata"] = meta
    holder["spec"] = spec


def describe(doc: Mapping[str, Any]) -> str:
    """`Deployment shop/backend`, for messages."""
    meta = doc.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    name = meta.get("name") or meta.get("generateName") or "<unnamed>"
    namespace = meta.get("namespace")
    return f"{doc.get('kind', 'object')} {namespace + '/' if namespace else ''}{name}"


def _mapping(holder: Manifest, key: str, where: str) -> Manifest:
    value = holder.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InjectError(f"{where}: expected a mapping, found {type(value).__name__}")
    return value


def _check_pod(spec: Manifest, mesh: MeshAnnotations, config: InjectConfig) -> None:
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        raise InjectError("spec.containers: expected a non-empty list of containers")
    for key in ("initContainers", "volumes"):
        if not isinstance(spec.get(key) or [], list):
            raise InjectError(f"spec.{key}: expected a list")
    for container in containers:
        if not isinstance(container, dict) or not isinstance(container.get("env") or [], list):
            raise InjectError("spec.containers: expected containers with a list of env")
    if spec.get("hostNetwork") is True:
        raise InjectError(
            "spec.hostNetwork is true: the sidecar would listen on the node's network and the "
            "app's 127.0.0.1 would be the node's loopback; meshshield injects only pods with "
            "their own network namespace"
        )
    if mesh.platform in CONFIDENTIAL_VM_PLATFORMS and not spec.get("runtimeClassName"):
        raise InjectError(
            f"platform {mesh.platform} needs a confidential pod: set spec.runtimeClassName to "
            f"the Confidential Containers runtime class of the node "
            f"(for example kata-qemu-{'snp' if mesh.platform == 'sev-snp' else 'tdx'})"
        )
    reserved = {config.admin_port: "the sidecar's admin port",
                config.health_port: "the sidecar's health port"}
    for route in mesh.inbound:
        for port in (route.listen_port, route.app_port):
            if port in reserved:
                raise InjectError(f"annotation {INBOUND}: port {port} is {reserved[port]}")
    for out_route in mesh.outbound:
        if out_route.listen_port in reserved:
            raise InjectError(f"annotation {OUTBOUND}: port {out_route.listen_port} is "
                              f"{reserved[out_route.listen_port]}")
    sidecar_ports = {r.listen_port for r in mesh.inbound} | {r.listen_port for r in mesh.outbound}
    sidecar_ports |= set(reserved)
    for container in containers:
        if container.get("name") == SIDECAR_NAME:
            raise InjectError(f"spec.containers: the name {SIDECAR_NAME} is the sidecar's")
        for port in container.get("ports") or []:
            number = port.get("containerPort") if isinstance(port, dict) else None
            if number in sidecar_ports:
                raise InjectError(
                    f"container {container.get('name')} declares port {number}, which the "
                    f"sidecar listens on; give the app another port"
                )


def _add_workload_api(spec: Manifest, config: InjectConfig) -> int | None:
    """The app's containers reach the sidecar's Workload API socket (see above); the
    group added to the pod's supplementalGroups, None if it was there already."""
    for container in spec["containers"]:
        if not isinstance(container.get("volumeMounts") or [], list):
            raise InjectError(f"container {container.get('name')}: volumeMounts must be a list")
        container["env"] = [e for e in container.get("env", [])
                            if not (isinstance(e, dict) and e.get("name") == SPIFFE_SOCKET_ENV)]
        container["env"].append({"name": SPIFFE_SOCKET_ENV, "value": WORKLOAD_API_SOCKET})
        mount = {"name": VOLUME_WORKLOAD_API, "mountPath": WORKLOAD_API_DIR, "readOnly": True}
        container["volumeMounts"] = [*(container.get("volumeMounts") or []), mount]
    pod_security = spec.setdefault("securityContext", {})
    if not isinstance(pod_security, dict):
        raise InjectError("spec.securityContext: expected a mapping")
    groups = pod_security.get("supplementalGroups") or []
    if not isinstance(groups, list):
        raise InjectError("spec.securityContext.supplementalGroups: expected a list")
    if config.workload_api_group in groups:
        return None
    pod_security["supplementalGroups"] = [*groups, config.workload_api_group]
    return config.workload_api_group


def _strip(meta: Manifest, spec: Manifest) -> None:
    """Remove everything a previous injection added (the inverse of the additions below)."""
    init = [c for c in spec.get("initContainers") or []
            if not (isinstance(c, dict) and c.get("name") == SIDECAR_NAME)]
    _set_or_drop(spec, "initContainers", init)
    volumes = [v for v in spec.get("volumes") or []
               if not (isinstance(v, dict) and v.get("name") in OUR_VOLUMES)]
    _set_or_drop(spec, "volumes", volumes)
    for container in spec["containers"]:
        env = [e for e in container.get("env") or []
               if not (isinstance(e, dict) and (
                   e.get("name") == APP_LISTEN_ENV
                   or e == {"name": SPIFFE_SOCKET_ENV, "value": WORKLOAD_API_SOCKET}))]
        _set_or_drop(container, "env", env)
        mounts = [m for m in container.get("volumeMounts") or []
                  if not (isinstance(m, dict)
                          and m.get("name") in (VOLUME_WORKLOAD_API, VOLUME_SECRETS))]
        _set_or_drop(container, "volumeMounts", mounts)
    annotations = meta.get("annotations")
    if isinstance(annotations, dict):
        previous = annotations.pop(STATUS, None)
        added = _status_field(previous, "workloadApiGroupAdded")
        pod_security = spec.get("securityContext")
        if isinstance(added, int) and isinstance(pod_security, dict):
            groups = [g for g in pod_security.get("supplementalGroups") or [] if g != added]
            _set_or_drop(pod_security, "supplementalGroups", groups)
            if not pod_security and _status_field(previous, "workloadApiSecurityContextAdded"):
                spec.pop("securityContext", None)


def _status_field(status: object, key: str) -> object:
    try:
        doc = json.loads(status) if isinstance(status, str) else None
    except ValueError:
        return None
    return doc.get(key) if isinstance(doc, dict) else None


def _set_or_drop(holder: Manifest, key: str, items: list[Any]) -> None:
    if items:
        holder[key] = items
    else:
        holder.pop(key, None)


def _sidecar_container(mesh: MeshAnnotations, config: InjectConfig) -> Manifest:
    args = [
        "sidecar",
        "--cas", config.cas_url,
        "--cas-bundle", f"{CAS_BUNDLE_DIR}/{config.cas_bundle_key}",
        "--session", mesh.session,
        "--service", mesh.service,
        "--platform", mesh.platform,
    ]
    if mesh.platform == "sim":
        args += ["--sim-key", f"{SIM_KEY_DIR}/{SIM_KEY_FILE}"]
    if mesh.cas_expect is not None:
        args += ["--cas-expect", f"{CAS_EXPECT_DIR}/{mesh.cas_expect[1]}"]
    for route in mesh.inbound:
        args += ["--inbound", route.flag(config.listen_host)]
    for out_route in mesh.outbound:
        args += ["--outbound", out_route.flag()]
    args += [
        "--admin-listen", f"127.0.0.1:{config.admin_port}",
        "--health-listen", f"{config.listen_host}:{config.health_port}",
    ]
    env: list[Manifest] = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]
    if mesh.platform in CONFIDENTIAL_VM_PLATFORMS:
        env += [
            {"name": EVIDENCE_SOURCE_ENV, "value": "coco-aa"},
            {"name": COCO_AA_URL_ENV, "value": config.coco_aa_url},
        ]
    env += [{"name": name, "value": value} for name, value in config.extra_env]
    mounts: list[Manifest] = [
        {"name": VOLUME_CAS_BUNDLE, "mountPath": CAS_BUNDLE_DIR, "readOnly": True},
        {"name": VOLUME_TMP, "mountPath": "/tmp"},  # noqa: S108 - memory-backed, private
    ]
    if mesh.platform == "sim":
        mounts.append({"name": VOLUME_SIM_KEY, "mountPath": SIM_KEY_DIR, "readOnly": True})
    if mesh.cas_expect is not None:
        mounts.append({"name": VOLUME_CAS_EXPECT, "mountPath": CAS_EXPECT_DIR,
                       "readOnly": True})
    if mesh.workload_api:
        args += ["--workload-api", WORKLOAD_API_SOCKET,
                 "--workload-api-group", str(config.workload_api_group)]
        mounts.append({"name": VOLUME_WORKLOAD_API, "mountPath": WORKLOAD_API_DIR})
    if mesh.secrets:
        args += ["--secrets-dir", SECRETS_SIDECAR_DIR]
        mounts.append({"name": VOLUME_SECRETS, "mountPath": SECRETS_SIDECAR_DIR})
    health = config.health_port
    ports = [{"containerPort": r.listen_port, "protocol": "TCP"} for r in mesh.inbound]
    ports.append({"containerPort": health, "protocol": "TCP"})
    return {
        "name": SIDECAR_NAME,
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "restartPolicy": "Always",
        "command": ["meshshield"],
        "args": args,
        "env": env,
        "ports": ports,
        "startupProbe": _probe("/ready", health, period=1, failures=120),
        "readinessProbe": _probe("/ready", health, period=5, failures=3),
        "livenessProbe": _probe("/live", health, period=10, failures=3),
        "resources": {
            "requests": {"cpu": config.cpu_request, "memory": config.memory_request},
            "limits": {"cpu": config.cpu_limit, "memory": config.memory_limit},
        },
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": config.run_as_user,
            "runAsGroup": config.run_as_user,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": mounts,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def _probe(path: str, port: int, *, period: int, failures: int) -> Manifest:
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period,
        "timeoutSeconds": 1,
        "failureThreshold": failures,
    }


def _volumes(mesh: MeshAnnotations, config: InjectConfig) -> list[Manifest]:
    volumes: list[Manifest] = [
        {
            "name": VOLUME_CAS_BUNDLE,
            "configMap": {
                "name": config.cas_bundle_configmap,
                "items": [{"key": config.cas_bundle_key, "path": config.cas_bundle_key}],
            },
        },
        # Memory-backed: the sidecar's private key never touches a persistent disk.
        {"name": VOLUME_TMP, "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
    ]
    if mesh.platform == "sim":
        volumes.append({
            "name": VOLUME_SIM_KEY,
            "secret": {"secretName": config.sim_key_secret, "defaultMode": 0o400},
        })
    if mesh.cas_expect is not None:
        name, key = mesh.cas_expect
        volumes.append({"name": VOLUME_CAS_EXPECT,
                        "configMap": {"name": name, "items": [{"key": key, "path": key}]}})
    if mesh.workload_api:
        volumes.append({"name": VOLUME_WORKLOAD_API,
                        "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}})
    if mesh.secrets:
        volumes.append({"name": VOLUME_SECRETS,
                        "emptyDir": {"medium": "Memory", "sizeLimit": "8Mi"}})
    return volumes


def _with_rest_api_param(current: object) -> str:
    params = current.split() if isinstance(current, str) else []
    ours = [p for p in params if p.split("=", 1)[0] == COCO_REST_API_PARAM]
    if ours == [f"{COCO_REST_API_PARAM}=all"] and isinstance(current, str):
        return current
    params = [p for p in params if p not in ours]
    params.append(f"{COCO_REST_API_PARAM}=all")
    return " ".join(params)


def _status(mesh: MeshAnnotations, config: InjectConfig) -> dict[str, Any]:
    return {
        "format": STATUS_FORMAT,
        "sidecarVersion": __version__,
        "image": config.image,
        "session": mesh.session,
        "service": mesh.service,
        "platform": mesh.platform,
        "simulated": mesh.platform == "sim",
        "inbound": [r.flag(config.listen_host) for r in mesh.inbound],
        "outbound": [r.flag() for r in mesh.outbound],
        "inboundPorts": [r.listen_port for r in mesh.inbound],
        "adminPort": config.admin_port,
        "healthPort": config.health_port,
        "evidenceSource": _evidence_source(mesh, config),
        **({"workloadApi": WORKLOAD_API_SOCKET} if mesh.workload_api else {}),
    }


def _evidence_source(mesh: MeshAnnotations, config: InjectConfig) -> str:
    if mesh.platform in CONFIDENTIAL_VM_PLATFORMS:
        return f"coco-aa {config.coco_aa_url}"
    return "sim-key"
