"""The paper's two analyses at small scale: the Pareto study of rewards and the SAR ranking analysis.

    python benchmarks/paper_study.py                   # bundled tiny model, synthetic task, CPU: 7 rewards x 3 seeds
    python benchmarks/paper_study.py --configs correctness sar-0.2 --seeds 5 --steps 100
    python benchmarks/paper_study.py --model ./my-qwen --dataset gsm8k.jsonl --steps 500 --eval-problems 500
    python benchmarks/paper_study.py --report-only     # rewrite the report from the finished runs

1. Pareto study. Every reward configuration (`CONFIGURATIONS`: correctness only; correctness + SAR at weights 0.1,
   0.2, 0.3; the self-confidence baseline; O1-Pruner's and Efficient-Reasoner's length penalties) is trained with
   `sarkern train`'s own setup (`sarkern.cli.run_train`, hence `SARGRPOTrainer`) for each seed, with the same steps,
   data and hyper-parameters, then evaluated on held-out problems: greedy and sampled accuracy, mean completion
   length (tokens, stop token included), and SAR's share of the training step time (`sar/step_share`).
2. Ranking analysis (synthetic task only: it needs the task's generator). For held-out problems the generator writes
   answers of known quality: concise correct, restated correct, padded correct (verbose and repetitive), partially
   correct (right steps, then a wrong last result) and wrong (the solution of another problem). SAR
   (`sarkern.SelfAlignedReward`) scores them with the untrained model and with every trained one, and the report
   gives, per pair of classes, the fraction of (better, worse) pairs of the same problem that SAR orders as the
   paper does (ties count half).

Every option and input is checked before anything is written (`paperstudy/checks.py`, reusing `sarkern train`'s
checks): a bad one is one line `paper_study: error: ...` and exit status 2, and the work directory stays as it was;
Ctrl-C is one line and status 130; any other failure one line and status 1 (`--debug` shows tracebacks).

The study lives in `--workdir` (default `runs/paper-study`): `study.json` (its settings and the sha256 of its
dataset files), `data/train.jsonl` (with `--dataset`: the rows it trains on, written once), `base/` (the untrained
model's evaluation) and `runs/<configuration>/seed-<n>/` (the `sarkern train` output directory of each run, with its
`result.json` once evaluated). A killed study resumes where it stopped when started again with the same settings
and the same dataset file (a changed file is refused, naming both digests): finished runs are kept, an unfinished
one resumes from its last checkpoint. Processes sharing the work directory never rewrite each other's data files
(`paperstudy/storage.py`). After every finished run the report is rewritten to `--results-dir`:
`paper-study-<date>.md` (tables, marked PARTIAL until every run has finished), `paper-study-<date>.json` (every run's
numbers) and `paper-study-<date>.png` (accuracy against length, one point per run and the mean of each
configuration).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import random
import shutil
import statistics
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the package beside this script, however it is loaded

from paperstudy.checks import check_model, check_resumable, check_settings, check_writable, read_findings  # noqa: E402
from paperstudy.ranking import (  # noqa: E402, F401  (re-exported: the study's public names)
    ANSWER_CLASSES,
    CORRECT_CLASSES,
    HEADLINE_PAIRS,
    pair_agreement,
    partially_correct_solution,
    ranking_analysis,
    ranking_answer_sets,
)
from paperstudy.settings import CONFIGURATIONS, SHARED_FIELDS, StudyError, StudySettings  # noqa: E402, F401
from paperstudy.storage import (  # noqa: E402
    create_once,
    file_digest,
    json_bytes,
    replace_atomically,
    study_lock,
    write_atomic,
    write_json,
)

# ------------------------------------------------------------------------------------------------------ evaluation


def evaluate(model, tokenizer, eval_dataset, settings: StudySettings) -> dict[str, Any]:
    """Greedy and sampled held-out accuracy and mean completion length."""
    from sarkern.tiny.evaluate import evaluate_accuracy

    greedy = evaluate_accuracy(model, tokenizer, eval_dataset, max_new_tokens=settings.eval_max_new_tokens)
    result = {
        "greedy_accuracy": greedy.accuracy,
        "greedy_length": greedy.mean_completion_tokens,
        "greedy_truncated": greedy.num_truncated / greedy.num_problems,
        "eval_problems": greedy.num_problems,
    }
    if settings.eval_samples:
        sampled = evaluate_accuracy(
            model,
            tokenizer,
            eval_dataset,
            max_new_tokens=settings.eval_max_new_tokens,
            num_samples=settings.eval_samples,
            sampling_seed=0,
        )
        result.update(
            sampled_accuracy=sampled.accuracy,
            sampled_length=sampled.mean_completion_tokens,
            sampled_truncated=sampled.num_truncated / sampled.num_problems,
        )
    return result


def load_for_eval(path: str | None):
    import torch

    from sarkern.cli import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(path)
    if torch.cuda.is_available():
        model.to("cuda")
    return model, tokenizer


# ------------------------------------------------------------------------------------------------------------ study


@contextlib.contextmanager
def _setup_errors_as_study_errors(what: str):
    """`sarkern train`'s bad-input errors (and Ctrl-C inside a run) in the study's words, naming `what` failed."""
    from sarkern.cli import RunInterrupted, SetupError

    try:
        yield
    except SetupError as err:
        raise StudyError(f"{what}: {str(err.code).removeprefix('sarkern train: error: ')}") from None
    except RunInterrupted as err:
        raise KeyboardInterrupt(f"{what} {err}") from None


class Study:
    """One study directory: its settings, data, runs and report.

    Construction checks every setting and input first (`paperstudy.checks`) and writes only once all are good:
    the manifest under the study's lock, the training data file once."""

    def __init__(
        self,
        settings: StudySettings,
        workdir: Path,
        results_dir: Path,
        date: str | None = None,
        findings: str | None = None,
        run_seeds: list[int] | None = None,
    ):
        self.settings = settings
        self.workdir = Path(workdir)
        self.results_dir = Path(results_dir)
        self.run_seeds = run_seeds
        check_settings(settings, run_seeds=run_seeds, date=date)
        self.synthetic = settings.dataset is None
        train, self.eval_dataset, self.inputs = self._read_data()
        check_model(settings, self.eval_dataset, train)
        self.answer_sets = ranking_answer_sets(settings.ranking_problems) if self.synthetic else None
        stored = self._read_manifest()
        if stored is not None:
            check_resumable(stored, settings, self.inputs, self.workdir)
        check_writable(self.workdir, "--workdir")
        check_writable(self.results_dir, "--results-dir")
        train_rows = None if train is None else self._train_file_bytes(train)
        if train_rows is not None and self._train_file.exists():
            self._check_train_file(self._train_file.read_bytes(), train_rows)
        # Everything checked: from here on the study writes.
        self.manifest = self._open_manifest(date, findings)
        self.train_path = None
        if train_rows is not None:
            self._check_train_file(create_once(self._train_file, train_rows)[0], train_rows)
            self.train_path = str(self._train_file)

    # ---------------------------------------------------------------------------------------------- bookkeeping

    def _read_manifest(self) -> dict[str, Any] | None:
        path = self.workdir / "study.json"
        if not path.exists():
            return None
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise StudyError(f"{path} is unreadable ({err}); restore it, or choose another --workdir") from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("settings"), dict):
            raise StudyError(f"{path} is not a study manifest; restore it, or choose another --workdir")
        return manifest

    def _open_manifest(self, date: str | None, findings: str | None) -> dict[str, Any]:
        """Create or update `study.json` under the lock, checking again what another process may have written since
        the first check."""
        with study_lock(self.workdir):
            stored = self._read_manifest()
            if stored is None:
                manifest = {"date": date or datetime.date.today().isoformat(), "started": _now()}
            else:
                check_resumable(stored, self.settings, self.inputs, self.workdir)
                manifest = stored
                if date:
                    manifest["date"] = date
                if not self.settings.note:  # the note given at the start stays unless a new one is given
                    self.settings.note = stored["settings"].get("note", "")
            manifest["inputs"] = {**self.inputs, **manifest.get("inputs", {})}  # digests as first recorded
            manifest["settings"] = asdict(self.settings)
            if findings is not None:
                manifest["findings"] = findings
            write_json(self.workdir / "study.json", manifest)
        return manifest

    def _read_data(self):
        """(training rows of `--dataset`, or None for the synthetic task; held-out rows; the digest of each input
        file). Reads only; every row's answer is checked as `sarkern train` checks it."""
        from sarkern.tasks import DatasetFormatError, load_qa_file, synthetic_arithmetic_dataset
        from sarkern.validation import check_answers_verifiable

        s = self.settings
        if self.synthetic:
            return None, synthetic_arithmetic_dataset(s.eval_problems, seed=0, split="test"), {}
        inputs, loaded = {}, {}
        columns = {"question_column": s.question_column, "answer_column": s.answer_column}
        for name in ("dataset", "eval_dataset"):
            path = getattr(s, name)
            if path is None:
                continue
            try:
                digest = file_digest(path) if Path(path).is_file() else None  # before reading: what was read
                loaded[name] = load_qa_file(path, **columns)
            except (DatasetFormatError, OSError) as err:
                raise StudyError(str(err)) from None
            try:
                check_answers_verifiable(loaded[name]["answer"])
            except ValueError as err:
                raise StudyError(f"{path}: {err}") from None
            inputs[name] = {"path": str(Path(path).resolve()), "sha256": digest}
        data = loaded["dataset"]
        if "eval_dataset" in loaded:
            held_out, train = loaded["eval_dataset"], data
        else:  # a fixed, seeded slice of the dataset is held out and never trained on
            if data.num_rows <= s.eval_problems:
                raise StudyError(
                    f"{s.dataset} has {data.num_rows} rows, not more than --eval-problems {s.eval_problems}"
                )
            order = list(range(data.num_rows))
            random.Random(0).shuffle(order)
            held_out, train = data.select(order[: s.eval_problems]), data.select(order[s.eval_problems :])
        if train.num_rows < s.prompts_per_step:
            raise StudyError(
                f"{s.dataset} leaves {train.num_rows} training rows, fewer than --prompts-per-step {s.prompts_per_step}"
            )
        return train, held_out.select(range(min(s.eval_problems, held_out.num_rows))), inputs

    @property
    def _train_file(self) -> Path:
        return self.workdir / "data" / "train.jsonl"

    @staticmethod
    def _train_file_bytes(train) -> bytes:
        """The training rows as `sarkern train` reads them (written once; every later start verifies them)."""
        rows = zip(train["prompt"], train["answer"])
        return "".join(json.dumps({"question": p[-1]["content"], "answer": a}) + "\n" for p, a in rows).encode()

    def _check_train_file(self, held: bytes, expected: bytes) -> None:
        if held != expected:
            raise StudyError(
                f"{self._train_file} no longer holds the training rows of {self.settings.dataset} (its file changed "
                "after the study wrote it); delete it to have it written again, or choose another --workdir"
            )

    def run_dir(self, config: str, seed: int) -> Path:
        return self.workdir / "runs" / config / f"seed-{seed}"

    def plan(self) -> list[tuple[str, int]]:
        """Seed-major order, so that a partial study has every configuration at about as many seeds."""
        return [(config, seed) for seed in range(self.settings.seeds) for config in self.settings.configs]

    def finished(self) -> dict[tuple[str, int], dict[str, Any]]:
        done = {}
        for config, seed in self.plan():
            path = self.run_dir(config, seed) / "result.json"
            if path.exists():
                done[(config, seed)] = json.loads(path.read_text())
        return done

    # ------------------------------------------------------------------------------------------------- the runs

    def base(self) -> dict[str, Any]:
        """Evaluation (and ranking) of the model before any training; the first process to finish it records it."""
        path = self.workdir / "base" / "result.json"
        if path.exists():
            return json.loads(path.read_text())
        started = time.perf_counter()
        with _setup_errors_as_study_errors("the model before training"):
            model, tokenizer = load_for_eval(self.settings.model)
        result = {"config": "before training", **evaluate(model, tokenizer, self.eval_dataset, self.settings)}
        if self.answer_sets is not None:
            result["ranking"] = ranking_analysis(model, tokenizer, self.answer_sets)
        result["wall_seconds"] = time.perf_counter() - started
        held, _ = create_once(path, json_bytes(result))
        return json.loads(held)

    def train_options(self, config: str, seed: int):
        from sarkern.cli import TrainOptions

        s = self.settings
        return TrainOptions(
            model=s.model,
            dataset=self.train_path,
            num_problems=s.num_problems,
            steps=s.steps,
            output_dir=str(self.run_dir(config, seed)),
            seed=seed,
            num_generations=s.num_generations,
            prompts_per_step=s.prompts_per_step,
            max_completion_length=s.max_completion_length,
            learning_rate=s.learning_rate,
            save_steps=s.save_steps,
            resume=True,
            bf16=s.bf16,
            **CONFIGURATIONS[config],
        )

    def run(self, config: str, seed: int) -> dict[str, Any]:
        """Train (resuming a killed run from its last checkpoint), evaluate, save `result.json`, drop checkpoints."""
        from sarkern.cli import run_train
        from sarkern.metrics import read_metrics

        run_dir = self.run_dir(config, seed)
        result_path = run_dir / "result.json"
        if result_path.exists():
            return json.loads(result_path.read_text())
        run_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        # The per-step table goes to the run's log; the progress bars (stderr) stay on the console.
        with (
            _setup_errors_as_study_errors(f"run {config} seed {seed}"),
            (run_dir / "train.log").open("a") as log,
            contextlib.redirect_stdout(log),
        ):
            run_train(self.train_options(config, seed))
            train_wall = time.perf_counter() - started
            model, tokenizer = load_for_eval(str(run_dir / "final"))
        result = {
            "config": config,
            "seed": seed,
            **evaluate(model, tokenizer, self.eval_dataset, self.settings),
            **training_summary(read_metrics(run_dir / "metrics.jsonl")),
            "train_wall_seconds": train_wall,
        }
        if self.answer_sets is not None:
            result["ranking"] = ranking_analysis(model, tokenizer, self.answer_sets)
        result["wall_seconds"] = time.perf_counter() - started
        held, _ = create_once(result_path, json_bytes(result))  # a process that evaluated it first keeps its numbers
        for checkpoint in run_dir.glob("checkpoint-*"):  # the final model stays; resume state is no longer needed
            shutil.rmtree(checkpoint, ignore_errors=True)
        del model
        gc.collect()
        return json.loads(held)

    def run_all(self, progress: bool = True) -> None:
        """Run the planned runs not yet finished; with `run_seeds`, only those seeds' runs (several processes can
        share one work directory, each with its own seeds, when the first has written `base/`)."""
        from tqdm.auto import tqdm

        base = self.base()
        self.write_report()
        seeds = self.run_seeds
        todo = [(config, seed) for config, seed in self.plan() if seeds is None or seed in seeds]
        bar = tqdm(total=len(todo), desc="paper study", unit="run", disable=not progress, position=0)
        try:
            for config, seed in todo:
                already = (self.run_dir(config, seed) / "result.json").exists()
                bar.set_postfix_str(f"{config} seed {seed}" + (" (done)" if already else ""))
                result = self.run(config, seed)
                if not already:
                    self.write_report()
                    bar.write(
                        f"{config} seed {seed}: greedy accuracy {result['greedy_accuracy']:.3f}, length "
                        f"{result['greedy_length']:.1f} (before training: {base['greedy_accuracy']:.3f}, "
                        f"{base['greedy_length']:.1f}), {result['wall_seconds'] / 60:.1f} min"
                    )
                bar.update(1)
        finally:
            bar.close()  # before any message, so that it starts on a line of its own
        if len(self.finished()) == len(self.plan()):
            with study_lock(self.workdir):
                self.manifest = self._read_manifest() or self.manifest
                self.manifest.setdefault("finished", _now())
                write_json(self.workdir / "study.json", self.manifest)
        self.write_report()

    # ------------------------------------------------------------------------------------------------ the report

    def write_report(self) -> dict[str, Path]:
        base_path = self.workdir / "base" / "result.json"
        base = json.loads(base_path.read_text()) if base_path.exists() else None
        runs = self.finished()
        summary = summarise(self.settings.configs, runs)
        stem = self.results_dir / f"paper-study-{self.manifest['date']}"
        self.results_dir.mkdir(parents=True, exist_ok=True)
        data = {
            "date": self.manifest["date"],
            "started": self.manifest["started"],
            "finished": self.manifest.get("finished"),
            "complete": len(runs) == len(self.plan()),
            "runs_planned": len(self.plan()),
            "runs_finished": len(runs),
            "settings": asdict(self.settings),
            "findings": self.manifest.get("findings"),
            "configurations": {name: CONFIGURATIONS[name] for name in self.settings.configs},
            "environment": environment(),
            "study_wall_seconds": sum(r["wall_seconds"] for r in runs.values()) + (base or {}).get("wall_seconds", 0),
            "base": base,
            "runs": list(runs.values()),
            "summary": summary,
        }
        paths = {"json": stem.with_suffix(".json"), "md": stem.with_suffix(".md"), "png": stem.with_suffix(".png")}
        write_json(paths["json"], data)
        replace_atomically(paths["png"], lambda temporary: plot_pareto(data, temporary))
        write_atomic(paths["md"], markdown_report(data, paths["png"].name).encode())
        return paths


