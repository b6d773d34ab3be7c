"""`make gpu-check`'s script (benchmarks/gpu_check.py and its package benchmarks/gpucheck/) on the CPU at tiny shapes,
so it cannot rot between GPU runs.

The whole run goes through the same code as on a GPU: sarkern's Triton kernels under the interpreter and its torch
path, the peers that are installed, the scorer against the paper's way, the GPU tests (skipped here), the report.
Time budgets are scaled up so that a slow machine never turns a section into "skipped": nothing here depends on
timing. The helpers that decide a section's fate (failure capture, nested time limits, target verdicts) are tested
directly. (Not named `test_gpu_*.py`: the script runs those, and would run itself.)
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpucheck import install  # noqa: E402
from gpucheck.environment import source_digest  # noqa: E402
from gpucheck.gpu_tests import gpu_test_parts, import_check, junit_summary, log_summary  # noqa: E402
from gpucheck.main import SECTION_GRACE_S, SECTIONS, build_parser, section_budget  # noqa: E402
from gpucheck.ops import time_op_family  # noqa: E402
from gpucheck.render import render  # noqa: E402
from gpucheck.report import Run  # noqa: E402
from gpucheck.settings import FULL, TINY  # noqa: E402
from gpucheck.targets import evaluate_targets  # noqa: E402
from gpucheck.timing import BudgetExceeded, Device, Unavailable, outcome_of, time_limit  # noqa: E402
from gpucheck.variants import checked_candidates  # noqa: E402

GPU_WINDOW = ROOT / "benchmarks" / "GPU_WINDOW.md"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    no_wheels = tmp_path_factory.mktemp("no-wheels")  # the carried-wheels path, with nothing carried
    # As on the GPU machine: no PYTHONPATH (the entry script finds its package itself), and PYTHONSAFEPATH=1, under
    # which Python puts not even the script's folder on the path.
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONSAFEPATH": "1"}
    env.pop("SARKERN_BACKEND", None)
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_check.py"),
            "--tiny",
            "--out",
            str(out),
            "--budget-scale",
            "20",
            "--wheels",
            str(no_wheels),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=1800,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (json_path,) = out.glob("*.json")
    return out, json_path, json.loads(json_path.read_text()), done.stdout


def test_tiny_run_writes_both_reports(tiny_run):
    out, json_path, data, stdout = tiny_run
    assert json_path.name.startswith("cpu-tiny-") and json_path.name == f"{data['tag']}.json"
    md = (out / f"{data['tag']}.md").read_text()
    for heading in ("## Targets", "## Ceilings", "## GPU tests", "## SAR scoring", "## Contenders"):
        assert heading in md
    assert (out / f"{data['tag']}.tests.kernels.junit.xml").exists()
    assert (out / f"{data['tag']}.tests.others.junit.xml").exists()
    assert "== summary" in stdout  # the short table the device tool's reply ends with
    assert "no wheels in" in stdout


def test_tiny_run_every_section_ran(tiny_run):
    _, _, data, _ = tiny_run
    assert data["mode"] == "tiny"
    assert {name: s["status"] for name, s in data["sections"].items()} == dict.fromkeys(SECTIONS, "ok")
    # Every section but the environment ran in a process of its own; the time each used is recorded.
    assert all("process_seconds" in s for name, s in data["sections"].items() if name != "environment")
    assert all(0 < s["seconds"] <= s["budget_s"] for s in data["sections"].values())
    assert data["versions"]["torch"] and data["sarkern"]["source_digest"] == source_digest()
    # The GPU tests were collected and skipped for want of CUDA: collected, not lost.
    tests = data["tests"]
    assert tests["exit_code"] == 0 and tests["failed"] == tests["errors"] == 0 and tests["skipped"] > 0
    assert all(name.startswith("test_gpu_") for name in tests["files"])
    # The Triton kernel tests first, in a pytest of their own, then the FlexAttention ones.
    assert list(tests["parts"]) == ["kernels", "others"]
    assert tests["parts"]["kernels"]["files"] == ["test_gpu_kernels.py"]
    assert "test_gpu_flex.py" in tests["parts"]["others"]["files"]
    assert all(part["seconds"] <= part["timeout_s"] for part in tests["parts"].values())


def test_tiny_run_gpu_tests_imported_the_installed_sarkern(tiny_run):
    """The GPU tests' pytest imported sarkern and sarkern.kernels from the temporary install, not from the checkout's
    source tree (which has no sarkern.kernels): recorded before the tests skip for want of CUDA."""
    _, _, data, _ = tiny_run
    check = data["tests"]["import_check"]
    assert check["ok"] is True, check
    site = Path(check["site"]).resolve()
    assert not site.is_relative_to(ROOT)
    for key in ("sarkern", "sarkern.kernels"):
        assert Path(check[key]).resolve().is_relative_to(site), check
    assert check["safe_path"] is True
    assert Path(data["sarkern"]["imported_from"]).resolve().is_relative_to(site)  # the sections' processes too


def test_tiny_run_records_the_versions_the_peers_need(tiny_run):
    _, _, data, stdout = tiny_run
    for dist in ("numpy", "datasets", "pyarrow", "fsspec", "trl", "liger-kernel", "cut-cross-entropy", "dill"):
        assert dist in data["versions"]
    peers = data["peer_requirements"]
    assert set(peers) == {"installed", "unmet", "lost", "rows_lost"}
    assert ("peers' requirements: all met" in stdout) == (not peers["lost"])


@pytest.mark.parametrize("family", ["linear", "logits"])
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
def test_tiny_run_ops_checked_against_float64(tiny_run, family, mode):
    _, _, data, _ = tiny_run
    rows = data["ops"][family][mode]
    refused = data["sarkern"]["refused_backends"]
    for backend in ("triton", "torch"):
        row = rows[f"sarkern[{backend}]"]
        if backend in refused:  # Triton's interpreter broken with this numpy: refused by name, never run
            assert backend == "triton" and "interpreter" in refused[backend]
            assert row == {"status": "unavailable", "reason": refused[backend]}
            continue
        assert row["status"] == "ok", row
        assert row["check"]["ok"] is True, row["check"]
        assert ("grad_rel_errors" if mode == "forward_backward" else "max_abs_error") in row["check"]
        assert row["median_ms"] > 0 and row["peak_extra_mib"] >= 0
        assert row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
    assert rows["naive"]["status"] == "ok" and rows["naive"]["x_sarkern_time"] > 0
    if family == "linear" and "triton" not in refused:  # how the fused forward launched, where the kernels ran it
        assert "resident programs" in rows["sarkern[triton]"]["launch"] and rows["sarkern[torch]"]["launch"] is None
    # Every peer has a row; one that cannot run here says why instead of crashing the run.
    import contenders

    assert set(contenders.FAMILIES[family]) - {"sarkern"} <= set(rows)
    for key, row in rows.items():
        assert row["status"] in ("ok", "unavailable"), row
        assert row["status"] == "ok" or row["reason"]
        if key in data["peer_requirements"]["rows_lost"]:
            assert row == {"status": "unavailable", "reason": data["peer_requirements"]["rows_lost"][key]}


def test_tiny_run_sequence_perplexity_and_scorer(tiny_run):
    _, _, data, _ = tiny_run
    for key, row in data["ops"]["sequence_perplexity"]["forward"].items():
        if "triton" in key and "triton" in data["sarkern"]["refused_backends"]:
            assert row["status"] == "unavailable"
            continue
        assert row["status"] == "ok" and row["check"]["ok"] is True
    scorer = data["scorer"]["contenders"]
    assert scorer["paper"]["status"] == "ok"
    assert scorer["sarkern-sdpa"]["status"] == "ok" and scorer["sarkern-sdpa"]["check"]["ok"] is True
    assert scorer["sarkern-flex"]["status"] == "unavailable"  # refused on CPU tensors, by name
    assert scorer["sarkern-sdpa"]["scoring_path"] == "packed"
    universal = scorer["sarkern-universal"]
    assert universal["status"] == "ok" and universal["check"]["ok"] is True, universal
    assert universal["scoring_path"] == "universal" and universal["x_paper_time"] > 0


def test_tiny_run_report_stands_alone(tiny_run):
    """The report names its card and states the targets it measures against, citing no document."""
    out, _, data, _ = tiny_run
    md = (out / f"{data['tag']}.md").read_text()
    assert md.startswith("# gpu-check on CPU (no GPU): ")
    assert "DESIGN" not in md
    assert "1.10 x a bare cuBLAS GEMM" in md and "85% of the HBM read bandwidth" in md and "0.2 x the peak" in md


def test_tiny_run_targets_listed_not_judged(tiny_run):
    _, _, data, _ = tiny_run
    statuses = {t["what"]: t["status"] for t in data["targets"]}
    assert len(statuses) == 8
    assert set(statuses.values()) <= {"not judged (tiny CPU run)", "not measured"}
    assert statuses["SAR overhead in a GRPO step"] == "not measured"


# ---------------------------------------------------------------------------------- the helpers, directly


def test_the_gpu_window_call_is_the_one_the_script_accepts():
    """GPU_WINDOW.md's command (the README's too) parses as the script's arguments, carries what it names, and its
    timeout covers the run's total, a hung section's grace and the installs, within the device's 600 s a call."""
    lines = GPU_WINDOW.read_text().split("```")[1].strip().splitlines()
    call = dict(line.split(": ", 1) for line in lines)
    assert set(call) == {"command", "carry", "timeout_s"}
    words = shlex.split(call["command"])
    assert words[:2] == ["python3", "benchmarks/gpu_check.py"] and "make" not in words
    args = build_parser().parse_args([w.replace("$OUT", "/out") for w in words[2:]])
    assert json.loads(call["carry"]) == [str(args.wheels)] and args.out == Path("/out") and not args.tiny
    install_allowance_s = 60  # the carried wheels and sarkern, each a pip process, and the first imports
    assert FULL.total_s + SECTION_GRACE_S + install_allowance_s <= int(call["timeout_s"]) <= 600
    assert f"`{call['command']}`" in (ROOT / "README.md").read_text()
    assert "benchmarks/GPU_WINDOW.md" in (ROOT / "benchmarks" / "gpu_check.py").read_text()


