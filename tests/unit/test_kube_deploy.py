"""deploy/ and injected manifests against the Kubernetes OpenAPI schemas (>= 1.29).

No kube-apiserver can be installed here, so strict schema validation (unknown fields are
errors) with kubernetes-validate, `kubectl kustomize`, and checks that the manifests'
command lines parse with meshshield's own argument parsers stand in for a cluster.
"""

from __future__ import annotations

import argparse
import json
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


def test_kubectl_kustomize_renders_the_base() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (Debian: apt-get install kubernetes-client); "
                    "schema validation above still covers every manifest")
    result = subprocess.run([kubectl, "kustomize", str(DEPLOY)], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    rendered = [d for d in yaml.safe_load_all(result.stdout) if d is not None]
    base = {name.split(":", 1)[1] for name, _ in deploy_documents()
            if not name.startswith("deploy/examples/")}
    assert {f"{d['kind']}/{d['metadata']['name']}" for d in rendered} == base
    for doc in rendered:
        validate(doc, KUBERNETES_VERSIONS[0])
