"""Build the bundled tiny model: a small Qwen2 trained with supervised learning on the synthetic arithmetic task.

    python -m sarkern.tiny.build --seed 0 --out sarkern/tiny/model

The model learns to answer the problems of `sarkern.tasks` (train split) in chat format, with completions drawn
from a mixture of verbosities: concise equations, equations with restatements, and padded, repetitive solutions
that re-check every step (see `sarkern.tasks.Verbosity`). All of them are correct, so the model ends up able to
answer at any of these lengths, which leaves a length-aware reward such as SAR something to remove. Training stops
after a fixed number of steps; the script then measures greedy accuracy on held-out problems (the test split, which
no training problem belongs to) and fails if it is below `--min-accuracy`.

Everything is determined by `--seed`: the problems, the verbosity of each solution, the initial weights and the
batch order. Bit-identical weights also need the same torch version, CPU kind and thread count (`--threads`,
default 1, as the bundled checkpoint was built).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM

from sarkern.tasks import Verbosity, generate_problems, make_prompt
from sarkern.tiny import TINY_MODEL_DIR, load_tiny_model
from sarkern.tiny.evaluate import evaluate_accuracy
from sarkern.tiny.tokenizer import build_tokenizer, save_tokenizer, stop_token_ids

IGNORE_INDEX = -100


@dataclass
class BuildConfig:
    """Every knob of the build; the defaults reproduce the bundled checkpoint."""

    seed: int = 0
    out: str = str(TINY_MODEL_DIR)
    # Model (Qwen2 architecture)
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    max_positions: int = 512
    # Data: probability of each verbosity (concise, restated, padded)
    verbosity_weights: tuple[float, float, float] = (0.4, 0.3, 0.3)
    min_steps: int = 2
    max_steps: int = 3
    # Optimisation
    train_steps: int = 1400
    batch_size: int = 32
    learning_rate: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    # Evaluation
    eval_every: int = 200
    eval_problems: int = 64
    final_eval_problems: int = 200
    min_accuracy: float = 0.6
    threads: int = 1  # one thread: considerate on a shared machine, and part of bit-exact reproduction


def make_model(config: BuildConfig, tokenizer: PreTrainedTokenizerBase) -> Qwen2ForCausalLM:
    """A freshly initialised tiny Qwen2 sized for the character-level vocabulary."""
    stops = stop_token_ids(tokenizer)
    model_config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_positions,
        tie_word_embeddings=True,  # the vocabulary is tiny; tying saves parameters at no cost
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=None,
        eos_token_id=stops[0],
        pad_token_id=tokenizer.pad_token_id,
    )
    return Qwen2ForCausalLM(model_config)


def encode_examples(
    config: BuildConfig, tokenizer: PreTrainedTokenizerBase, num_examples: int, rng: random.Random
) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) of `num_examples` training problems; labels cover the completion and its `<|im_end|>`."""
    problems = generate_problems(
        num_examples, config.seed, split="train", min_steps=config.min_steps, max_steps=config.max_steps
    )
    verbosities = rng.choices(list(Verbosity), weights=config.verbosity_weights, k=num_examples)
    prompt_texts = [
        tokenizer.apply_chat_template(make_prompt(p.question), tokenize=False, add_generation_prompt=True)
        for p in problems
    ]
    completion_texts = [p.solution(v) + tokenizer.eos_token for p, v in zip(problems, verbosities)]
    prompt_ids = tokenizer(prompt_texts, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion_texts, add_special_tokens=False)["input_ids"]
    return [(p + c, [IGNORE_INDEX] * len(p) + c) for p, c in zip(prompt_ids, completion_ids)]