@pytest.mark.parametrize("settings", [FULL, TINY], ids=["full", "tiny"])
def test_section_budgets_fit_the_total(settings):
    assert set(settings.budgets) == set(SECTIONS)
    processes = len(SECTIONS) - 1  # the environment runs in the main process
    assert sum(settings.budgets.values()) + processes * settings.startup_s < settings.total_s
    # On plan, every section gets its whole budget; the scorer, last, gets its own even when the run is late.
    later_sections = list(SECTIONS[1:])
    elapsed = settings.budgets["environment"]
    while later_sections:
        name = later_sections.pop(0)
        assert section_budget(settings, name, later_sections, elapsed) == settings.budgets[name]
        elapsed += settings.budgets[name] + settings.startup_s
    late = settings.total_s - settings.budgets["scorer"] - settings.startup_s
    assert section_budget(settings, "scorer", [], late) == settings.budgets["scorer"]
    # ... and the section before it, late, is the one cut: by what the scorer needs.
    before = section_budget(settings, "sequence_perplexity", ["scorer"], late - 10)
    assert before == pytest.approx(10 - settings.startup_s)


def test_gpu_test_files_run_triton_kernels_first():
    parts = gpu_test_parts()
    assert [part for part, _ in parts] == ["kernels", "others"]
    assert [Path(f).name for f in parts[0][1]] == ["test_gpu_kernels.py"]
    assert Path(parts[1][1][0]).name == "test_gpu_flex.py"


