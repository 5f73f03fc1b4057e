"""`meshshield run`: attest once, then exec the app with its secrets in the environment.

The way SCONE's runtime hands secrets to a program: nothing is written to disk (file
secrets go into `--secrets-dir`, a tmpfs, only if one is given), the private key the
secrets were sealed to lives only in this process and is gone once it execs, and the
program sees its secrets as environment variables set by the policy's `env:` names.
A refused attestation (another measurement, a revoked one) execs nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from meshshield.attestclient import AttestRequest, attest_once
from meshshield.casclient import CasClient
from meshshield.errors import MeshError, Reason
from meshshield.sidecar.identity import validate_answer
from meshshield.sidecar.secrets import SecretFiles, environment, issuer_key, open_released

log = logging.getLogger("meshshield.run")


def prepare(client: CasClient, req: AttestRequest, secrets_dir: Path | None,
            allow_disk: bool, base_env: dict[str, str]) -> dict[str, str]:
    """Attest, open the released secrets, write the file ones; the environment to exec
    with. MeshError if any step refuses."""
    files = SecretFiles(secrets_dir, allow_disk=allow_disk) if secrets_dir else None
    result = attest_once(client, req)
    answer = validate_answer(result.key, result.response)
    field = result.response.get("secrets")
    released = () if field is None else open_released(
        result.key, field, answer.spiffe_id, answer.serial,
        issuer_key(answer.leaf, answer.bundle_pem))
    if files is not None:
        files.update(released)
    else:
        unwritten = [s.name for s in released if s.file and not s.env]
        if unwritten:
            raise MeshError(Reason.SECRET_UNAVAILABLE,
                            f"{req.session}/{req.service}: secrets {', '.join(unwritten)} are "
                            "delivered as files only; give --secrets-dir (a tmpfs)")
    env = dict(base_env)
    env.update(environment(released))
    log.info("%s: attested (serial %s); %d secret(s) for the program", answer.spiffe_id,
             answer.serial, len(released))
    return env


def exec_program(command: Sequence[str], env: dict[str, str]) -> None:
    """Replace this process with `command`; returns only if it cannot be started."""
    os.execvpe(command[0], list(command), env)  # noqa: S606 - the operator's own program
