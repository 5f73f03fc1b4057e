"""deploy/ and injected manifests against the Kubernetes OpenAPI schemas (>= 1.29).

No kube-apiserver can be installed here, so strict schema validation (unknown fields are
errors) with kubernetes-validate, `kubectl kustomize` of both CAS variants (deploy/: one
replica on SQLite; deploy/replicated/: several on PostgreSQL), checks of what keeps the
replicated CAS available and its database URL secret, and checks that the manifests'
command lines parse with meshshield's own argument parsers stand in for a cluster.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from meshshield.kube.cli_support import add_inject_arguments, add_webhook_arguments
from meshshield.kube.inject import inject_document
from meshshield.kube.stream import inject_stream

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
FIXTURES = ROOT / "tests" / "fixtures" / "kube"
# The versions deploy/README.md names. 1.29 is the first with native sidecars on by default.
KUBERNETES_VERSIONS = ("1.29.0", "1.31.0", "1.33.0", "1.35.0")
# The kustomizations that render a whole control plane: deploy/base/ plus the files of
# one CAS variant.
VARIANTS = {"deploy": ["deploy/cas.yaml"], "deploy/replicated": ["deploy/replicated/cas.yaml"]}


def deploy_documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((f"{path.relative_to(ROOT)}:{doc['kind']}/{doc['metadata']['name']}",
                             doc))
    return docs


def injected_documents() -> list[tuple[str, dict[str, Any]]]:
    text = (FIXTURES / "workloads.yaml").read_text()
    docs = [(f"injected {d['kind']}/{d['metadata']['name']}", d)
            for d in yaml.safe_load_all(inject_stream(text)) if d is not None]
    pod = json.loads((FIXTURES / "pod-create.json").read_text())["request"]["object"]
    docs.append(("injected admission Pod", inject_document(pod)))
    with_api = json.loads(json.dumps(pod))
    with_api["metadata"]["annotations"]["meshshield.io/workload-api"] = "true"
    docs.append(("injected Pod with the Workload API", inject_document(with_api)))
    return docs


def validate(doc: dict[str, Any], version: str) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as err:
        where = ".".join(str(p) for p in err.path)
        pytest.fail(f"{doc['kind']}/{doc['metadata'].get('name')} against {version}: "
                    f"{where}: {err.message}")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(("name", "doc"), deploy_documents(), ids=lambda v: str(v)[:60])
def test_deploy_manifest_validates(name: str, doc: dict[str, Any], version: str) -> None:
    validate(doc, version)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(("name", "doc"), injected_documents(), ids=lambda v: str(v)[:60])
def test_injected_output_validates(name: str, doc: dict[str, Any], version: str) -> None:
    validate(doc, version)


def test_the_validator_rejects_what_an_api_server_would() -> None:
    pod = dict(injected_documents()[-1][1])
    pod["spec"] = {**pod["spec"], "initContainers": [
        {**pod["spec"]["initContainers"][0], "restartPolicy": ["Always"]}]}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, "1.29.0", strict=True)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({**pod, "spec": {**pod["spec"], "sidecars": []}},
                                     "1.29.0", strict=True)


def test_webhook_configuration_fails_closed_and_selects_labelled_namespaces() -> None:
    docs = dict(deploy_documents())
    (config,) = [d for d in docs.values() if d["kind"] == "MutatingWebhookConfiguration"]
    (hook,) = config["webhooks"]
    assert hook["failurePolicy"] == "Fail"
    assert hook["namespaceSelector"] == {"matchLabels": {"meshshield.io/injection": "enabled"}}
    assert hook["sideEffects"] == "None" and hook["admissionReviewVersions"] == ["v1"]
    assert hook["clientConfig"]["service"]["path"] == "/mutate"
    (ns,) = [d for d in docs.values() if d["kind"] == "Namespace"
             and d["metadata"]["name"] == "meshshield"]
    assert "meshshield.io/injection" not in ns["metadata"].get("labels", {})


def _container(kind: str, name: str) -> dict[str, Any]:
    for _, doc in deploy_documents():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc["spec"]["template"]["spec"]["containers"][0]  # type: ignore[no-any-return]
    raise AssertionError(f"no {kind} {name} in deploy/")


def test_webhook_deployment_command_line_parses() -> None:
    container = _container("Deployment", "meshshield-webhook")
    assert container["command"] == ["meshshield"] and container["args"][0] == "webhook"
    parser = argparse.ArgumentParser()
    add_webhook_arguments(parser)
    args = parser.parse_args(container["args"][1:])
    assert args.listen == "0.0.0.0:9443" and args.tls_cert and args.tls_key
    inject = argparse.ArgumentParser()
    add_inject_arguments(inject)
    assert inject.parse_args(["-f", "-"]).filename == "-"


def test_cas_statefulset_command_line_parses() -> None:
    from meshshield import cli

    container = _container("StatefulSet", "meshshield-cas")
    args = [re.sub(r"\$\((\w+)\)", "x", a) for a in container["args"]]
    parsed = cli.build_parser().parse_args(args)
    assert parsed.listen == "0.0.0.0:8443"
    assert "meshshield-cas.meshshield.svc" in parsed.dns


def test_containerfile_runs_as_a_numeric_non_root_user() -> None:
    lines = (DEPLOY / "Containerfile").read_text().splitlines()
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0"


def test_containerfile_builds_the_native_data_plane() -> None:
    """The sidecar's default data plane is the Rust extension: the image's build stage
    has the crate and cargo, and fails unless the extension imports."""
    text = (DEPLOY / "Containerfile").read_text()
    assert "COPY native ./native" in text
    assert "/usr/local/cargo/bin" in text
    assert 'python -c "import meshshield._native"' in text


def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        message = ("kubectl is not installed (Debian: apt-get install kubernetes-client); "
                   "schema validation above still covers every manifest")
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail(f"{message} (CI is set: kubectl is required, not skipped)",
                        pytrace=False)
        pytest.skip(message)
    return kubectl


def _render(kustomization: str) -> list[dict[str, Any]]:
    result = subprocess.run([_kubectl(), "kustomize", str(ROOT / kustomization)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d is not None]


@pytest.mark.parametrize("kustomization", VARIANTS)
def test_kubectl_kustomize_renders_each_variant(kustomization: str) -> None:
    rendered = _render(kustomization)
    expected = {name.split(":", 1)[1] for name, _ in deploy_documents()
                if name.startswith("deploy/base/")
                or name.split(":", 1)[0] in VARIANTS[kustomization]}
    names = [f"{d['kind']}/{d['metadata']['name']}" for d in rendered]
    assert sorted(names) == sorted(expected)
    for doc in rendered:
        validate(doc, KUBERNETES_VERSIONS[0])
    cas = [d for d in rendered if d["kind"] in ("StatefulSet", "Deployment")
           and d["metadata"]["name"] == "meshshield-cas"]
    assert [d["kind"] for d in cas] == (["StatefulSet"] if kustomization == "deploy"
                                        else ["Deployment"])


# -- the replicated CAS (deploy/replicated/) ---------------------------------------------

CAS_LABELS = {"app.kubernetes.io/name": "meshshield-cas"}


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels only: the manifests use nothing else) picks
    pods with these labels; an empty or expression-based one counts as no."""
    match = selector.get("matchLabels") or {}
    return bool(match) and not selector.get("matchExpressions") and all(
        labels.get(k) == v for k, v in match.items())


