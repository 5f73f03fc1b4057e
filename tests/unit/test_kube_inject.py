"""Sidecar injection: AdmissionReview v1 in, JSONPatch out; and `inject -f` over YAML."""

from __future__ import annotations

import base64
import copy
import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshshield.kube.annotations import SGX_REFUSAL, AnnotationError, InjectError
from meshshield.kube.cli_support import run_inject
from meshshield.kube.inject import (
    APP_LISTEN_ENV,
    KATA_KERNEL_PARAMS,
    SIDECAR_NAME,
    InjectConfig,
    inject_document,
    inject_pod_spec,
)
from meshshield.kube.patch import apply_patch
from meshshield.kube.stream import inject_stream
from meshshield.kube.webhook import MalformedReview, review_response

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "kube"


def load_review() -> dict[str, Any]:
    return json.loads((FIXTURES / "pod-create.json").read_text())


def review_with(annotations: dict[str, str | None], **spec: Any) -> dict[str, Any]:
    review = load_review()
    pod = review["request"]["object"]
    for key, value in annotations.items():
        if value is None:
            pod["metadata"]["annotations"].pop(key, None)
        else:
            pod["metadata"]["annotations"][key] = value
    pod["spec"].update(spec)
    return review


def patched_pod(review: dict[str, Any]) -> dict[str, Any]:
    decision = review_response(review)
    response = decision.response["response"]
    assert response["allowed"] is True
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    return apply_patch(review["request"]["object"], patch)  # type: ignore[no-any-return]


def sidecar_of(spec: dict[str, Any]) -> dict[str, Any]:
    sidecar = spec["initContainers"][0]
    assert sidecar["name"] == SIDECAR_NAME
    return sidecar  # type: ignore[no-any-return]


def flags(container: dict[str, Any]) -> dict[str, list[str]]:
    args = container["args"]
    assert container["command"] == ["meshshield"] and args[0] == "sidecar"
    out: dict[str, list[str]] = {}
    for name, value in zip(args[1::2], args[2::2], strict=True):
        out.setdefault(name, []).append(value)
    return out


# ---- the webhook's decision over real AdmissionReview v1 JSON ------------------------