def test_import_check_refuses_the_source_tree(tmp_path, monkeypatch):
    site = tmp_path / "site"
    monkeypatch.setenv(install.SITE_VARIABLE, str(site))
    installed = {
        "sarkern": {"file": str(site / "sarkern" / "__init__.py")},
        "sarkern_kernels": {"file": str(site / "sarkern" / "kernels" / "__init__.py")},
        "sarkern_at_end": str(site / "sarkern" / "__init__.py"),
        "safe_path": True,
    }
    assert import_check(installed)["ok"] is True
    tree = {**installed, "sarkern": {"file": str(ROOT / "sarkern" / "__init__.py")}}
    check = import_check(tree)
    assert check["ok"] is False and "source tree" in check["reason"]
    missing = {**installed, "sarkern_kernels": {"error": "ImportError: cannot import name 'kernels' from 'sarkern'"}}
    check = import_check(missing)
    assert check["ok"] is False and "cannot import name 'kernels'" in check["reason"]
    swapped = {**installed, "sarkern_at_end": str(ROOT / "sarkern" / "__init__.py")}
    assert import_check(swapped)["ok"] is False
    assert import_check(None)["ok"] is False


def test_peer_requirements_name_the_rows_lost(monkeypatch):
    """datasets 5.2.0 needs pyarrow>=24 and fsspec<=2026.9.0; TRL imports datasets: an image without them loses both
    TRL rows, said up front with the reason, and nothing is imported to find out."""
    versions = {"trl": "1.16.0", "datasets": "5.2.0", "pyarrow": "21.0.0", "fsspec": "2026.10.0", "dill": "0.4.1"}
    requires = {
        "trl": ["datasets>=3.0", "accelerate>=1.4; extra == 'never'"],
        "datasets": ["pyarrow>=24.0.0", "fsspec[http]<=2026.9.0,>=2023.1.0", "dill<0.4.2,>=0.3.0"],
        "dill": [],
    }

    def version(name):
        if name not in versions:
            raise install.importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(install.importlib.metadata, "version", version)
    monkeypatch.setattr(install.importlib.metadata, "requires", lambda name: requires.get(name))
    found = install.peer_requirements(("trl", "datasets", "dill", "liger-kernel"))
    assert found["installed"]["liger-kernel"] is None
    assert found["unmet"] == {
        "datasets": ["pyarrow>=24.0.0 (here 21.0.0)", "fsspec[http]<=2026.9.0,>=2023.1.0 (here 2026.10.0)"]
    }
    assert set(found["lost"]) == {"trl", "datasets"} and "pyarrow>=24.0.0" in found["lost"]["trl"]
    assert set(found["rows_lost"]) == {"trl_chunked", "trl_selective"}
    versions.update(pyarrow="24.0.0", fsspec="2026.9.0")
    assert install.peer_requirements(("trl", "datasets", "dill"))["lost"] == {}


