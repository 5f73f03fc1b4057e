"""Evidence verifications per second, per platform, in one process.

    .venv/bin/python bench/verify.py [--seconds 2] [--runs 3] [--vectors DIR]

Each row verifies one real vector (PROVENANCE.md) through the CAS's entry point,
`meshshield.attestation.verify.verify_evidence`, from its evidence JSON to Claims,
in a loop for --seconds; that is repeated --runs times and the median run printed with
the spread of the runs. Single-threaded, so a row is the rate of one CPU core.

Rows: sev-snp (go-sev-guest Milan report + VCEK: ECDSA P-384 report signature and the
RSA-PSS ARK -> ASK -> VCEK chain), tdx v4 (SPR_E4) and v5 (quote_v5_sample), tdx v4
with TCB collateral (TCB info + QE identity signatures and level matching), sgx
(occlum v3 quote): DCAP quotes are four ECDSA P-256 verifications plus the PCK chain;
sim (a P-256 signature over a JSON report).

Vectors: --vectors, else $MESHSHIELD_VECTORS, else ../shared/vectors. Not a test:
nothing here asserts; it reports.
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives.serialization import Encoding  # noqa: E402

from meshshield.attestation.claims import Claims, Platform  # noqa: E402
from meshshield.attestation.collateral import load_collateral  # noqa: E402
from meshshield.attestation.sim import generate_sim_platform_key, make_sim_evidence  # noqa: E402
from meshshield.attestation.snp_chain import load_certificates  # noqa: E402
from meshshield.attestation.verify import VerifierConfig, verify_evidence  # noqa: E402

COLLATERAL = ("sample_tcbInfo_response", "sample_qeIdentity_response",
              "tcbinfo_issuer_chain.pem", "qeidentity_issuer_chain.pem")


@dataclass(frozen=True)
class Case:
    name: str
    vector: str
    at: datetime
    verify: Callable[[], Claims]


def vectors_folder(given: str | None) -> Path:
    candidate = Path(given or os.environ.get("MESHSHIELD_VECTORS") or
                     ROOT.parent / "shared" / "vectors")
    if not (candidate / "PROVENANCE.md").is_file():
        sys.exit(f"bench/verify.py: no vectors at {candidate} (PROVENANCE.md missing); "
                 "pass --vectors DIR or set MESHSHIELD_VECTORS")
    return candidate


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def cases(v: Path, collateral_dir: Path) -> list[Case]:
    def dcap(rel: str, platform: Platform, at: datetime,
             config: VerifierConfig | None = None) -> Callable[[], Claims]:
        evidence = {"quote": b64(v / rel)}
        cfg = config or VerifierConfig()
        return lambda: verify_evidence(platform, evidence, cfg, at)

    at = datetime(2025, 6, 1, tzinfo=UTC)
    vcek = load_certificates((v / "go-sev-guest/vcek.testcer").read_bytes())[0]
    snp = {"report": b64(v / "go-sev-guest/attestation.bin"),
           "certs": vcek.public_bytes(Encoding.PEM).decode()}
    sim_key = generate_sim_platform_key()
    sim = make_sim_evidence(sim_key, "ab" * 32, bytes(64))
    sim_config = VerifierConfig(sim_platform_keys=(sim_key.public_key(),))
    for name in COLLATERAL:
        shutil.copyfile(v / "go-tdx-guest" / name, collateral_dir / name)
    with_collateral = VerifierConfig(collateral=load_collateral(collateral_dir))
    at_2023 = datetime(2023, 6, 20, tzinfo=UTC)
    return [
        Case("sev-snp", "go-sev-guest/attestation.bin", at,
             lambda: verify_evidence(Platform.SEV_SNP, snp, VerifierConfig(), at)),
        Case("tdx v4", "go-tdx-guest/tdx_prod_quote_SPR_E4.dat", at,
             dcap("go-tdx-guest/tdx_prod_quote_SPR_E4.dat", Platform.TDX, at)),
        Case("tdx v5", "go-tdx-guest/quote_v5_sample.dat", datetime(2026, 2, 3, tzinfo=UTC),
             dcap("go-tdx-guest/quote_v5_sample.dat", Platform.TDX,
                  datetime(2026, 2, 3, tzinfo=UTC))),
        Case("tdx v4 + collateral", "SPR_E4 + 2023 TCB info/QE identity", at_2023,
             dcap("go-tdx-guest/tdx_prod_quote_SPR_E4.dat", Platform.TDX, at_2023,
                  with_collateral)),
        Case("sgx", "trustee-sgx/occlum_quote.dat", at,
             dcap("trustee-sgx/occlum_quote.dat", Platform.SGX, at)),
        Case("sim", "fresh P-256 platform key", at,
             lambda: verify_evidence(Platform.SIM, sim, sim_config, at)),
    ]


def rate(fn: Callable[[], Claims], seconds: float) -> float:
    n = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        fn()
        n += 1
        now = time.perf_counter()
        if now >= deadline:
            return n / (now - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=2.0, help="per run and platform")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--vectors")
    args = p.parse_args(argv)
    v = vectors_folder(args.vectors)
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for case in cases(v, Path(tmp)):
            case.verify()  # warm up, and fail loudly if the vector does not verify
            runs = [rate(case.verify, args.seconds) for _ in range(args.runs)]
            rows.append((case, statistics.median(runs), min(runs), max(runs)))
    print(f"evidence verifications per second, one core, median of {args.runs} runs "
          f"of {args.seconds:g}s (python {sys.version.split()[0]}, {os.cpu_count()} CPUs)")
    print(f"{'platform':<22}{'verif/s':>10}{'min':>10}{'max':>10}{'us/verif':>11}  vector")
    for case, med, lo, hi in rows:
        print(f"{case.name:<22}{med:>10.0f}{lo:>10.0f}{hi:>10.0f}{1e6 / med:>11.0f}  "
              f"{case.vector}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