def test_annotated_pod_create_gets_a_native_sidecar() -> None:
    review = load_review()
    decision = review_response(review)
    assert decision.result == "injected"
    envelope = decision.response
    assert envelope["apiVersion"] == "admission.k8s.io/v1"
    assert envelope["kind"] == "AdmissionReview"
    assert envelope["response"]["uid"] == review["request"]["uid"]

    pod = patched_pod(review)
    spec = pod["spec"]
    sidecar = sidecar_of(spec)
    assert sidecar["restartPolicy"] == "Always"
    assert flags(sidecar) == {
        "--cas": ["https://meshshield-cas.meshshield.svc:8443"],
        "--cas-bundle": ["/etc/meshshield/cas/bundle.pem"],
        "--session": ["shop"],
        "--service": ["backend"],  # from the app.kubernetes.io/name label
        "--platform": ["sev-snp"],
        "--inbound": ["0.0.0.0:15006=127.0.0.1:8080"],
        "--outbound": ["127.0.0.1:15001=payments@payments.shop.svc:15006"],
        "--admin-listen": ["127.0.0.1:15000"],
        "--health-listen": ["0.0.0.0:15021"],
    }
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/ready", "port": 15021}
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/ready", "port": 15021}
    assert sidecar["livenessProbe"]["httpGet"] == {"path": "/live", "port": 15021}
    assert set(sidecar["resources"]) == {"requests", "limits"}
    assert set(sidecar["resources"]["limits"]) == {"cpu", "memory"}
    assert sidecar["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 1337,
        "runAsGroup": 1337,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    # The CAS bundle comes from a ConfigMap; the key lives only in memory.
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["meshshield-cas-bundle"]["configMap"]["name"] == "meshshield-cas-bundle"
    assert volumes["meshshield-tmp"]["emptyDir"]["medium"] == "Memory"
    assert "kube-api-access-x7k2p" in volumes  # the pod's own volumes stay
    # The evidence source of a confidential pod: the CoCo guest components' REST API.
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    assert env["MESHSHIELD_EVIDENCE_SOURCE"] == "coco-aa"
    assert env["MESHSHIELD_COCO_AA_URL"] == "http://127.0.0.1:8006"
    annotations = pod["metadata"]["annotations"]
    assert "agent.guest_components_rest_api=all" in annotations[KATA_KERNEL_PARAMS].split()
    # The app is told to listen on loopback only, and keeps its own environment.
    app = spec["containers"][0]
    assert app["env"] == [
        {"name": "LOG_LEVEL", "value": "info"},
        {"name": APP_LISTEN_ENV, "value": "127.0.0.1"},
    ]
    status = json.loads(annotations["meshshield.io/status"])
    assert status["image"] == InjectConfig().image
    assert status["sidecarVersion"]
    assert status["inboundPorts"] == [15006]
    assert status["healthPort"] == 15021 and status["adminPort"] == 15000
    assert status["simulated"] is False


def test_pod_without_annotation_is_left_alone() -> None:
    review = review_with({"meshshield.io/inject": None})
    decision = review_response(review)
    assert decision.result == "unchanged"
    assert decision.response["response"] == {"uid": review["request"]["uid"], "allowed": True}


def test_pod_with_no_annotations_at_all_is_left_alone() -> None:
    review = load_review()
    del review["request"]["object"]["metadata"]["annotations"]
    assert review_response(review).result == "unchanged"


def test_opted_out_pod_is_left_alone() -> None:
    review = review_with({"meshshield.io/inject": "false"})
    decision = review_response(review)
    assert decision.result == "unchanged"
    assert "patch" not in decision.response["response"]


def test_already_injected_pod_gets_no_patch() -> None:
    review = load_review()
    review["request"]["object"] = patched_pod(review)
    decision = review_response(review)
    assert decision.result == "unchanged"
    assert decision.response["response"] == {"uid": review["request"]["uid"], "allowed": True}


def test_pod_injected_with_an_older_configuration_is_brought_up_to_date() -> None:
    review = load_review()
    old = inject_pod_spec(review["request"]["object"]["metadata"],
                          review["request"]["object"]["spec"], InjectConfig(image="old:1"))
    review["request"]["object"]["metadata"], review["request"]["object"]["spec"] = old
    pod = patched_pod(review)
    assert sidecar_of(pod["spec"])["image"] == InjectConfig().image
    assert [c["name"] for c in pod["spec"]["initContainers"]].count(SIDECAR_NAME) == 1
    assert [e["name"] for e in pod["spec"]["containers"][0]["env"]].count(APP_LISTEN_ENV) == 1


BAD_ANNOTATIONS = [
    ({"meshshield.io/inject": "yes"}, "meshshield.io/inject", '"true" or "false"'),
    ({"meshshield.io/session": None}, "meshshield.io/session", "[a-z0-9-]{1,63}"),
    ({"meshshield.io/session": "Shop"}, "meshshield.io/session", "[a-z0-9-]{1,63}"),
    ({"meshshield.io/service": "back_end"}, "meshshield.io/service", "[a-z0-9-]{1,63}"),
    ({"meshshield.io/platform": None}, "meshshield.io/platform", "sev-snp, tdx, sim"),
    ({"meshshield.io/platform": "sev"}, "meshshield.io/platform", "sev-snp, tdx, sim"),
    ({"meshshield.io/inbound": "15006"}, "meshshield.io/inbound", "LISTEN_PORT=APP_PORT"),
    ({"meshshield.io/inbound": "15006=http"}, "meshshield.io/inbound", "LISTEN_PORT=APP_PORT"),
    ({"meshshield.io/inbound": "15006=8080,"}, "meshshield.io/inbound", "LISTEN_PORT=APP_PORT"),
    ({"meshshield.io/inbound": "99999=8080"}, "meshshield.io/inbound", "LISTEN_PORT=APP_PORT"),
    ({"meshshield.io/inbound": "8080=8080"}, "meshshield.io/inbound", "LISTEN_PORT=APP_PORT"),
    ({"meshshield.io/inbound": "15006=8080,15006=9090"}, "meshshield.io/inbound", "used once"),
    ({"meshshield.io/inbound": None, "meshshield.io/outbound": None},
     "meshshield.io/inbound", "at least one route"),
    ({"meshshield.io/outbound": "15001=payments"}, "meshshield.io/outbound", "SERVICE@HOST:PORT"),
    ({"meshshield.io/outbound": "15001=payments@payments.shop.svc"},
     "meshshield.io/outbound", "SERVICE@HOST:PORT"),
    ({"meshshield.io/outbound": "15001=Pay@payments.shop.svc:15006"},
     "meshshield.io/outbound", "SERVICE@HOST:PORT"),
    ({"meshshield.io/outbound": "15001=payments@bad_host:15006"},
     "meshshield.io/outbound", "SERVICE@HOST:PORT"),
    ({"meshshield.io/outbound": "15006=payments@payments.shop.svc:15006"},
     "meshshield.io/outbound", "used once"),
]


@pytest.mark.parametrize(("annotations", "annotation", "expected"), BAD_ANNOTATIONS)
def test_bad_annotation_is_denied_with_a_message_naming_it(
    annotations: dict[str, str | None], annotation: str, expected: str
) -> None:
    review = review_with(annotations)
    decision = review_response(review)
    response = decision.response["response"]
    assert decision.result == "denied"
    assert response["allowed"] is False
    assert response["uid"] == review["request"]["uid"]
    message = response["status"]["message"]
    assert f"annotation {annotation}: expected" in message
    assert expected in message
    assert "patch" not in response


def test_sgx_is_refused_with_the_reason() -> None:
    decision = review_with({"meshshield.io/platform": "sgx"})
    message = review_response(decision).response["response"]["status"]["message"]
    assert "meshshield.io/platform" in message
    assert SGX_REFUSAL in message
    assert "inside the app's own enclave" in message


def test_service_falls_back_to_labels_and_is_required_without_them() -> None:
    review = load_review()
    del review["request"]["object"]["metadata"]["labels"]["app.kubernetes.io/name"]
    message = review_response(review).response["response"]["status"]["message"]
    assert "annotation meshshield.io/service: expected" in message


@pytest.mark.parametrize(
    ("spec", "phrase"),
    [
        ({"hostNetwork": True}, "hostNetwork"),
        ({"runtimeClassName": None}, "runtimeClassName"),
    ],
)
def test_pods_that_cannot_be_meshed_are_denied(spec: dict[str, Any], phrase: str) -> None:
    review = review_with({}, **spec)
    if spec.get("runtimeClassName", "") is None:
        del review["request"]["object"]["spec"]["runtimeClassName"]
    response = review_response(review).response["response"]
    assert response["allowed"] is False
    assert phrase in response["status"]["message"]


def test_app_port_clashing_with_a_sidecar_port_is_denied() -> None:
    review = load_review()
    review["request"]["object"]["spec"]["containers"][0]["ports"].append(
        {"containerPort": 15021, "protocol": "TCP"})
    message = review_response(review).response["response"]["status"]["message"]
    assert "15021" in message


def test_reserved_sidecar_ports_are_refused_in_annotations() -> None:
    response = review_response(review_with({"meshshield.io/inbound": "15000=8080"}))
    assert response.response["response"]["allowed"] is False
    assert "admin port" in response.response["response"]["status"]["message"]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda r: r.update(apiVersion="admission.k8s.io/v1beta1"),
        lambda r: r.update(kind="Pod"),
        lambda r: r.pop("request"),
        lambda r: r["request"].pop("uid"),
        lambda r: r["request"].update(uid=""),
        lambda r: r["request"].update(object="not a pod"),
        lambda r: r["request"]["object"].update(spec=[]),
    ],
)
def test_malformed_review_is_rejected(mutate: Any) -> None:
    review = load_review()
    mutate(review)
    with pytest.raises(MalformedReview):
        review_response(review)