def replicated_cas_problems(docs: list[dict[str, Any]]) -> list[str]:
    """What keeps the replicated CAS from being available through one replica's loss, or
    lets its database URL out of a Secret. Empty: nothing."""
    deployments = [d for d in docs if d["kind"] == "Deployment"
                   and d["metadata"]["name"] == "meshshield-cas"]
    if len(deployments) != 1:
        return [f"expected one Deployment meshshield-cas, found {len(deployments)}"]
    (dep,) = deployments
    problems = []
    replicas = dep["spec"].get("replicas", 1)
    if replicas < 2:
        problems.append(f"replicas {replicas}: at least 2")
    pod = dep["spec"]["template"]
    labels = pod["metadata"].get("labels", {})
    if not all(labels.get(k) == v for k, v in CAS_LABELS.items()):
        problems.append(f"pod labels {labels} lack {CAS_LABELS}")
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"
            and _selects(d["spec"].get("selector", {}), labels)]
    if not pdbs:
        problems.append("no PodDisruptionBudget selects the CAS pods")
    for pdb in pdbs:
        spec = pdb["spec"]
        min_available, max_unavailable = spec.get("minAvailable"), spec.get("maxUnavailable")
        if isinstance(min_available, str) or isinstance(max_unavailable, str):
            problems.append(f"PodDisruptionBudget {pdb['metadata']['name']}: a percentage, "
                            "which may round to no replica kept")
        elif min_available is not None and not 1 <= min_available < replicas:
            problems.append(f"PodDisruptionBudget minAvailable {min_available}: keep >= 1 "
                            f"and < {replicas} replicas (else nodes can never drain)")
        elif max_unavailable is not None and not 1 <= max_unavailable < replicas:
            problems.append(f"PodDisruptionBudget maxUnavailable {max_unavailable}: "
                            f">= 1 and < {replicas}")
        elif min_available is None and max_unavailable is None:
            problems.append("PodDisruptionBudget with neither minAvailable nor maxUnavailable")
    anti = pod["spec"].get("affinity", {}).get("podAntiAffinity", {})
    required = anti.get("requiredDuringSchedulingIgnoredDuringExecution", [])
    if not any(t.get("topologyKey") == "kubernetes.io/hostname"
               and _selects(t.get("labelSelector", {}), labels) for t in required):
        problems.append("no required pod anti-affinity on kubernetes.io/hostname for the "
                        "CAS pods: two replicas could share a node")
    containers = pod["spec"].get("initContainers", []) + pod["spec"]["containers"]
    for c in containers:
        env = {e["name"]: e for e in c.get("env", [])}
        for e in env.values():
            if "postgres" in str(e.get("value", "")).lower():
                problems.append(f"container {c['name']}: env {e['name']} is a literal "
                                "database URL")
        args = c.get("args", [])
        for a in [*c.get("command", []), *args]:
            if "postgres" in a.lower():
                problems.append(f"container {c['name']}: literal database URL {a!r}")
        for i, a in enumerate(args[:-1]):
            if a != "--database":
                continue
            ref = re.fullmatch(r"\$\((\w+)\)", args[i + 1])
            source = env.get(ref.group(1), {}).get("valueFrom", {}) if ref else {}
            if set(source) != {"secretKeyRef"}:
                problems.append(f"container {c['name']}: --database {args[i + 1]!r} is not "
                                "an env var from a Secret (valueFrom.secretKeyRef)")
    cas = [c for c in pod["spec"]["containers"] if c["name"] == "cas"]
    if not cas or "--database" not in cas[0].get("args", []):
        problems.append("the cas container has no --database: it would run on SQLite")
    elif cas[0].get("readinessProbe", {}).get("httpGet", {}).get("path") != "/v1/ready":
        problems.append("the cas container's readiness is not /v1/ready")
    if not any(c.get("args", [])[:2] == ["cas", "migrate"]
               for c in pod["spec"].get("initContainers", [])):
        problems.append("no init container runs `meshshield cas migrate`")
    if any("persistentVolumeClaim" in v for v in pod["spec"].get("volumes", [])) or (
            dep["spec"].get("volumeClaimTemplates")):
        problems.append("a PersistentVolumeClaim: replicas keep their state in the database")
    return problems