def test_interpreter_refusal_names_the_combination(monkeypatch):
    """The tiny run refuses sarkern[triton] with the installed sarkern's own check (sarkern.backends)."""
    from sarkern import backends

    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def broken():
        raise TypeError("only 0-dimensional arrays can be converted to Python scalars")

    monkeypatch.setattr(backends, "_probe_kernel", broken)
    monkeypatch.setattr(backends.importlib.metadata, "version", {"triton": "3.6.0", "numpy": "2.5.2"}.get)
    backends._interpreter_probe.cache_clear()
    try:
        why = backends.interpreter_problem()
    finally:
        backends._interpreter_probe.cache_clear()  # the real probe again for the tests after this one
    assert "triton 3.6.0" in why and "numpy 2.5.2" in why and "0-dimensional" in why
    monkeypatch.delenv("TRITON_INTERPRET")
    assert backends.interpreter_problem() is None  # compiled kernels: nothing to probe


def test_the_report_names_its_card(tmp_path):
    run = Run(FULL, Device("cpu"), tmp_path, "h200")
    run.data.update(machine={"gpu": "NVIDIA H200"}, targets=evaluate_targets({}, FULL))
    md = render(run)
    assert md.startswith("# gpu-check on NVIDIA H200: h200")
    assert "Measured on NVIDIA H200 in this run, bfloat16" in md and "[16384, 4096]" in md
    assert "DESIGN" not in md


def test_outcome_names_the_kind_of_failure():
    assert outcome_of(Unavailable("no liger"))["status"] == "unavailable"
    assert outcome_of(BudgetExceeded("late"))["status"] == "skipped"
    assert outcome_of(RuntimeError("CUDA out of memory. Tried"))["status"] == "oom"
    error = outcome_of(ValueError("bad"))
    assert error["status"] == "error" and "ValueError: bad" in error["reason"]


