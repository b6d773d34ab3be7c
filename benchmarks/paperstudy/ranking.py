"""The ranking analysis: held-out problems with answers of known quality, SAR's scores of them, and the fraction of
same-problem pairs SAR orders as the paper says."""

from __future__ import annotations

import itertools
import statistics
from typing import Any

# Answer classes of the ranking analysis, best first: the paper's ordering is "earlier scores higher".
ANSWER_CLASSES = ("concise correct", "restated correct", "padded correct", "partially correct", "wrong")
CORRECT_CLASSES = frozenset(ANSWER_CLASSES[:3])
# The pairs the paper's claim is about (concise above redundant, partially correct above wrong).
HEADLINE_PAIRS = (("concise correct", "padded correct"), ("partially correct", "wrong"))
# Per problem: the wrong answers are the concise solutions of this many other held-out problems.
WRONG_ANSWERS = 2
RANKING_SEED = 0


def partially_correct_solution(problem, delta: int) -> str:
    """The concise solution with every step right except the last result (and so the answer), off by `delta`."""
    from sarkern.tasks import format_final_answer

    *head, last = problem.equations
    left, _ = last.split("=")
    wrong = problem.answer + delta
    return " ".join(f"{eq}." for eq in (*head, f"{left}={wrong}")) + " " + format_final_answer(wrong)


def wrong_answer_sources(problems: list, index: int) -> list:
    """The other problems whose concise solutions are problem `index`'s wrong answers: as many steps (so the wrong
    answer looks like a solution of the same shape) and another final answer; at most `WRONG_ANSWERS`."""
    problem = problems[index]
    after_then_before = itertools.chain(range(index + 1, len(problems)), range(index))
    sources = (
        problems[j]
        for j in after_then_before
        if problems[j].answer != problem.answer and len(problems[j].equations) == len(problem.equations)
    )
    return list(itertools.islice(sources, WRONG_ANSWERS))


def ranking_shortfall(num_problems: int, seed: int = RANKING_SEED) -> int | None:
    """The first of `num_problems` held-out problems that lacks `WRONG_ANSWERS` wrong-answer sources, or None."""
    from sarkern.tasks import generate_problems

    problems = generate_problems(num_problems, seed, split="test")
    for index in range(num_problems):
        if len(wrong_answer_sources(problems, index)) < WRONG_ANSWERS:
            return index
    return None


def ranking_answer_sets(num_problems: int, seed: int = RANKING_SEED) -> list[dict[str, Any]]:
    """Held-out problems with answers of each class of `ANSWER_CLASSES`, written by the task's generator.

    Each item is `{"question", "answer", "answers": {class: [text, ...]}}`. Partially correct answers get the last
    result wrong by 1 or 2 (two answers); wrong answers are the concise solutions of two other problems with as
    many steps and a different answer. Every label is checked with the training reward (`correctness_reward`).
    """
    from sarkern.rewards import correctness_reward
    from sarkern.tasks import Verbosity, generate_problems

    problems = generate_problems(num_problems, seed, split="test")
    sets = []
    for index, problem in enumerate(problems):
        deltas = [d for d in (1, -1, 2, -2) if problem.answer + d >= 0][:2]
        answers = {
            "concise correct": [problem.solution(Verbosity.CONCISE)],
            "restated correct": [problem.solution(Verbosity.RESTATED)],
            "padded correct": [problem.solution(Verbosity.PADDED)],
            "partially correct": [partially_correct_solution(problem, d) for d in deltas],
            "wrong": [other.solution(Verbosity.CONCISE) for other in wrong_answer_sources(problems, index)],
        }
        for name, texts in answers.items():
            scores = correctness_reward([None] * len(texts), texts, answer=[str(problem.answer)] * len(texts))
            if any(score != float(name in CORRECT_CLASSES) for score in scores):
                raise RuntimeError(f"ranking answer of class {name!r} mislabelled by correctness_reward: {texts}")
        sets.append({"question": problem.question, "answer": str(problem.answer), "answers": answers})
    return sets


def ranking_analysis(model, tokenizer, answer_sets: list[dict[str, Any]]) -> dict[str, Any]:
    """SAR of every answer, then per pair of classes the fraction of same-problem pairs in the paper's order."""
    from sarkern import SelfAlignedReward
    from sarkern.tasks import make_prompt

    reward = SelfAlignedReward(model, tokenizer)
    prompts, texts, keys = [], [], []
    for index, item in enumerate(answer_sets):
        for name, answers in item["answers"].items():
            for text in answers:
                prompts.append(make_prompt(item["question"]))
                texts.append(text)
                keys.append((index, name))
    eos = tokenizer.eos_token_id
    completion_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] + [eos] for text in texts]
    was_training = model.training
    model.eval()
    try:
        scores = reward(prompts, texts, completion_ids)
    finally:
        model.train(was_training)
    by_problem: dict[int, dict[str, list[float]]] = {}
    for (index, name), score in zip(keys, scores):
        by_problem.setdefault(index, {}).setdefault(name, []).append(score)

    problems = list(by_problem.values())
    mean_sar = {name: statistics.fmean(s for c in problems for s in c[name]) for name in ANSWER_CLASSES}
    return {"agreement": pair_agreement(problems), "mean_sar": mean_sar, "problems": len(answer_sets)}


def pair_agreement(problems: list[dict[str, list[float]]]) -> dict[str, float]:
    """For each pair of classes (better, worse) in `ANSWER_CLASSES` order: the fraction of same-problem pairs of
    answers with score(better) > score(worse), a tie counting half. `problems` holds each problem's scores by class."""
    agreement = {}
    for better, worse in itertools.combinations(ANSWER_CLASSES, 2):
        agree = total = 0.0
        for classes in problems:
            for high in classes[better]:
                for low in classes[worse]:
                    agree += 1.0 if high > low else 0.5 if high == low else 0.0
                    total += 1
        if total == 0:
            raise ValueError(f"no pair of answers of classes {better!r} and {worse!r} to compare")
        agreement[f"{better} > {worse}"] = agree / total
    return agreement
