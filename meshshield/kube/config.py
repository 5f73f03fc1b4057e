"""Injector configuration: what every injected pod gets (image, CAS, sidecar sizes)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from meshshield import __version__

_QUANTITY_RE = re.compile(r"[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?")


@dataclass(frozen=True)
class InjectConfig:
    """What the injector puts into every pod; one per webhook or `inject` run."""

    image: str = f"meshshield:{__version__}"
    image_pull_policy: str = "IfNotPresent"
    cas_url: str = "https://meshshield-cas.meshshield.svc:8443"
    cas_bundle_configmap: str = "meshshield-cas-bundle"
    cas_bundle_key: str = "bundle.pem"
    sim_key_secret: str = "meshshield-sim-key"  # noqa: S105 - a Secret's name, not a secret
    cpu_request: str = "50m"
    memory_request: str = "64Mi"
    cpu_limit: str = "1"
    memory_limit: str = "256Mi"
    admin_port: int = 15000
    health_port: int = 15021
    listen_host: str = "0.0.0.0"  # noqa: S104 - the sidecar's ports are the pod's front door
    run_as_user: int = 1337
    # With meshshield.io/workload-api: the group that may reach the Workload API socket,
    # added to the pod's supplementalGroups (so the app's containers are members).
    workload_api_group: int = 1338
    coco_aa_url: str = "http://127.0.0.1:8006"
    # Add agent.guest_components_rest_api=all to the pod's Kata kernel_params annotation
    # (needs "kernel_params" in the runtime's enable_annotations). Turn off where the
    # runtime class already sets it, or where per-pod kernel params are not allowed.
    coco_kernel_params: bool = True
    extra_env: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        problems = []
        if not self.image or any(c.isspace() for c in self.image):
            problems.append(f"image: expected an image reference, found {self.image!r}")
        if self.image_pull_policy not in ("Always", "IfNotPresent", "Never"):
            problems.append(f"image pull policy: expected Always, IfNotPresent or Never, "
                            f"found {self.image_pull_policy!r}")
        if not self.cas_url.startswith("https://"):
            problems.append(f"CAS URL: expected https://HOST:PORT, found {self.cas_url!r}")
        for name in ("cpu_request", "memory_request", "cpu_limit", "memory_limit"):
            value = getattr(self, name)
            if not _QUANTITY_RE.fullmatch(value):
                problems.append(f"{name.replace('_', ' ')}: expected a Kubernetes quantity "
                                f"such as 50m or 64Mi, found {value!r}")
        for name in ("admin_port", "health_port"):
            port = getattr(self, name)
            if not 1 <= port <= 65535:
                problems.append(f"{name.replace('_', ' ')}: expected 1..65535, found {port}")
        if self.admin_port == self.health_port:
            problems.append("admin port and health port must differ")
        if not 1 <= self.workload_api_group <= 2**31 - 1:
            problems.append(f"workload API group: expected a gid, found {self.workload_api_group}")
        if not 1 <= self.run_as_user:
            problems.append(f"run as user: expected a non-root uid, found {self.run_as_user}")
        if problems:
            raise ValueError("; ".join(problems))


DEFAULT_CONFIG = InjectConfig()
