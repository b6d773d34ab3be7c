"""Every Triton kernel configuration, compiled ahead of time for sm_90a and sm_80 on this machine (no GPU needed).

The check runs `python -m sarkern.kernels.compile_report --check` in a subprocess, because this test session runs
the kernels under Triton's interpreter, whose kernels cannot be compiled. It fails on register spills, shared memory
beyond the SM's, and 16-bit GEMM loops without tensor-core MMA (wgmma on sm_90a).
"""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "benchmarks" / "results" / "kernels-static.json"

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() not in ("x86_64", "aarch64"),
    reason="Triton ships ptxas only for Linux x86_64/aarch64",
)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("static") / "kernels-static.md"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run(
        [sys.executable, "-m", "sarkern.kernels.compile_report", "--check", "--jobs", "2", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    return result, json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else None


def test_every_configuration_compiles_without_spills_and_uses_tensor_cores(report):
    result, rows = report
    assert result.returncode == 0, result.stderr[-4000:]
    assert rows, "the report has no rows"
    sixteen_bit_gemms = [r for r in rows if r["gemm_dtype"] in ("bf16", "fp16")]
    assert {r["target"] for r in sixteen_bit_gemms} == {"sm_90a", "sm_80"}
    for row in rows:
        assert row["spill_instructions"] == 0 and row["ctas_per_sm"] >= 1, row
    for row in sixteen_bit_gemms:
        assert row["mma_instructions"] > 0, row


def test_the_committed_report_covers_the_same_configurations(report):
    """The committed report must be regenerated (`make static-report`) whenever a configuration changes."""
    _, rows = report
    committed = json.loads(COMMITTED.read_text())
    key = lambda r: (r["target"], r["kernel"], r["warps"], r["stages"])  # noqa: E731
    assert sorted(map(key, committed)) == sorted(map(key, rows))
