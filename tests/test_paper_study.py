"""benchmarks/paper_study.py: answer sets of known quality, pair agreement, and the whole study at toy size."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("trl")

from sarkern.rewards import correctness_reward  # noqa: E402
from sarkern.tasks import Verbosity, generate_problems  # noqa: E402

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "paper_study.py"
_spec = importlib.util.spec_from_file_location("paper_study", _PATH)
paper_study = importlib.util.module_from_spec(_spec)
sys.modules["paper_study"] = paper_study  # dataclasses look their module up there
_spec.loader.exec_module(paper_study)

TOY = [
    "--configs", "correctness", "sar-0.2",
    "--seeds", "1",
    "--steps", "2",
    "--prompts-per-step", "2",
    "--num-generations", "4",
    "--max-completion-length", "24",
    "--num-problems", "32",
    "--eval-problems", "6",
    "--eval-samples", "1",
    "--eval-max-new-tokens", "24",
    "--ranking-problems", "12",  # the fewest for which every problem has its two wrong answers
    "--save-steps", "1",
    "--no-progress",
]  # fmt: skip


def refused(capsys, argv: list[str]) -> str:
    """The one line `paper_study` prints when it refuses `argv` as bad input (exit status 2)."""
    capsys.readouterr()
    assert paper_study.main(argv) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("paper_study: error: "), lines
    return lines[0]


def test_answer_sets_have_the_quality_their_class_says():
    sets = paper_study.ranking_answer_sets(30, seed=3)
    problems = generate_problems(30, 3, split="test")
    assert len(sets) == 30
    for item, problem in zip(sets, problems):
        answers = item["answers"]
        assert list(answers) == list(paper_study.ANSWER_CLASSES)
        assert answers["concise correct"] == [problem.solution(Verbosity.CONCISE)]
        assert (
            len(answers["padded correct"][0]) > len(answers["restated correct"][0]) > len(answers["concise correct"][0])
        )
        for name, texts in answers.items():
            scores = correctness_reward([None] * len(texts), texts, answer=[item["answer"]] * len(texts))
            assert scores == [1.0 if name in paper_study.CORRECT_CLASSES else 0.0] * len(texts), (name, texts)
        # Partially correct: every equation but the last is the problem's own.
        for text in answers["partially correct"]:
            equations = [part.strip() for part in text.split("answer:")[0].split(".") if part.strip()]
            assert equations[:-1] == list(problem.equations[:-1])
            assert equations[-1] != problem.equations[-1]
        assert len(answers["partially correct"]) == 2 and len(answers["wrong"]) == 2


def test_pair_agreement_counts_ties_as_half():
    classes = paper_study.ANSWER_CLASSES
    problem = {name: [float(-rank)] for rank, name in enumerate(classes)}  # perfectly ordered
    problem["wrong"] = [-10.0, 0.0]  # one wrong answer below everything, one level with concise, above the rest
    agreement = paper_study.pair_agreement([problem])
    assert agreement["concise correct > restated correct"] == 1.0
    assert agreement["concise correct > wrong"] == 0.75  # one win, one tie
    assert agreement["restated correct > wrong"] == 0.5  # one win, one loss
    with pytest.raises(ValueError, match="no pair"):
        paper_study.pair_agreement([{**problem, "wrong": []}])


def test_study_end_to_end_resumes_and_refuses_other_settings(tmp_path, capsys):
    work, results = tmp_path / "work", tmp_path / "results"
    where = ["--workdir", str(work), "--results-dir", str(results), "--date", "2000-01-01"]
    assert paper_study.main(TOY + where + ["--note", "Sized for a test."]) == 0
    assert "finished" in json.loads((work / "study.json").read_text())  # set when the last planned run finished

    stem = results / "paper-study-2000-01-01"
    data = json.loads(stem.with_suffix(".json").read_text())
    assert data["complete"] and data["runs_finished"] == data["runs_planned"] == 2
    assert {(r["config"], r["seed"]) for r in data["runs"]} == {("correctness", 0), ("sar-0.2", 0)}
    for run in data["runs"]:
        assert run["steps"] == 2
        for key in ("greedy_accuracy", "sampled_accuracy"):
            assert 0.0 <= run[key] <= 1.0
        assert 1.0 <= run["greedy_length"] <= 24.0 and 1.0 <= run["sampled_length"] <= 24.0
        for key in ("greedy_truncated", "sampled_truncated", "train_clipped_ratio"):
            assert 0.0 <= run[key] <= 1.0
        assert set(run["ranking"]["agreement"]) == set(data["base"]["ranking"]["agreement"])
        assert len(run["ranking"]["agreement"]) == 10
    by_config = {r["config"]: r for r in data["runs"]}
    assert by_config["correctness"]["sar_step_share"] is None  # no SAR, no scorer time
    assert 0.0 < by_config["sar-0.2"]["sar_step_share"] < 1.0
    assert data["summary"]["sar-0.2"]["paired_difference"]["greedy_length"]["n"] == 1
    assert stem.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = stem.with_suffix(".md").read_text()
    assert "Complete: 2 of 2 runs." in report and "PARTIAL" not in report
    assert "| correctness | 1 |" in report and "| sar-0.2 | 1 |" in report and "| before training |" in report
    assert "| partially correct > wrong * |" in report

    # A second start with the same settings trains nothing: every run is finished.
    result_file = work / "runs" / "sar-0.2" / "seed-0" / "result.json"
    stamp = result_file.stat().st_mtime_ns
    assert paper_study.main(TOY + where) == 0
    assert result_file.stat().st_mtime_ns == stamp
    assert not list((work / "runs").glob("*/seed-0/checkpoint-*"))  # dropped once a run is evaluated

    # More seeds than finished: the report says it is partial, and by how much; the note given at the start stays.
    findings = tmp_path / "findings.md"
    findings.write_text("Nothing to see at two steps.\n")
    assert paper_study.main(TOY + where + ["--seeds", "2", "--report-only", "--findings-file", str(findings)]) == 0
    partial = stem.with_suffix(".md").read_text()
    assert "PARTIAL: 2 of 4 runs finished" in partial and "correctness 1/2" in partial
    assert "## Findings\n\nNothing to see at two steps." in partial and "Sized for a test." in partial

    assert "--run-seeds names 2, not among the study's seeds 0..1" in refused(
        capsys, TOY + where + ["--seeds", "2", "--run-seeds", "1", "2"]
    )
    assert "other settings (steps: 2 -> 3)" in refused(capsys, TOY + where + ["--steps", "3"])


def test_study_on_a_dataset_file_holds_out_rows_and_says_the_ranking_did_not_run(tmp_path, capsys):
    problems = generate_problems(20, 0, split="train")
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"q": p.question, "a": f"#### {p.answer}"}) + "\n" for p in problems))
    toy = TOY[TOY.index("--seeds") :]  # one configuration
    args = ["--configs", "correctness", "--dataset", str(data), "--question-column", "q", "--answer-column", "a"]
    where = ["--workdir", str(tmp_path / "work"), "--results-dir", str(tmp_path / "results"), "--date", "2000-01-01"]
    assert paper_study.main(args + toy + ["--steps", "1"] + where) == 0

    trained = [json.loads(line) for line in (tmp_path / "work" / "data" / "train.jsonl").read_text().splitlines()]
    assert len(trained) == 20 - 6  # --eval-problems 6 held out, never trained on
    assert {row["answer"] for row in trained} <= {str(p.answer) for p in problems}
    result = json.loads((tmp_path / "results" / "paper-study-2000-01-01.json").read_text())
    assert result["base"]["eval_problems"] == 6 and "ranking" not in result["base"]
    assert "ranking" not in result["runs"][0]
    report = (tmp_path / "results" / "paper-study-2000-01-01.md").read_text()
    assert "Not run: the ranking analysis needs the synthetic task's generator" in report

    other = ["--eval-problems", "20", "--workdir", str(tmp_path / "other")]
    assert "has 20 rows, not more than --eval-problems 20" in refused(capsys, args + toy + other + where[2:])


# ------------------------------------------- issue 21, item 6: options checked before anything is written; Ctrl-C

# (bad options, what the one-line error says): each is refused before any model work, with its cause and the way out.
BAD_OPTIONS = [
    (["--num-generations", "1"], "--num-generations must be >= 2, got 1: GRPO's advantage compares"),
    (["--prompts-per-step", "0"], "--prompts-per-step must be >= 1, got 0"),
    (["--learning-rate", "nan"], "--learning-rate must be a finite number, got nan"),
    (["--eval-problems", "0"], "--eval-problems must be >= 1, got 0: accuracy and length are means"),
    (["--eval-samples", "-1"], "--eval-samples must be >= 0, got -1"),
    (["--ranking-problems", "0"], "--ranking-problems must be >= 12, got 0: every problem's 'wrong' answers"),
    (["--ranking-problems", "1"], "--ranking-problems must be >= 12, got 1"),
    (["--ranking-problems", "3"], "--ranking-problems must be >= 12, got 3"),
    (["--configs", "sar-0.2", "correctness", "sar-0.2"], "--configs names sar-0.2 more than once"),
    (["--run-seeds", "0", "1"], "--run-seeds names 1, not among the study's seeds 0..0"),
    (["--num-problems", "1"], "--num-problems 1 is fewer than --prompts-per-step 2"),
    (["--max-completion-length", "512"], "--max-completion-length 512 leaves no room for a prompt"),
    (["--seeds", "0"], "--seeds must be in [1, 4294967296], got 0"),
    (["--date", "2000-13-01"], "--date must be YYYY-MM-DD"),
    (["--findings-file", "/nonexistent/findings.md"], "--findings-file /nonexistent/findings.md: cannot read it"),
    (["--model", "/nonexistent/model"], "--model /nonexistent/model does not exist"),
    (["--workdir", str(_PATH)], f"--workdir {_PATH}: {_PATH} exists and is not a directory"),
]


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def started_study(tmp_path_factory):
    """A study directory as its first start leaves it (`--report-only`: settings written, no model work)."""
    root = tmp_path_factory.mktemp("study")
    where = ["--workdir", str(root / "work"), "--results-dir", str(root / "results"), "--date", "2000-01-01"]
    assert paper_study.main(TOY + where + ["--report-only"]) == 0
    return root, where


@pytest.mark.parametrize(("bad", "message"), BAD_OPTIONS, ids=[" ".join(b) for b, _ in BAD_OPTIONS])
def test_a_bad_option_is_one_line_and_leaves_the_work_directory_as_it_was(
    bad, message, tmp_path, started_study, capsys
):
    fresh = ["--workdir", str(tmp_path / "work"), "--results-dir", str(tmp_path / "results")]
    assert message in refused(capsys, TOY + fresh + bad)
    assert not (tmp_path / "work").exists() and not (tmp_path / "results").exists()

    root, where = started_study
    before = files_under(root)
    assert message in refused(capsys, TOY + where + bad)
    assert files_under(root) == before  # no "holds a study with other settings" afterwards


def test_after_bad_options_the_study_still_resumes(started_study, capsys):
    root, where = started_study
    for bad, _ in BAD_OPTIONS[:3]:
        refused(capsys, TOY + where + bad)
    assert paper_study.main(TOY + where + ["--report-only"]) == 0
    assert "PARTIAL: 0 of 2 runs finished" in (root / "results" / "paper-study-2000-01-01.md").read_text()


def stderr_lines(text: str) -> list[str]:
    """Lines of stderr without progress-bar redraws (carriage returns) and blank lines."""
    return [line.split("\r")[-1].strip() for line in text.splitlines() if line.split("\r")[-1].strip()]


def test_ctrl_c_exits_130_with_one_line_and_the_study_resumes(tmp_path, capsys):
    work, results = tmp_path / "work", tmp_path / "results"
    where = ["--workdir", str(work), "--results-dir", str(results), "--date", "2000-01-01"]
    study = subprocess.Popen(
        [sys.executable, str(_PATH), *TOY, *where], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    while not (work / "study.json").exists():  # written once every check passed: the model work is next
        assert study.poll() is None and time.monotonic() < deadline, study.communicate()
        time.sleep(0.02)
    study.send_signal(signal.SIGINT)
    _, err = study.communicate(timeout=300)
    assert study.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    assert stderr_lines(err)[-1] == (
        "paper_study: interrupted; run the same command again to resume, finished runs are kept"
    )
    assert [line for line in stderr_lines(err) if line.startswith("paper_study")] == stderr_lines(err)[-1:]
    # The directory is the study's, as the command left it: the same command is accepted again.
    assert paper_study.main(TOY + where + ["--report-only"]) == 0


def run_failure(kind: str, output_dir: str) -> BaseException:
    from sarkern import cli

    return {
        "ctrl-c": cli.RunInterrupted(f"interrupted at step 3; run the same command again to resume from {output_dir}"),
        "setup": cli.SetupError("the dataset has 1 usable rows, fewer than prompts_per_step=2"),
        "crash": RuntimeError("CUDA error: device-side assert\ntriggered"),
    }[kind]


RUN_FAILURES = [
    ("ctrl-c", 130, "paper_study: run correctness seed 0 interrupted at step 3; run the same command again to resume "
     "from {run_dir}; finished runs are kept"),
    ("setup", 2, "paper_study: error: run correctness seed 0: the dataset has 1 usable rows, fewer than "
     "prompts_per_step=2"),
    ("crash", 1, "paper_study: error: RuntimeError: CUDA error: device-side assert triggered (rerun with --debug for "
     "the traceback)"),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "status", "line"), RUN_FAILURES, ids=[kind for kind, _, _ in RUN_FAILURES])
def test_a_run_that_stops_is_one_line_naming_the_run(kind, status, line, tmp_path, monkeypatch, capsys):
    from sarkern import cli

    def failing_run(options, extra_callbacks=None):
        raise run_failure(kind, options.output_dir)

    monkeypatch.setattr(cli, "run_train", failing_run)
    monkeypatch.setattr(paper_study.Study, "base", lambda self: {"greedy_accuracy": 0.5, "greedy_length": 9.0})
    monkeypatch.setattr(paper_study.Study, "write_report", lambda self: None)
    where = ["--workdir", str(tmp_path / "work"), "--results-dir", str(tmp_path / "results")]
    assert paper_study.main(TOY + where) == status
    run_dir = tmp_path / "work" / "runs" / "correctness" / "seed-0"
    assert capsys.readouterr().err.splitlines() == [line.format(run_dir=run_dir)]
    if kind == "crash":
        with pytest.raises(RuntimeError, match="device-side assert"):  # --debug: the traceback
            paper_study.main(TOY + where + ["--debug"])


# ---------------------------------------- issue 21, item 4: the dataset file's digest; processes sharing one study


def qa_file(path: Path, problems) -> Path:
    path.write_text("".join(json.dumps({"question": p.question, "answer": str(p.answer)}) + "\n" for p in problems))
    return path


def dataset_study(data: Path, root: Path, *extra: str) -> list[str]:
    where = ["--workdir", str(root / "work"), "--results-dir", str(root / "results")]
    return ["--dataset", str(data), *TOY[TOY.index("--seeds") :], *where, *extra]


def test_a_dataset_file_changed_at_the_same_path_is_refused_naming_both_digests(tmp_path, capsys):
    problems = generate_problems(16, 0, split="train")
    data = qa_file(tmp_path / "qa.jsonl", problems)
    first = hashlib.sha256(data.read_bytes()).hexdigest()
    paper_study.Study(*study_args(dataset_study(data, tmp_path, "--configs", "correctness")))
    before = files_under(tmp_path / "work")

    qa_file(data, [*problems[:-1], generate_problems(17, 0, split="train")[-1]])  # one row replaced
    now = hashlib.sha256(data.read_bytes()).hexdigest()
    line = refused(capsys, dataset_study(data, tmp_path, "--configs", "sar-0.2", "--report-only"))
    assert f"--dataset {data} changed since the study in {tmp_path / 'work'} started" in line
    assert f"sha256 {first} then, {now} now" in line
    assert files_under(tmp_path / "work") == before

    qa_file(data, problems)  # restored: the study goes on
    paper_study.Study(*study_args(dataset_study(data, tmp_path, "--configs", "sar-0.2")))


def study_args(argv: list[str]) -> tuple:
    settings, args = paper_study.parse_args(argv)
    return settings, Path(args.workdir), Path(args.results_dir), args.date


def test_processes_sharing_a_study_never_rewrite_its_data_file(tmp_path):
    data = qa_file(tmp_path / "qa.jsonl", generate_problems(16, 0, split="train"))
    paper_study.Study(*study_args(dataset_study(data, tmp_path, "--configs", "correctness")))
    train_file = tmp_path / "work" / "data" / "train.jsonl"
    written = train_file.read_bytes()
    os.utime(train_file, ns=(1, 1))  # any rewrite would set the time to now
    paper_study.Study(*study_args(dataset_study(data, tmp_path, "--configs", "sar-0.2")))  # a second process
    assert train_file.stat().st_mtime_ns == 1 and train_file.read_bytes() == written

    train_file.write_bytes(written.replace(b'"answer": "', b'"answer": "1', 1))  # changed behind the study's back
    manifest = (tmp_path / "work" / "study.json").read_bytes()
    with pytest.raises(SystemExit, match=f"{train_file} no longer holds the training rows of {data}"):
        paper_study.Study(*study_args(dataset_study(data, tmp_path, "--configs", "sar-0.2", "--note", "new")))
    assert (tmp_path / "work" / "study.json").read_bytes() == manifest  # refused before writing


def test_racing_writers_create_a_data_file_once_and_all_read_the_winner(tmp_path):
    from paperstudy.storage import create_once

    path, racers = tmp_path / "data" / "train.jsonl", 8
    start, results = threading.Barrier(racers), {}

    def race(index: int) -> None:
        start.wait()
        results[index] = create_once(path, f"rows of writer {index}\n".encode() * 1000)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [i for i, (_, created) in results.items() if created]
    assert len(winners) == 1
    assert (
        {held for held, _ in results.values()}
        == {path.read_bytes()}
        == {f"rows of writer {winners[0]}\n".encode() * 1000}
    )
    assert [p.name for p in path.parent.iterdir()] == ["train.jsonl"]  # no temporary left behind