def _replicated_docs() -> list[dict[str, Any]]:
    return [d for name, d in deploy_documents() if name.startswith("deploy/base/")
            or name.startswith("deploy/replicated/")]


def test_replicated_cas_survives_a_replica_and_keeps_its_database_url_secret() -> None:
    assert replicated_cas_problems(_replicated_docs()) == []


def test_replicated_cas_as_rendered_by_kubectl() -> None:
    assert replicated_cas_problems(_render("deploy/replicated")) == []


def _mutated(change: Any) -> list[str]:
    docs = copy.deepcopy(_replicated_docs())
    (dep,) = [d for d in docs if d["kind"] == "Deployment"
              and d["metadata"]["name"] == "meshshield-cas"]
    change(docs, dep, dep["spec"]["template"]["spec"])
    return replicated_cas_problems(docs)


def _cas(pod: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in pod["containers"] if c["name"] == "cas")  # type: ignore[no-any-return]


def _set_database(pod: dict[str, Any], value: str) -> None:
    args = _cas(pod)["args"]
    args[args.index("--database") + 1] = value


def _env(pod: dict[str, Any], name: str) -> dict[str, Any]:
    return next(e for e in _cas(pod)["env"] if e["name"] == name)  # type: ignore[no-any-return]


MUTATIONS: dict[str, Any] = {
    "one replica": lambda docs, dep, pod: dep["spec"].update(replicas=1),
    "replicas unset": lambda docs, dep, pod: dep["spec"].pop("replicas"),
    "no PDB": lambda docs, dep, pod: docs.remove(
        next(d for d in docs if d["kind"] == "PodDisruptionBudget"
             and d["metadata"]["name"] == "meshshield-cas")),
    "PDB selects other pods": lambda docs, dep, pod: next(
        d for d in docs if d["kind"] == "PodDisruptionBudget"
        and d["metadata"]["name"] == "meshshield-cas"
    )["spec"].update(selector={"matchLabels": {"app.kubernetes.io/name": "other"}}),
    "PDB keeps nothing": lambda docs, dep, pod: next(
        d for d in docs if d["kind"] == "PodDisruptionBudget"
        and d["metadata"]["name"] == "meshshield-cas"
    )["spec"].update(maxUnavailable=2),
    "no anti-affinity": lambda docs, dep, pod: pod.pop("affinity"),
    "anti-affinity preferred only": lambda docs, dep, pod: pod["affinity"][
        "podAntiAffinity"].pop("requiredDuringSchedulingIgnoredDuringExecution"),
    "anti-affinity by zone only": lambda docs, dep, pod: pod["affinity"]["podAntiAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"][0].update(
            topologyKey="topology.kubernetes.io/zone"),
    "URL literal in args": lambda docs, dep, pod: _set_database(
        pod, "postgresql://cas:pw@db/cas"),
    "URL from a literal env": lambda docs, dep, pod: _cas(pod).update(env=[
        *(e for e in _cas(pod)["env"] if e["name"] != "MESHSHIELD_CAS_DATABASE"),
        {"name": "MESHSHIELD_CAS_DATABASE", "value": "postgresql://cas:pw@db/cas"}]),
    "URL from a ConfigMap": lambda docs, dep, pod: _env(pod, "MESHSHIELD_CAS_DATABASE").update(
        valueFrom={"configMapKeyRef": {"name": "meshshield-cas-config", "key": "url"}}),
    "URL from an undefined env": lambda docs, dep, pod: _set_database(pod, "$(NOT_SET)"),
    "no --database": lambda docs, dep, pod: _cas(pod).update(
        args=[a for a in _cas(pod)["args"] if a not in ("--database",
                                                         "$(MESHSHIELD_CAS_DATABASE)")]),
    "migrate URL from a ConfigMap": lambda docs, dep, pod: pod["initContainers"][0][
        "env"][0].update(valueFrom={"configMapKeyRef": {"name": "x", "key": "url"}}),
    "no migrate": lambda docs, dep, pod: pod.pop("initContainers"),
    "readiness elsewhere": lambda docs, dep, pod: _cas(pod)["readinessProbe"][
        "httpGet"].update(path="/v1/health"),
}