def make_batches(
    examples: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int, rng: random.Random
) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of similar length (sorted within windows of 16 batches) to waste little on padding."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    window = 16 * batch_size
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: len(examples[i][0]))
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    tensors = []
    for batch in batches:
        width = max(len(examples[i][0]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids, targets = examples[i]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(ids)] = torch.tensor(targets)
            attention_mask[row, : len(ids)] = 1
        tensors.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    return tensors


def learning_rate_at(step: int, config: BuildConfig) -> float:
    """Linear warm-up, then cosine decay to `min_lr_ratio` of the peak."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.train_steps - config.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.learning_rate * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


def build(config: BuildConfig) -> dict[str, object]:
    """Train the tiny model, evaluate it, save it to `config.out`; returns the build report.

    Runs with the current `torch.get_num_threads()` (the command line sets it from `config.threads`).
    """
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    rng = random.Random(f"sarkern-tiny-build/{config.seed}")

    tokenizer = build_tokenizer(model_max_length=config.max_positions)
    model = make_model(config, tokenizer)
    num_params = sum(p.numel() for p in model.parameters())
    examples = encode_examples(config, tokenizer, config.train_steps * config.batch_size, rng)
    batches = make_batches(examples, config.batch_size, tokenizer.pad_token_id, rng)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]  # norms (and biases) are not decayed
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate,
        betas=(0.9, 0.98),
    )

    model.train()
    history: list[dict[str, float]] = []
    progress = tqdm(batches, desc=f"training tiny model ({num_params / 1e6:.2f}M params)", unit="step")
    smoothed = None
    for step, batch in enumerate(progress):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, config)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        smoothed = loss.item() if smoothed is None else 0.95 * smoothed + 0.05 * loss.item()
        postfix = {"loss": f"{smoothed:.4f}"}
        if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < len(batches):
            result = evaluate_accuracy(model, tokenizer, num_problems=config.eval_problems, seed=config.seed + 1)
            history.append({"step": step + 1, "loss": smoothed, "accuracy": result.accuracy})
            progress.write(
                f"step {step + 1}: loss {smoothed:.4f}, held-out accuracy {result.accuracy:.1%} "
                f"({result.num_correct}/{result.num_problems}), mean length {result.mean_completion_tokens:.0f}"
            )
            postfix["acc"] = f"{result.accuracy:.0%}"
        progress.set_postfix(postfix, refresh=False)
    train_seconds = time.perf_counter() - started

    out = Path(config.out)
    save(model, tokenizer, out)
    # Measure what ships: the checkpoint as AutoModelForCausalLM / AutoTokenizer load it back from disk.
    shipped_model, shipped_tokenizer = load_tiny_model(out, dtype=torch.float32)
    check_tokenizer_round_trip(tokenizer, shipped_tokenizer)
    result = evaluate_accuracy(
        shipped_model, shipped_tokenizer, num_problems=config.final_eval_problems, seed=config.seed
    )
    report = {
        "seed": config.seed,
        "num_parameters": num_params,
        "final_loss": smoothed,
        "heldout_accuracy": result.accuracy,
        "heldout_problems": result.num_problems,
        "heldout_mean_completion_tokens": result.mean_completion_tokens,
        "train_seconds": round(train_seconds, 1),
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "history": history,
        "config": asdict(config),
    }
    print(
        f"held-out greedy accuracy {result.accuracy:.1%} ({result.num_correct}/{result.num_problems}), "
        f"mean completion {result.mean_completion_tokens:.0f} tokens, trained in {train_seconds / 60:.1f} min"
    )
    (out / "build_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def check_tokenizer_round_trip(built: PreTrainedTokenizerBase, loaded: PreTrainedTokenizerBase) -> None:
    """Fail if the tokenizer loaded from disk encodes differently from the one the model was trained with."""
    problem = generate_problems(1, 0, split="test")[0]
    messages = make_prompt(problem.question) + [{"role": "assistant", "content": problem.solution(Verbosity.PADDED)}]
    text = built.apply_chat_template(messages, tokenize=False)
    if loaded(text)["input_ids"] != built(text)["input_ids"] or loaded.decode(built(text)["input_ids"]) != text:
        raise RuntimeError(f"{type(loaded).__name__} loaded from disk does not reproduce the training tokenizer")


def save(model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    """Write weights (safetensors), config, generation config and tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    stops = stop_token_ids(tokenizer)
    model.generation_config = GenerationConfig(
        eos_token_id=stops, pad_token_id=tokenizer.pad_token_id, bos_token_id=None, max_new_tokens=200
    )
    model.save_pretrained(out)
    save_tokenizer(tokenizer, out)  # loadable by transformers 4.56+ and 5.x alike
    for path in out.iterdir():  # safetensors writes owner-only files; package data should be world-readable
        if path.is_file():
            path.chmod(0o644)


def parse_args(argv: list[str] | None = None) -> BuildConfig:
    defaults = BuildConfig()
    parser = argparse.ArgumentParser(
        prog="python -m sarkern.tiny.build", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of data, weights and batch order")
    parser.add_argument("--out", default=defaults.out, help="output model directory (default: the bundled one)")
    parser.add_argument("--train-steps", type=int, default=defaults.train_steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--hidden-size", type=int, default=defaults.hidden_size)
    parser.add_argument("--intermediate-size", type=int, default=defaults.intermediate_size)
    parser.add_argument("--num-layers", type=int, default=defaults.num_layers)
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every, help="0 disables periodic evaluation")
    parser.add_argument("--final-eval-problems", type=int, default=defaults.final_eval_problems)
    parser.add_argument("--min-accuracy", type=float, default=defaults.min_accuracy)
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch CPU threads")
    args = parser.parse_args(argv)
    return BuildConfig(**{k: v for k, v in vars(args).items()})


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    torch.set_num_threads(config.threads)
    report = build(config)
    if float(report["heldout_accuracy"]) < config.min_accuracy:
        print(
            f"error: held-out accuracy {report['heldout_accuracy']:.1%} is below --min-accuracy "
            f"{config.min_accuracy:.0%}; the model was saved to {config.out} but should not be shipped",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