@pytest.mark.parametrize("body", [None, [], "AdmissionReview", 42])
def test_non_object_review_is_rejected(body: Any) -> None:
    with pytest.raises(MalformedReview):
        review_response(body)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda r: r["request"].update(operation="UPDATE"),
        lambda r: r["request"].update(kind={"group": "apps", "version": "v1",
                                            "kind": "Deployment"}),
        lambda r: r["request"].update(subResource="ephemeralcontainers"),
    ],
)
def test_other_requests_are_allowed_untouched(mutate: Any) -> None:
    review = load_review()
    mutate(review)
    decision = review_response(review)
    assert decision.result == "skipped"
    assert decision.response["response"] == {"uid": review["request"]["uid"], "allowed": True}


# ---- the pure functions ---------------------------------------------------------------

def test_inject_pod_spec_is_pure_and_idempotent() -> None:
    pod = load_review()["request"]["object"]
    before = copy.deepcopy(pod)
    once = inject_pod_spec(pod["metadata"], pod["spec"])
    assert pod == before
    twice = inject_pod_spec(*once)
    assert twice == once


def test_sim_pod_mounts_its_platform_key() -> None:
    review = review_with({"meshshield.io/platform": "sim"})
    del review["request"]["object"]["spec"]["runtimeClassName"]
    pod = patched_pod(review)
    sidecar = sidecar_of(pod["spec"])
    assert flags(sidecar)["--sim-key"] == ["/etc/meshshield/sim/sim-platform.key"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["meshshield-sim-key"]["secret"]["secretName"] == "meshshield-sim-key"
    assert KATA_KERNEL_PARAMS not in pod["metadata"]["annotations"]
    assert json.loads(pod["metadata"]["annotations"]["meshshield.io/status"])["simulated"]


def test_existing_kata_kernel_params_are_kept() -> None:
    params = "agent.log=debug agent.guest_components_rest_api=resource"
    review = review_with({KATA_KERNEL_PARAMS: params})
    pod = patched_pod(review)
    assert pod["metadata"]["annotations"][KATA_KERNEL_PARAMS] == (
        "agent.log=debug agent.guest_components_rest_api=all")


def test_kernel_params_can_be_left_to_the_runtime_class() -> None:
    pod = load_review()["request"]["object"]
    meta, _ = inject_pod_spec(pod["metadata"], pod["spec"],
                              InjectConfig(coco_kernel_params=False))
    assert KATA_KERNEL_PARAMS not in meta["annotations"]


def test_multiple_routes_and_ipv6_targets() -> None:
    review = review_with({
        "meshshield.io/inbound": "15006=8080, 15007=9090",
        "meshshield.io/outbound": "15001=billing/payments@[fd00::1]:15006,15002=db@10.0.0.7:15006",
    })
    f = flags(sidecar_of(patched_pod(review)["spec"]))
    assert f["--inbound"] == ["0.0.0.0:15006=127.0.0.1:8080", "0.0.0.0:15007=127.0.0.1:9090"]
    assert f["--outbound"] == ["127.0.0.1:15001=billing/payments@[fd00::1]:15006",
                               "127.0.0.1:15002=db@10.0.0.7:15006"]


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="cpu request"):
        InjectConfig(cpu_request="lots")
    with pytest.raises(ValueError, match="CAS URL"):
        InjectConfig(cas_url="http://cas:8080")