# What the check must say for each mutation (a part of one of its problems).
CAUGHT_AS = {
    "one replica": "at least 2", "replicas unset": "at least 2",
    "no PDB": "no PodDisruptionBudget", "PDB selects other pods": "no PodDisruptionBudget",
    "PDB keeps nothing": "maxUnavailable 2", "no anti-affinity": "anti-affinity",
    "anti-affinity preferred only": "anti-affinity", "anti-affinity by zone only":
    "anti-affinity", "URL literal in args": "literal database URL",
    "URL from a literal env": "literal database URL", "URL from a ConfigMap": "from a Secret",
    "URL from an undefined env": "from a Secret", "no --database": "no --database",
    "migrate URL from a ConfigMap": "container migrate: --database",
    "no migrate": "cas migrate", "readiness elsewhere": "/v1/ready",
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_replicated_cas_check_catches(mutation: str) -> None:
    """The check above fails for each way the replicated CAS could lose its guarantees."""
    problems = _mutated(MUTATIONS[mutation])
    assert any(CAUGHT_AS[mutation] in p for p in problems), (mutation, problems)


def test_replicated_cas_command_lines_parse() -> None:
    from meshshield import cli

    (dep,) = [d for _, d in deploy_documents() if d["kind"] == "Deployment"
              and d["metadata"]["name"] == "meshshield-cas"]
    pod = dep["spec"]["template"]["spec"]
    url = "postgresql://cas@db.example/cas"

    def parse(container: dict[str, Any]) -> argparse.Namespace:
        assert container["command"] == ["meshshield"]
        args = [url if a == "$(MESHSHIELD_CAS_DATABASE)" else re.sub(r"\$\((\w+)\)", "x", a)
                for a in container["args"]]
        return cli.build_parser().parse_args(args)

    served = parse(_cas(pod))
    assert served.func is cli.cmd_cas_serve and served.database == url
    assert served.listen == "0.0.0.0:8443" and served.kek_file == "/etc/meshshield/kek/kek"
    assert "meshshield-cas.meshshield.svc" in served.dns
    (migrate,) = pod["initContainers"]
    migrated = parse(migrate)
    assert migrated.func is cli.cmd_cas_migrate and migrated.database == url
    # The same KEK Secret as the one-replica CAS, mounted where --kek-file points.
    (kek,) = [v for v in pod["volumes"] if v["name"] == "kek"]
    assert kek["secret"]["secretName"] == "meshshield-cas-kek"
    assert {"name": "kek", "mountPath": "/etc/meshshield/kek", "readOnly": True} in _cas(
        pod)["volumeMounts"]