def test_time_limit_stops_python_and_keeps_the_outer_limit():
    with pytest.raises(BudgetExceeded):
        with time_limit(0.2):
            while True:
                time.sleep(0.01)
    with pytest.raises(BudgetExceeded):
        with time_limit(0.5):
            with time_limit(30):  # the inner limit is capped by the outer one
                time.sleep(0.01)
            while True:  # ... which still fires after the inner block ended
                time.sleep(0.01)
    with pytest.raises(BudgetExceeded):
        with time_limit(0):
            pass


def test_a_failing_measurement_is_recorded_and_the_run_goes_on(tmp_path):
    run = Run(TINY, Device("cpu"), tmp_path, "unit")
    with run.section("ceilings"):
        bad = run.measure("boom", lambda: 1 / 0)
        good = run.measure("fine", lambda: {"median_ms": 1.0})
        run.data["ceilings"] = {"bad": bad, "good": good}
    assert bad["status"] == "error" and "ZeroDivisionError" in bad["reason"]
    assert good == {"status": "ok", "median_ms": 1.0}
    with run.section("linear"):
        raise RuntimeError("a whole section failing")
    with run.section("logits"):
        run.data["sections"]["logits"]["probe"] = "running while inside"
        assert run.data["sections"]["logits"]["status"] == "running"  # what a killed section process leaves
    assert run.data["sections"]["logits"]["status"] == "ok"
    assert run.data["sections"]["ceilings"]["status"] == "ok"
    assert run.data["sections"]["linear"]["status"] == "failed"
    assert "a whole section failing" in run.data["sections"]["linear"]["reason"]
    assert json.loads((tmp_path / "unit.json").read_text())["sections"]["linear"]["status"] == "failed"


def _full_data(fwd_ms, fwd_bwd_ms, extra_mib, logits_ms, scorer_time, scorer_memory):
    ok = {"status": "ok"}
    return {
        "primary_sarkern": "sarkern",
        "ceilings": {
            "gemm": {**ok, "forward_ms": 25.0, "three_ms": 75.0},
            "hbm": {**ok, "read_ceiling_GBps": 3000.0},
        },
        "ops": {
            "linear": {
                "forward": {"sarkern": {**ok, "median_ms": fwd_ms, "extra_beyond_outputs_mib": extra_mib}},
                "forward_backward": {"sarkern": {**ok, "median_ms": fwd_bwd_ms, "extra_beyond_outputs_mib": 1.0}},
            },
            "logits": {"forward": {"sarkern": {**ok, "median_ms": logits_ms}}},
        },
        "scorer": {
            "auto_backend": "flex",
            "paper_micro_batch": 8,
            "contenders": {
                "paper": {**ok},
                "sarkern-flex": {**ok, "x_paper_time": scorer_time, "x_paper_memory": scorer_memory},
            },
        },
    }


def test_targets_met_and_missed_from_the_measured_ratios():
    n, v = FULL.logits
    logits_bytes = n * v * 2  # bf16
    read_ms_at_90 = logits_bytes / (0.9 * 3000.0 * 1e6)
    data = _full_data(27.0, 120.0, 100.0, read_ms_at_90, 0.4, 0.3)
    targets = {t["what"]: t for t in evaluate_targets(data, FULL)}
    fwd = targets["linear_token_logprobs forward / cuBLAS logits GEMM"]
    assert fwd["status"] == "met" and fwd["ratio"] == pytest.approx(27.0 / 25.0)
    fwd_bwd = targets["linear_token_logprobs forward+backward / three cuBLAS GEMMs"]
    assert fwd_bwd["status"] == "missed" and fwd_bwd["ratio"] == pytest.approx(120.0 / 75.0)
    memory = "linear_token_logprobs forward extra memory (MiB beyond inputs, outputs, gradients)"
    assert targets[memory]["status"] == "missed"
    bandwidth = targets["token_logprobs forward: logits read bandwidth / measured HBM read"]
    assert bandwidth["status"] == "met" and bandwidth["ratio"] == pytest.approx(0.9)
    assert targets["SAR scoring time / paper's way"]["status"] == "met"
    assert targets["SAR scoring peak memory / paper's way"]["status"] == "missed"
    assert targets["SAR overhead in a GRPO step"]["status"] == "not measured"