# ------------------------------------------------------------------------------------------------------- summaries

METRICS = (
    "greedy_accuracy",
    "sampled_accuracy",
    "greedy_length",
    "sampled_length",
    "sampled_truncated",
    "train_clipped_ratio",
    "sar_step_share",
    "step_seconds",
)


def _present(values) -> list[float]:
    return [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


def training_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """What a run's metrics say about its training. Times are medians over steps: a paused process (SIGSTOP while
    someone measures on a shared machine) inflates a few steps' wall time, not the median."""
    share, step = _present(r.get("sar/step_share") for r in records), _present(r.get("step_time") for r in records)
    accuracy = _present(r.get("rewards/correctness/mean") for r in records[-10:])
    length = _present(r.get("completions/mean_length") for r in records[-10:])
    clipped = _present(r.get("completions/clipped_ratio") for r in records)  # cut off at max_completion_length
    return {
        "steps": len(records),
        "sar_step_share": statistics.median(share) if share else None,
        "step_seconds": statistics.median(step) if step else None,
        "train_accuracy_last10": statistics.fmean(accuracy) if accuracy else None,
        "train_length_last10": statistics.fmean(length) if length else None,
        "train_clipped_ratio": statistics.fmean(clipped) if clipped else None,
    }


def _spread(values: list[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (None with fewer than two values)."""
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
    }


def summarise(configs: list[str], runs: dict[tuple[str, int], dict[str, Any]]) -> dict[str, Any]:
    """Per configuration: mean +- std over seeds of each metric, of the paired difference from correctness-only
    (same seed, so same data and initial sampling), and of the ranking agreement."""
    summary: dict[str, Any] = {}
    for config in configs:
        mine = {seed: r for (c, seed), r in runs.items() if c == config}
        entry: dict[str, Any] = {"runs": len(mine), "seeds": sorted(mine)}
        for metric in METRICS:
            entry[metric] = _spread([r.get(metric) for r in mine.values()])
        if config != "correctness":
            reference = {seed: r for (c, seed), r in runs.items() if c == "correctness"}
            paired = [s for s in mine if s in reference]
            entry["paired_difference"] = {
                metric: _spread([mine[s][metric] - reference[s][metric] for s in paired if metric in mine[s]])
                for metric in ("greedy_accuracy", "sampled_accuracy", "greedy_length", "sampled_length")
            }
        rankings = [r["ranking"] for r in mine.values() if "ranking" in r]
        if rankings:
            entry["ranking_agreement"] = {
                pair: _spread([r["agreement"][pair] for r in rankings]) for pair in rankings[0]["agreement"]
            }
            entry["ranking_mean_sar"] = {
                name: _spread([r["mean_sar"][name] for r in rankings]) for name in rankings[0]["mean_sar"]
            }
        summary[config] = entry
    return summary


def environment() -> dict[str, Any]:
    import torch
    import transformers
    import trl

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU: {cpu}",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
    }


# -------------------------------------------------------------------------------------------------------- rendering


def _fmt(spread: dict[str, Any] | None, digits: int = 3, percent: bool = False) -> str:
    if not spread or spread.get("mean") is None:
        return "-"
    scale, suffix = (100.0, "%") if percent else (1.0, "")
    text = f"{spread['mean'] * scale:.{digits}f}{suffix}"
    if spread.get("std") is not None:
        text += f" ± {spread['std'] * scale:.{digits}f}{suffix}"
    return text


def _value(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def markdown_report(data: dict[str, Any], plot_name: str) -> str:
    s, env, summary, base = data["settings"], data["environment"], data["summary"], data["base"]
    configs = s["configs"]
    data_text = s["dataset"] or f"synthetic arithmetic, {s['num_problems']} train problems drawn with the run seed"
    held_out_text = s["eval_dataset"] or (
        "held out of the dataset" if s["dataset"] else "the synthetic task's test split, seed 0"
    )
    lines = [f"# The paper's claims at small scale: Pareto study and ranking analysis ({data['date']})", ""]
    if data["complete"]:
        lines.append(f"Complete: {data['runs_finished']} of {data['runs_planned']} runs.")
    else:
        counts = ", ".join(f"{c} {summary[c]['runs']}/{s['seeds']}" for c in configs)
        lines.append(
            f"**PARTIAL: {data['runs_finished']} of {data['runs_planned']} runs finished** (per configuration: "
            f"{counts}); the study was still running when this file was written."
        )
    lines += [
        "",
        "Written by `python benchmarks/paper_study.py` from the runs in its work directory; the numbers are as "
        f"measured. {env['device']}, {env['cpu_count']} cores, torch threads {env['torch_threads']}; Python "
        f"{env['python']}, torch {env['torch']}, transformers {env['transformers']}, TRL {env['trl']}.",
        f"Compute time of the finished runs (training + evaluation, wall clock): "
        f"{data['study_wall_seconds'] / 60:.1f} min.",
        *(["", "## Findings", "", data["findings"].strip()] if data.get("findings") else []),
        "",
        "## Settings",
        "",
        f"- Model: {s['model'] or 'the bundled tiny model (sarkern/tiny/model)'}; data: {data_text}.",
        f"- Every run: {s['steps']} GRPO steps of {s['prompts_per_step']} prompts x {s['num_generations']} "
        f"completions, at most {s['max_completion_length']} completion tokens, learning rate {s['learning_rate']}, "
        "otherwise `sarkern train`'s defaults. Seeds 0.."
        f"{s['seeds'] - 1} (the seed sets the training problems, the initial sampling and the batch order).",
        "- Configurations: "
        + "; ".join(f"`{c}` = `{json.dumps(data['configurations'][c])}`" for c in configs)
        + ". Each reward is correctness (1/0) plus the named term.",
        f"- Held-out evaluation: {s['eval_problems']} problems ({held_out_text}), greedy and "
        f"{s['eval_samples']} samples per problem at temperature 1, at most "
        f"{s['eval_max_new_tokens']} new tokens. Length = completion tokens including the stop token.",
    ]
    if s.get("note"):
        lines += ["", s["note"]]

    lines += [
        "",
        "## 1. Pareto study: accuracy and length after training",
        "",
        "Mean ± sample standard deviation over seeds. SAR share = the scorer's share of the training step's wall "
        "time (`sar/step_share`, SAR configurations only) and step = training step time, each the median over a "
        "run's steps. Cut off = share of completions that hit the token limit before their stop token (and so "
        "score 0): in the sampled held-out evaluation, and in training (mean over steps).",
        "",
        "| configuration | runs | greedy accuracy | sampled accuracy | greedy length | sampled length "
        "| cut off (eval) | cut off (training) | SAR share | step (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    if base:
        lines.append(
            f"| before training | - | {_value(base['greedy_accuracy'])} | {_value(base.get('sampled_accuracy'))} "
            f"| {_value(base['greedy_length'], 1)} | {_value(base.get('sampled_length'), 1)} "
            f"| {_percent(base.get('sampled_truncated'))} | - | - | - |"
        )
    for c in configs:
        e = summary[c]
        lines.append(
            f"| {c} | {e['runs']} | {_fmt(e['greedy_accuracy'])} | {_fmt(e['sampled_accuracy'])} "
            f"| {_fmt(e['greedy_length'], 1)} | {_fmt(e['sampled_length'], 1)} "
            f"| {_fmt(e['sampled_truncated'], 1, True)} | {_fmt(e['train_clipped_ratio'], 1, True)} "
            f"| {_fmt(e['sar_step_share'], 1, True)} | {_fmt(e['step_seconds'], 2)} |"
        )
    lines += [
        "",
        "Difference from correctness-only training with the same seed (same training problems and initial model), "
        "mean ± standard deviation over seeds; a difference smaller than its spread is seed noise:",
        "",
        "| configuration | Δ greedy accuracy | Δ sampled accuracy | Δ greedy length | Δ sampled length |",
        "|---|---|---|---|---|",
    ]
    for c in configs:
        if c == "correctness" or "paired_difference" not in summary[c]:
            continue
        d = summary[c]["paired_difference"]
        lines.append(
            f"| {c} | {_fmt(d['greedy_accuracy'])} | {_fmt(d['sampled_accuracy'])} | {_fmt(d['greedy_length'], 1)} "
            f"| {_fmt(d['sampled_length'], 1)} |"
        )
    lines += ["", f"![accuracy against length]({plot_name})", "", "Every run:", ""]
    lines += [
        "| configuration | seed | greedy acc. | sampled acc. | greedy len. | sampled len. | cut off (eval) "
        "| cut off (training) | SAR share | train acc. (last 10 steps) | train len. (last 10) | wall (min) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(data["runs"], key=lambda r: (configs.index(r["config"]), r["seed"])):
        lines.append(
            f"| {r['config']} | {r['seed']} | {_value(r['greedy_accuracy'])} | {_value(r.get('sampled_accuracy'))} "
            f"| {_value(r['greedy_length'], 1)} | {_value(r.get('sampled_length'), 1)} "
            f"| {_percent(r.get('sampled_truncated'))} | {_percent(r.get('train_clipped_ratio'))} "
            f"| {_percent(r.get('sar_step_share'))} "
            f"| {_value(r.get('train_accuracy_last10'))} | {_value(r.get('train_length_last10'), 1)} "
            f"| {r['wall_seconds'] / 60:.1f} |"
        )

    lines += ["", "## 2. Ranking analysis: does SAR order answers as the paper says?", ""]
    if not base or "ranking" not in base:
        lines.append(
            "Not run: the ranking analysis needs the synthetic task's generator to write answers of known quality, "
            "and this study trains on another dataset."
        )
    else:
        ranked = [c for c in configs if "ranking_agreement" in summary[c]]
        lines += [
            f"{base['ranking']['problems']} held-out problems; per problem the task's generator writes 1 concise, "
            "1 restated and 1 padded correct answer (the three verbosities of `ArithmeticProblem.solution`), 2 "
            "partially correct ones (every step right but the last result, off by 1 or 2, and so the answer) and 2 "
            "wrong ones (the concise solutions of two other problems with as many steps). Each cell is the fraction "
            "of same-problem pairs (better, worse) with SAR(better) > SAR(worse), ties counting half; 0.5 is chance. "
            "Trained columns: mean ± standard deviation over seeds. Rows marked * are the paper's headline claims.",
            "",
            "| pair (paper: left > right) | before training | " + " | ".join(f"after {c}" for c in ranked) + " |",
            "|---|---|" + "---|" * len(ranked),
        ]
        headline = {f"{a} > {b}" for a, b in HEADLINE_PAIRS}
        for pair, value in base["ranking"]["agreement"].items():
            cells = [_fmt(summary[c]["ranking_agreement"][pair]) for c in ranked]
            mark = " *" if pair in headline else ""
            lines.append(f"| {pair}{mark} | {value:.3f} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Mean SAR of each class:",
            "",
            "| class | before training | " + " | ".join(f"after {c}" for c in ranked) + " |",
            "|---|---|" + "---|" * len(ranked),
        ]
        for name, value in base["ranking"]["mean_sar"].items():
            cells = [_fmt(summary[c]["ranking_mean_sar"][name]) for c in ranked]
            lines.append(f"| {name} | {value:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_pareto(data: dict[str, Any], out: Path) -> None:
    """Held-out accuracy against mean completion length: a faint point per run, a marker with error bars per
    configuration (mean ± std over seeds), a star for the model before training; greedy and sampled panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = data["settings"]["configs"]
    panels = [("greedy", "greedy_accuracy", "greedy_length")]
    if data["settings"]["eval_samples"]:
        panels.append(("sampled", "sampled_accuracy", "sampled_length"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.6), squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, (title, acc_key, len_key) in zip(axes[0], panels):
        for i, config in enumerate(configs):
            runs = [r for r in data["runs"] if r["config"] == config]
            if not runs:
                continue
            color = colors(i % 10)
            ax.scatter([r[len_key] for r in runs], [r[acc_key] for r in runs], color=color, alpha=0.35, s=18)
            acc, length = data["summary"][config][acc_key], data["summary"][config][len_key]
            ax.errorbar(
                length["mean"],
                acc["mean"],
                xerr=length["std"] or 0.0,
                yerr=acc["std"] or 0.0,
                color=color,
                marker="o",
                markersize=7,
                capsize=3,
                label=f"{config} (n={len(runs)})",
            )
        base = data["base"]
        if base and base.get(acc_key) is not None:
            ax.scatter([base[len_key]], [base[acc_key]], marker="*", s=160, color="black", label="before training")
        ax.set_title(f"held-out, {title} decoding")
        ax.set_xlabel("mean completion length (tokens)")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=min(len(labels), 4) or 1)
    status = "" if data["complete"] else f" (PARTIAL: {data['runs_finished']}/{data['runs_planned']} runs)"
    fig.suptitle(
        f"Pareto study, {data['date']}{status}: one faint point per run, mean ± 1 std over seeds; upper left is better",
        fontsize=10,
    )
    rows = math.ceil(len(labels) / 4) if labels else 0
    fig.tight_layout(rect=(0, 0.05 * rows, 1, 1))  # room for the legend below the panels
    fig.savefig(out, dpi=110, format="png")  # `out` may be a temporary name
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------- helpers


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def parse_args(argv: list[str] | None = None) -> tuple[StudySettings, argparse.Namespace]:
    defaults = StudySettings()
    parser = argparse.ArgumentParser(
        prog="python benchmarks/paper_study.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "paper-study"), help="study directory (resumable)")
    parser.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"), help="where the report goes")
    parser.add_argument("--date", default=None, help="date in the report's file name (default: the study's start)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from finished runs, no training")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument(
        "--run-seeds",
        nargs="+",
        type=int,
        default=None,
        help="train only these seeds' runs (to split a study across processes sharing --workdir; default: all)",
    )
    parser.add_argument(
        "--findings-file", default=None, help="markdown text for the report's Findings section (kept in the study)"
    )
    parser.add_argument(
        "--configs", nargs="+", choices=list(CONFIGURATIONS), default=defaults.configs, help="each at most once"
    )
    for f in fields(StudySettings):
        if f.name == "configs":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            parser.add_argument(flag, type=kind, default=f.default, help=f"default: {f.default}")
    args = parser.parse_args(argv)
    settings = StudySettings(**{f.name: getattr(args, f.name) for f in fields(StudySettings)})
    return settings, args


def run_study(argv: list[str]) -> None:
    settings, args = parse_args(argv)
    findings = read_findings(args.findings_file)
    study = Study(
        settings,
        Path(args.workdir),
        Path(args.results_dir),
        date=args.date,
        findings=findings,
        run_seeds=args.run_seeds,
    )
    if not args.report_only:
        study.run_all(progress=not args.no_progress)
    paths = study.write_report()
    print(f"paper_study: report in {paths['md']}, numbers in {paths['json']}, plot in {paths['png']}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """0 on success; otherwise one line on stderr and status 2 (bad input: nothing was written), 130 (Ctrl-C: the
    line says how to resume) or 1 (any other failure; `--debug` shows the traceback)."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, message=".*gradient_checkpointing.*")
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        run_study(argv)
    except StudyError as err:
        if debug:
            raise
        say(str(err.code))
        return 2
    except KeyboardInterrupt as err:
        if debug:
            raise
        where = f"{err}; " if str(err) else "interrupted; run the same command again to resume, "
        say(f"paper_study: {where}finished runs are kept")
        return 130
    except SystemExit:
        raise  # argparse's own usage errors and --help
    except Exception as err:  # noqa: BLE001 - the user gets one line; --debug shows the traceback
        if debug:
            raise
        message = " ".join(str(err).split())
        say(f"paper_study: error: {type(err).__name__}: {message} (rerun with --debug for the traceback)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
