"""Properties: annotation parsing never crashes, injection is idempotent, patches apply."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from meshshield.kube.annotations import InjectError
from meshshield.kube.inject import inject_pod_spec
from meshshield.kube.patch import apply_patch, json_patch

KEYS = ["inject", "session", "service", "platform", "inbound", "outbound", "status"]
ROUTE_ALPHABET = "0123456789=,@:/[]. abcfdx-"

annotation_values = st.one_of(
    st.sampled_from(["true", "false", "shop", "sev-snp", "tdx", "sim", "sgx",
                     "15006=8080", "15001=pay@pay.shop.svc:15006", "15000=8080"]),
    st.text(alphabet=ROUTE_ALPHABET, max_size=40),
    st.text(max_size=10),
    st.integers(),
    st.booleans(),
    st.none(),
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(KEYS), annotation_values),
       st.sampled_from([None, "kata-qemu-snp"]))
def test_any_annotations_inject_or_refuse_cleanly(values: dict[str, Any],
                                                  runtime: str | None) -> None:
    meta = {"annotations": {f"meshshield.io/{k}": v for k, v in values.items() if v is not None},
            "labels": {"app": "backend"}}
    spec: dict[str, Any] = {"containers": [{"name": "app", "image": "app:1"}]}
    if runtime:
        spec["runtimeClassName"] = runtime
    try:
        once = inject_pod_spec(meta, spec)
    except InjectError as err:
        assert err.message
        return
    assert inject_pod_spec(*once) == once


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(alphabet="ab/~", max_size=3), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(alphabet="ab/~", max_size=3), json_values, max_size=5),
       st.dictionaries(st.text(alphabet="ab/~", max_size=3), json_values, max_size=5))
def test_json_patch_turns_old_into_new(old: dict[str, Any], new: dict[str, Any]) -> None:
    patch = json_patch(old, new)
    result = apply_patch(old, patch)
    assert json_patch(result, new) == []
    assert (patch == []) == (json_patch(old, new) == [] and not json_patch(new, old))