def _template_spec(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "Pod":
        return doc["spec"]  # type: ignore[no-any-return]
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]  # type: ignore[no-any-return]
    return doc["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def test_every_workload_kind_is_injected_once() -> None:
    docs = list(yaml.safe_load_all((FIXTURES / "workloads.yaml").read_text()))
    injected = {d["kind"]: inject_document(d) for d in docs}
    for kind in ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"):
        spec = _template_spec(injected[kind])
        assert sidecar_of(spec)["restartPolicy"] == "Always", kind
        assert inject_document(injected[kind]) == injected[kind], kind
    assert "initContainers" not in injected["Pod"]["spec"]  # opted out
    for kind in ("Namespace", "Service", "ConfigMap"):
        assert injected[kind] == next(d for d in docs if d["kind"] == kind)


def test_list_documents_are_injected_item_by_item() -> None:
    pod = load_review()["request"]["object"]
    out = inject_document({"apiVersion": "v1", "kind": "List", "items": [pod]})
    assert sidecar_of(out["items"][0]["spec"])


def test_document_errors_name_the_object() -> None:
    doc = yaml.safe_load("""
apiVersion: apps/v1
kind: Deployment
metadata: {name: backend, namespace: shop}
spec:
  template:
    metadata:
      annotations: {meshshield.io/inject: "true", meshshield.io/session: shop,
                    meshshield.io/service: backend, meshshield.io/platform: sgx,
                    meshshield.io/inbound: "15006=8080"}
    spec:
      containers: [{name: app, image: app:1}]
""")
    with pytest.raises(InjectError, match=r"^bad_request: Deployment shop/backend: annotation"):
        inject_document(doc)


def test_annotation_error_carries_its_parts() -> None:
    err = AnnotationError("meshshield.io/inbound", "PORT=PORT", "x")
    assert (err.annotation, err.expected, err.found) == ("meshshield.io/inbound", "PORT=PORT", "x")
    assert err.message == 'annotation meshshield.io/inbound: expected PORT=PORT, found "x"'


# ---- inject -f: multi-document YAML ---------------------------------------------------

def test_inject_stream_is_idempotent_and_keeps_other_documents_byte_for_byte() -> None:
    text = (FIXTURES / "workloads.yaml").read_text()
    once = inject_stream(text)
    assert inject_stream(once) == once
    # Unchanged documents are copied through verbatim, comments and flow style included.
    for kept in (
        "# Source: shop/templates/workloads.yaml\n",
        "    meshshield.io/injection: enabled   # the webhook's namespace selector\n",
        "  selector: {app.kubernetes.io/name: backend}\n",
        '    meshshield.io/inject: "false"   # opted out\n',
        "  # a comment the output must keep\n",
        "    not: a document marker, it is indented\n",
    ):
        assert kept in once
    # A changed document keeps the comment above it.
    assert "---\n# the backend: injected\napiVersion: apps/v1\n" in once
    before = list(yaml.safe_load_all(text))
    after = list(yaml.safe_load_all(once))
    assert len(before) == len(after)
    assert [d["kind"] for d in before] == [d["kind"] for d in after]
    assert after[-1] == before[-1] and after[0] == before[0]


def test_inject_stream_without_workloads_is_the_identity() -> None:
    text = "# nothing to do\n---\napiVersion: v1\nkind: Service\nmetadata: {name: a}\n---\n"
    assert inject_stream(text) == text


def test_unannotated_workloads_without_template_metadata_stay_byte_for_byte() -> None:
    text = ("apiVersion: batch/v1\nkind: Job\nmetadata: {name: once}\nspec:\n  template:\n"
            "    spec:\n      restartPolicy: Never\n      containers: [{name: a, image: a}]\n"
            "---\napiVersion: v1\nkind: Pod\nspec:\n  containers: [{name: a, image: a}]\n")
    assert inject_stream(text) == text


def test_inject_stream_reports_the_document() -> None:
    text = (FIXTURES / "workloads.yaml").read_text().replace("platform: tdx", "platform: sgx", 1)
    with pytest.raises(InjectError, match=r"document 3 \(line 23\), Deployment shop/backend: "
                                          r"annotation meshshield.io/platform"):
        inject_stream(text)


def test_inject_stream_rejects_invalid_yaml() -> None:
    with pytest.raises(InjectError, match="invalid YAML: line 2"):
        inject_stream("a: 1\n b: [\n")


def test_run_inject_prints_the_injected_stream(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text((FIXTURES / "workloads.yaml").read_text())
    out, err = io.StringIO(), io.StringIO()
    assert run_inject(str(path), stdout=out, stderr=err) == 0
    assert err.getvalue() == ""
    assert out.getvalue() == inject_stream(path.read_text())


def test_run_inject_reads_stdin() -> None:
    pod = load_review()["request"]["object"]
    out = io.StringIO()
    assert run_inject("-", stdin=io.StringIO(json.dumps(pod)), stdout=out,
                      stderr=io.StringIO()) == 0
    assert SIDECAR_NAME in out.getvalue()


def test_run_inject_refusals_exit_1_with_the_reason(tmp_path: Path) -> None:
    err = io.StringIO()
    assert run_inject(str(tmp_path / "missing.yaml"), stdout=io.StringIO(), stderr=err) == 1
    assert "cannot read" in err.getvalue()
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(review_with({"meshshield.io/inbound": "x"})["request"]["object"]))
    out, err = io.StringIO(), io.StringIO()
    assert run_inject(str(bad), stdout=out, stderr=err) == 1
    assert out.getvalue() == ""
    assert "annotation meshshield.io/inbound: expected" in err.getvalue()
    assert "Traceback" not in err.getvalue()


def test_workload_api_annotation_shares_the_socket_with_the_app() -> None:
    review = review_with({"meshshield.io/workload-api": "true"})
    pod = patched_pod(review)
    spec = pod["spec"]
    sidecar = sidecar_of(spec)
    f = flags(sidecar)
    socket = "unix:///run/meshshield/workload/agent.sock"
    assert f["--workload-api"] == [socket] and f["--workload-api-group"] == ["1338"]
    assert {"name": "meshshield-workload-api", "mountPath": "/run/meshshield"} in \
        sidecar["volumeMounts"]
    for app in spec["containers"]:
        assert {"name": "SPIFFE_ENDPOINT_SOCKET", "value": socket} in app["env"]
        assert {"name": "meshshield-workload-api", "mountPath": "/run/meshshield",
                "readOnly": True} in app["volumeMounts"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["meshshield-workload-api"]["emptyDir"]["medium"] == "Memory"
    assert 1338 in spec["securityContext"]["supplementalGroups"]
    assert json.loads(pod["metadata"]["annotations"]["meshshield.io/status"])[
        "workloadApi"] == socket


def test_workload_api_injection_is_idempotent_and_reversible() -> None:
    pod = load_review()["request"]["object"]
    plain = inject_pod_spec(pod["metadata"], pod["spec"])
    pod["metadata"]["annotations"]["meshshield.io/workload-api"] = "true"
    once = inject_pod_spec(pod["metadata"], pod["spec"])
    assert inject_pod_spec(*once) == once
    meta, spec = copy.deepcopy(once)
    meta["annotations"]["meshshield.io/workload-api"] = "false"
    off = inject_pod_spec(meta, spec)
    meta_plain, spec_plain = plain
    assert off[1] == spec_plain
    assert {k: v for k, v in off[0]["annotations"].items()
            if k != "meshshield.io/workload-api"} == meta_plain["annotations"]


def test_workload_api_annotation_must_be_true_or_false() -> None:
    pod = load_review()["request"]["object"]
    pod["metadata"]["annotations"]["meshshield.io/workload-api"] = "yes"
    with pytest.raises(AnnotationError, match="meshshield.io/workload-api"):
        inject_pod_spec(pod["metadata"], pod["spec"])


def test_workload_api_reversal_without_a_pod_security_context() -> None:
    pod = load_review()["request"]["object"]
    pod["spec"].pop("securityContext", None)
    plain = inject_pod_spec(pod["metadata"], pod["spec"])
    pod["metadata"]["annotations"]["meshshield.io/workload-api"] = "true"
    meta, spec = inject_pod_spec(pod["metadata"], pod["spec"])
    assert spec["securityContext"] == {"supplementalGroups": [1338]}
    meta["annotations"]["meshshield.io/workload-api"] = "false"
    assert inject_pod_spec(meta, spec)[1] == plain[1]


def test_cas_expect_annotation_mounts_the_expect_file_and_passes_it() -> None:
    pod = patched_pod(review_with({"meshshield.io/cas-expect": "cas-expect/cas.yaml"}))
    spec = pod["spec"]
    sidecar = sidecar_of(spec)
    assert flags(sidecar)["--cas-expect"] == ["/etc/meshshield/cas-expect/cas.yaml"]
    assert {"name": "meshshield-cas-expect", "mountPath": "/etc/meshshield/cas-expect",
            "readOnly": True} in sidecar["volumeMounts"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["meshshield-cas-expect"]["configMap"] == {
        "name": "cas-expect", "items": [{"key": "cas.yaml", "path": "cas.yaml"}]}


def test_cas_expect_injection_is_idempotent_and_reversible() -> None:
    pod = load_review()["request"]["object"]
    plain = inject_pod_spec(pod["metadata"], pod["spec"])
    pod["metadata"]["annotations"]["meshshield.io/cas-expect"] = "cas-expect/cas.yaml"
    once = inject_pod_spec(pod["metadata"], pod["spec"])
    assert inject_pod_spec(*once) == once
    meta, spec = copy.deepcopy(once)
    del meta["annotations"]["meshshield.io/cas-expect"]
    assert inject_pod_spec(meta, spec)[1] == plain[1]


@pytest.mark.parametrize("value", ["nokey", "/k", "Bad/k", "cm/", "cm/a/b", "cm/..", 7])
def test_cas_expect_annotation_is_checked(value: object) -> None:
    pod = load_review()["request"]["object"]
    pod["metadata"]["annotations"]["meshshield.io/cas-expect"] = value
    with pytest.raises(AnnotationError, match="meshshield.io/cas-expect"):
        inject_pod_spec(pod["metadata"], pod["spec"])


def test_secrets_annotation_mounts_a_memory_folder_read_only_into_the_app() -> None:
    pod = patched_pod(review_with({"meshshield.io/secrets": "true"}))
    spec = pod["spec"]
    sidecar = sidecar_of(spec)
    assert flags(sidecar)["--secrets-dir"] == ["/run/meshshield-secrets"]
    assert {"name": "meshshield-secrets", "mountPath": "/run/meshshield-secrets"} in \
        sidecar["volumeMounts"]
    for app in spec["containers"]:
        assert {"name": "meshshield-secrets", "mountPath": "/run/secrets",
                "readOnly": True} in app["volumeMounts"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["meshshield-secrets"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Mi"}
    plain = patched_pod(review_with({}))
    assert "--secrets-dir" not in flags(sidecar_of(plain["spec"]))
    assert "meshshield-secrets" not in {v["name"] for v in plain["spec"]["volumes"]}


def test_secrets_injection_is_idempotent_and_reversible() -> None:
    pod = load_review()["request"]["object"]
    plain = inject_pod_spec(pod["metadata"], pod["spec"])
    pod["metadata"]["annotations"]["meshshield.io/secrets"] = "true"
    once = inject_pod_spec(pod["metadata"], pod["spec"])
    assert inject_pod_spec(*once) == once
    meta, spec = copy.deepcopy(once)
    meta["annotations"]["meshshield.io/secrets"] = "false"
    off = inject_pod_spec(meta, spec)
    assert off[1] == plain[1]
    pod["metadata"]["annotations"]["meshshield.io/secrets"] = "yes"
    with pytest.raises(AnnotationError, match="meshshield.io/secrets"):
        inject_pod_spec(pod["metadata"], pod["spec"])