def test_targets_not_measured_when_a_section_failed():
    data = _full_data(27.0, 120.0, 1.0, 1.0, 0.4, 0.1)
    data["ceilings"]["gemm"] = {"status": "error", "reason": "boom"}
    targets = {t["what"]: t for t in evaluate_targets(data, FULL)}
    assert targets["linear_token_logprobs forward / cuBLAS logits GEMM"]["status"] == "not measured"
    assert targets["SAR scoring peak memory / paper's way"]["status"] == "met"


def test_outcomes_read_from_an_unfinished_pytest_log():
    log = (
        "tests/test_gpu_kernels.py::test_a[16384] PASSED    [ 14%]\n"
        "tests/test_gpu_kernels.py::test_b FAILED    [ 28%]\n"
        "tests/test_gpu_flex.py::test_c SKIPPED (needs CUDA)    [ 42%]\n"
        "tests/test_gpu_flex.py::test_d "
    )
    summary = log_summary(log)
    assert (summary["passed"], summary["failed"], summary["skipped"], summary["errors"]) == (1, 1, 1, 0)
    assert summary["failures"] == ["tests/test_gpu_kernels.py::test_b: FAILED"] and summary["unfinished"]


def test_outcomes_read_from_the_junit_report(tmp_path):
    report = tmp_path / "tests.junit.xml"
    report.write_text(
        '<testsuites><testsuite><testcase classname="tests.t" name="a"><failure message="assert 1 == 2&#10;more">x'
        '</failure></testcase><testcase classname="tests.t" name="b"/><testcase classname="tests.t" name="c">'
        '<skipped message="needs CUDA"/></testcase><testcase classname="tests.t" name="d"><error message="boom"/>'
        "</testcase></testsuite></testsuites>"
    )
    summary = junit_summary(report)
    assert (summary["passed"], summary["failed"], summary["errors"], summary["skipped"]) == (1, 1, 1, 1)
    assert summary["failures"] == ["tests.t::a: assert 1 == 2", "tests.t::d: boom"]
    assert summary["skip_reasons"] == ["needs CUDA"]


# ------------------------------------------------------------------------------------ kernel candidates hook


def _unit_run(tmp_path) -> Run:
    """A tiny run of sarkern's torch path only, with the input check, as the environment section would record it."""
    run = Run(replace(TINY, backends=("torch",)), Device("cpu"), tmp_path, "unit")
    run.data["sarkern"] = {"check_inputs": True}
    return run


