"""`sarkern train`: GRPO with the Self-Aligned Reward, on the bundled tiny model by default.

    sarkern train                                   # bundled tiny model, synthetic arithmetic, CPU, a few minutes
    sarkern train --model ./my-qwen --dataset gsm8k.jsonl --steps 500 --output-dir runs/qwen
    sarkern train --config run.yaml --reward o1_pruner
    accelerate launch --num_processes 8 -m sarkern.cli train --model ./my-qwen ...

Writes to the output directory: `metrics.jsonl` (one line per step), `metrics.png` (reward, accuracy and completion
length against step), `checkpoint-*` folders, and the final model. A run restarted with the same output directory
resumes from its last checkpoint (`--no-resume` starts over).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

REWARDS = ("sar", "none", "self_confidence", "o1_pruner", "efficient_reasoner")


@dataclass
class TrainOptions:
    """Everything `sarkern train` can be told, from the command line or a YAML file (same names)."""

    model: str | None = None  # local Hugging Face model directory; None = the bundled tiny model
    dataset: str | None = None  # local JSONL/Parquet of questions and answers; None = synthetic arithmetic
    question_column: str = "question"
    answer_column: str = "answer"
    num_problems: int = 2000  # synthetic task size
    reward: str = "sar"  # sar | none | self_confidence | o1_pruner | efficient_reasoner
    sar_weight: float = 0.2
    placeholder: str = "template"  # SAR's placeholder prompt: template (chat template, system kept) | paper
    correctness_weight: float = 1.0
    length_penalty_weight: float = 0.2  # for o1_pruner / efficient_reasoner
    steps: int = 100
    output_dir: str = "runs/sarkern"
    seed: int = 0
    num_generations: int = 8
    prompts_per_step: int = 8
    max_completion_length: int = 96
    learning_rate: float = 1e-4  # suits the tiny model; use ~1e-6 for billion-parameter models
    temperature: float = 1.0
    beta: float = 0.0
    num_iterations: int = 1
    gradient_accumulation_steps: int = 1
    save_steps: int = 10
    resume: bool = True
    bf16: bool = False
    gradient_checkpointing: bool = False
    use_cpu: bool | None = None  # None: CPU when no CUDA device is present


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sarkern", description="sarkern: the Self-Aligned Reward for TRL")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train", help="GRPO with SAR", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    train.add_argument("--config", help="YAML file with any of the options below (command-line flags win)")
    for f in fields(TrainOptions):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "resume":
            train.add_argument(
                "--no-resume",
                dest="resume",
                action="store_const",
                const=False,
                default=None,
                help="start over even if the output directory has checkpoints",
            )
        elif f.type in ("bool", "bool | None"):
            train.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        elif f.name == "reward":
            train.add_argument(
                flag,
                dest=f.name,
                choices=REWARDS,
                default=None,
                help="sar (default): correctness + sar_weight * SAR; none: correctness only; "
                "self_confidence: SAR without the comparison; o1_pruner, efficient_reasoner: "
                "the paper's length-penalty baselines",
            )
        elif f.name == "placeholder":
            train.add_argument(
                flag, dest=f.name, choices=("template", "paper"), default=None,
                help="SAR's placeholder prompt: template (default: the chat template with the question emptied, "
                "system messages kept) or paper (the official code's fixed system prompt)",
            )  # fmt: skip
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            train.add_argument(flag, dest=f.name, type=kind, default=None, help=f"default: {f.default}")
    return parser


def parse_options(argv: list[str]) -> TrainOptions:
    """Defaults, overridden by the YAML config, overridden by explicit command-line flags."""
    args = _parser().parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        import yaml

        path = Path(args.config)
        if not path.is_file():
            raise SystemExit(f"sarkern train: config file {path} not found")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise SystemExit(f"sarkern train: {path} must hold a mapping of option names to values")
        known = {f.name for f in fields(TrainOptions)}
        unknown = sorted(set(k.replace("-", "_") for k in loaded) - known)
        if unknown:
            raise SystemExit(f"sarkern train: unknown options in {path}: {', '.join(unknown)}")
        values.update({k.replace("-", "_"): v for k, v in loaded.items()})
    values.update(
        {k: v for k, v in vars(args).items() if k in {f.name for f in fields(TrainOptions)} and v is not None}
    )
    options = TrainOptions(**values)
    if options.reward not in REWARDS:
        raise SystemExit(f"sarkern train: reward must be one of {REWARDS}, got {options.reward!r}")
    return options


# --------------------------------------------------------------------------------------------------- building blocks


class SetupError(SystemExit):
    """Bad input found before training starts; the message says what and where."""

    def __init__(self, message: str):
        super().__init__(f"sarkern train: {message}")


def load_model_and_tokenizer(path: str | None):
    """The bundled tiny model, or a local Hugging Face model directory (checked before anything heavy runs)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .tiny import TINY_MODEL_DIR

    model_dir = Path(path) if path else Path(TINY_MODEL_DIR)
    if not model_dir.is_dir():
        raise SetupError(f"model directory {model_dir} does not exist or is not a directory")
    try:
        AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - any failure here means the directory is not a usable model
        raise SetupError(f"cannot read a model config in {model_dir}: {err}") from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as err:  # noqa: BLE001
        raise SetupError(f"model directory {model_dir} has no usable tokenizer: {err}") from err
    # transformers may build an empty tokenizer from the config alone; one that cannot encode text is no tokenizer.
    if tokenizer is None or len(tokenizer) <= 1 or not tokenizer.encode("1 + 1 = 2", add_special_tokens=False):
        raise SetupError(f"model directory {model_dir} has no usable tokenizer (no tokenizer files with a vocabulary)")
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    except Exception as err:  # noqa: BLE001
        raise SetupError(f"cannot load the model weights in {model_dir}: {err}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_dataset_for(options: TrainOptions):
    from .tasks import DatasetFormatError, load_qa_file, synthetic_arithmetic_dataset

    if options.dataset is None:
        return synthetic_arithmetic_dataset(options.num_problems, seed=options.seed)
    try:
        return load_qa_file(
            options.dataset, question_column=options.question_column, answer_column=options.answer_column
        )
    except DatasetFormatError as err:
        raise SetupError(str(err)) from err


def reward_setup(options: TrainOptions) -> tuple[list, list[float], dict[str, Any]]:
    """(reward functions, their weights, SAR config fields) for the chosen reward."""
    from .rewards import EfficientReasonerLengthPenalty, O1PrunerLengthPenalty, correctness_reward

    funcs, weights = [correctness_reward], [options.correctness_weight]
    sar = {"sar_weight": options.sar_weight}
    if options.reward == "none":
        sar["sar_weight"] = 0.0
    elif options.reward == "self_confidence":
        # -ppl(a|q) + const: no placeholder pass, hence nothing to divide by.
        sar.update(sar_use_comparison=False, sar_use_denominator=False)
    elif options.reward in ("o1_pruner", "efficient_reasoner"):
        penalty = O1PrunerLengthPenalty if options.reward == "o1_pruner" else EfficientReasonerLengthPenalty
        funcs.append(penalty(options.num_generations))
        weights.append(options.length_penalty_weight)
        sar["sar_weight"] = 0.0
    return funcs, weights, sar


def build_trainer(options: TrainOptions, callbacks: list | None = None):
    """Check every input, then build the SARGRPOTrainer. Raises SetupError before any training on bad input."""
    import torch

    from .trainer import SARGRPOConfig, SARGRPOTrainer

    dataset = load_dataset_for(options)
    model, tokenizer = load_model_and_tokenizer(options.model)
    funcs, weights, sar = reward_setup(options)
    sar["sar_placeholder"] = options.placeholder
    use_cpu = (not torch.cuda.is_available()) if options.use_cpu is None else options.use_cpu
    batch = options.prompts_per_step * options.num_generations
    config = SARGRPOConfig(
        output_dir=options.output_dir,
        max_steps=options.steps,
        seed=options.seed,
        data_seed=options.seed,
        learning_rate=options.learning_rate,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=options.gradient_accumulation_steps,
        num_generations=options.num_generations,
        max_completion_length=options.max_completion_length,
        temperature=options.temperature,
        beta=options.beta,
        num_iterations=options.num_iterations,
        reward_weights=weights,
        logging_steps=1,
        save_steps=options.save_steps,
        save_total_limit=2,
        report_to="none",
        bf16=options.bf16,
        use_cpu=use_cpu,
        log_completions=False,
        **({"gradient_checkpointing": True} if options.gradient_checkpointing else {}),
        **sar,
    )
    return SARGRPOTrainer(
        model=model,
        reward_funcs=funcs,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=callbacks or [],
    )


# --------------------------------------------------------------------------------------------------- train command


def run_train(options: TrainOptions, extra_callbacks: list | None = None) -> Path:
    """Train, resuming from the output directory's last checkpoint unless `options.resume` is False."""
    from transformers.trainer_callback import ProgressCallback
    from transformers.trainer_utils import get_last_checkpoint

    from .metrics import MetricsCallback, QuietProgressCallback, plot_metrics

    output_dir = Path(options.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = get_last_checkpoint(str(output_dir)) if options.resume else None
    metrics_path = output_dir / "metrics.jsonl"
    trainer = build_trainer(options, callbacks=[MetricsCallback(metrics_path), *(extra_callbacks or [])])
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(QuietProgressCallback)
    main_process = trainer.accelerator.is_main_process
    if main_process:
        if checkpoint is None and metrics_path.exists():
            metrics_path.unlink()  # a fresh run starts a fresh metrics file
        where = f"resuming from {checkpoint}" if checkpoint else "starting"
        print(
            f"sarkern train: {where}; {trainer.accelerator.num_processes} process(es) on {trainer.accelerator.device}",
            flush=True,
        )
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(str(output_dir / "final"))  # on every process: it saves on the main one
    if main_process:
        plot_metrics(metrics_path, output_dir / "metrics.png")
        print(f"sarkern train: metrics in {metrics_path}, plot in {output_dir / 'metrics.png'}", flush=True)
    return output_dir


def main(argv: list[str] | None = None) -> int:
    # transformers renames its gradient-checkpointing API in v6 and TRL still calls the old names: noise for users.
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*gradient_checkpointing.*")
    options = parse_options(sys.argv[1:] if argv is None else argv)
    run_train(options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
