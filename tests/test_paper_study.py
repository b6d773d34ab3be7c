"""benchmarks/paper_study.py: answer sets of known quality, pair agreement, and the whole study at toy size."""

from __future__ import annotations

import importlib.util
import json
import sys
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
    "--ranking-problems", "4",
    "--save-steps", "1",
    "--no-progress",
]  # fmt: skip


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


def test_study_end_to_end_resumes_and_refuses_other_settings(tmp_path):
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

    with pytest.raises(SystemExit, match="not all among the study's seeds 0..1"):
        paper_study.main(TOY + where + ["--seeds", "2", "--run-seeds", "1", "2"])

    with pytest.raises(SystemExit, match="other settings.*steps: 2 -> 3"):
        paper_study.main(TOY + where + ["--steps", "3"])


def test_study_on_a_dataset_file_holds_out_rows_and_says_the_ranking_did_not_run(tmp_path):
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

    with pytest.raises(SystemExit, match="not more than --eval-problems"):
        paper_study.main(args + toy + ["--eval-problems", "20", "--workdir", str(tmp_path / "other")] + where[2:])