def test_kernel_candidates_hook_sets_its_variables_for_the_timed_calls(tmp_path, monkeypatch):
    """`gpu_candidates()` of sarkern.kernels.linear_logprobs_tiles: the primary variant is timed once per candidate,
    forward and forward + backward, with the candidate's variables set for the whole call (its backward included)
    and restored after; the other variants never see them."""
    import contenders

    import sarkern
    from sarkern.kernels import linear_logprobs_tiles

    candidates = {
        "tile 64x32x16 w2 s2": {"SARKERN_TEST_CANDIDATE": "tile", "SARKERN_TEST_KEPT": "tile"},
        "pointer loads": {"SARKERN_TEST_CANDIDATE": "pointer"},
    }
    monkeypatch.setattr(linear_logprobs_tiles, "gpu_candidates", lambda: candidates)
    monkeypatch.delenv("SARKERN_TEST_CANDIDATE", raising=False)
    monkeypatch.setenv("SARKERN_TEST_KEPT", "before")
    seen: list[tuple[str, str | None, str | None]] = []  # (forward or backward, the two variables then)

    def environment(phase):
        return phase, os.environ.get("SARKERN_TEST_CANDIDATE"), os.environ.get("SARKERN_TEST_KEPT")

    real = sarkern.linear_token_logprobs

    def spy(*args, **kwargs):
        seen.append(environment("forward"))
        out = real(*args, **kwargs)
        if out.requires_grad:
            out.register_hook(lambda grad: seen.append(environment("backward")))
        return out

    monkeypatch.setattr(sarkern, "linear_token_logprobs", spy)
    monkeypatch.setitem(contenders.FAMILIES, "linear", {"naive": contenders.naive_linear})  # one peer is enough
    run = _unit_run(tmp_path)
    with run.section("linear"):
        time_op_family(run, "linear")
    assert run.data["sections"]["linear"]["status"] == "ok"
    for mode in ("forward", "forward_backward"):
        rows = run.data["ops"]["linear"][mode]
        assert list(rows) == [  # the candidates after the peers: a short budget drops them first
            "sarkern[torch]",
            "sarkern[torch], check_inputs=False",
            "naive",
            "sarkern[torch], check_inputs=False, tile 64x32x16 w2 s2",
            "sarkern[torch], check_inputs=False, pointer loads",
        ]
        for label, variables in candidates.items():
            row = rows[f"sarkern[torch], check_inputs=False, {label}"]
            assert row["status"] == "ok" and row["check"]["ok"] is True, row
            assert row["environment"] == variables
    # Each candidate's variables while its calls ran, forward and backward; the variants' own calls saw none.
    for phase in ("forward", "backward"):
        assert {(c, k) for p, c, k in seen if p == phase} == {(None, "before"), ("tile", "tile"), ("pointer", "before")}
    assert os.environ.get("SARKERN_TEST_CANDIDATE") is None and os.environ["SARKERN_TEST_KEPT"] == "before"
    assert "tile 64x32x16 w2 s2" in (tmp_path / "unit.md").read_text()  # the label, readable in the table


def test_a_malformed_candidates_hook_is_refused_by_name(tmp_path, monkeypatch):
    with pytest.raises(TypeError, match="gpu_candidates"):
        checked_candidates([("tile", {"SARKERN_FORWARD_BLOCKS": "128,64,64,4,4"})])
    with pytest.raises(ValueError, match="label"):
        checked_candidates({"a | b": {}})
    with pytest.raises(TypeError, match="all strings"):
        checked_candidates({"tile": {"SARKERN_FORWARD_BLOCKS": 128}})
    # In a run, the broken hook costs one row of the linear section, not the section's other rows.
    import contenders

    from sarkern.kernels import linear_logprobs_tiles

    monkeypatch.setattr(linear_logprobs_tiles, "gpu_candidates", lambda: {"tile": None})
    monkeypatch.setitem(contenders.FAMILIES, "linear", {"naive": contenders.naive_linear})
    run = _unit_run(tmp_path)
    with run.section("linear"):
        time_op_family(run, "linear")
    rows = run.data["ops"]["linear"]["forward"]
    assert rows["sarkern[torch], check_inputs=False, kernel candidates"]["status"] == "error"
    assert rows["sarkern[torch], check_inputs=False"]["status"] == "ok" and rows["naive"]["status"] == "ok"


def test_the_kernels_candidates_pass_the_hook_check(monkeypatch):
    """What `make gpu-check` will time beside the default: every candidate tile and pointer loads in place of TMA."""
    pytest.importorskip("triton")
    from sarkern.kernels import linear_logprobs_tiles as tiles_module

    candidates = checked_candidates(tiles_module.gpu_candidates())
    assert {"SARKERN_TMA": "0"} in candidates.values() and {"SARKERN_FORWARD_FLATTEN": "1"} in candidates.values()
    tiles = [env["SARKERN_FORWARD_BLOCKS"] for env in candidates.values() if "SARKERN_FORWARD_BLOCKS" in env]
    assert len(tiles) == len(tiles_module.FORWARD_CANDIDATES_16)
    for tile, blocks in zip(tiles, tiles_module.FORWARD_CANDIDATES_16):
        monkeypatch.setenv("SARKERN_FORWARD_BLOCKS", tile)
        assert tiles_module.forward_blocks(torch.bfloat16, 90) == replace(blocks, ctas_per_sm=1)
