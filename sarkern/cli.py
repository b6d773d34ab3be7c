"""`sarkern train`: GRPO with the Self-Aligned Reward, on the bundled tiny model by default.

    sarkern train                                   # bundled tiny model, synthetic arithmetic, CPU, a few minutes
    sarkern train --model ./my-qwen --dataset gsm8k.jsonl --steps 500 --output-dir runs/qwen
    sarkern train --config run.yaml --reward o1_pruner
    accelerate launch --num_processes 8 -m sarkern.cli train --model ./my-qwen ...

Writes to the output directory: `metrics.jsonl` (one line per step), `metrics.png` (reward, accuracy and completion
length against step), `checkpoint-*` folders, the final model in `final/`, and `sarkern-run.json` (the run's
identity and the options that define it). A run restarted with the same output directory resumes from its newest
intact checkpoint, whatever stopped it, and only with the options it was started with (`MAY_CHANGE_ON_RESUME`
excepted); a finished run says so and exits; `--no-resume` starts a new run there. Every option and the dataset
are checked before the first step; errors are one line (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .placeholder import PLACEHOLDER_PRESETS

REWARDS = ("sar", "none", "self_confidence", "o1_pruner", "efficient_reasoner")
SCALE_REWARDS = ("group", "batch", "none")  # TRL's GRPOConfig.scale_rewards

# The training recipe each placeholder preset brings: the options below that the user leaves unset take these values
# (an explicit option, command line or YAML, wins and is named in the log). `paper` is the official SAR runs'
# (scripts/SA-grpo-*.sh of amazon-science's verl fork): advantages not divided by the group's reward std
# (`algorithm.norm_adv_by_std_in_grpo=False`, TRL's `scale_rewards="none"`), 6 generations per prompt
# (`rollout.n=6`), SAR weight 0.2 (`reward_factors=[1, 0.2]`). `template` keeps TRL's default scaling.
RECIPES: dict[str, dict[str, Any]] = {
    "template": {"scale_rewards": "group", "num_generations": 8, "sar_weight": 0.2},
    "paper": {"scale_rewards": "none", "num_generations": 6, "sar_weight": 0.2},
}


@dataclass
class TrainOptions:
    """Everything `sarkern train` can be told, from the command line or a YAML file (same names)."""

    model: str | None = None  # local Hugging Face model directory; None = the bundled tiny model
    dataset: str | None = None  # local JSONL/Parquet of questions and answers; None = synthetic arithmetic
    question_column: str = "question"
    answer_column: str = "answer"
    num_problems: int = 2000  # synthetic task size
    reward: str = "sar"  # sar | none | self_confidence | o1_pruner | efficient_reasoner
    sar_weight: float | None = None  # None: the recipe's (0.2)
    # SAR's placeholder prompt and the recipe it brings (RECIPES): template (chat template, system kept) | paper (the
    # official code's system prompt in the real prompts and the placeholder, and the paper's training recipe)
    placeholder: str = "template"
    scale_rewards: str | None = None  # group | batch | none (TRL's GRPOConfig.scale_rewards); None: the recipe's
    correctness_weight: float = 1.0
    length_penalty_weight: float = 0.2  # for o1_pruner / efficient_reasoner
    steps: int = 100
    output_dir: str = "runs/sarkern"
    seed: int = 0
    num_generations: int | None = None  # None: the recipe's (template 8, paper 6)
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
    drop_long_prompts: bool = False  # leave out prompts too long for the model (default: refuse them)
    text_answers: bool = False  # accept reference answers math-verify cannot parse, compared verbatim
    trust_remote_code: bool = False  # run Python code shipped in the model directory (never by default)
    debug: bool = False  # show tracebacks; also prints the first prompt and its SAR placeholder, decoded

    def __post_init__(self) -> None:
        # Options left unset take the recipe of the placeholder preset (no other state: every attribute is an option).
        for name, value in RECIPES.get(self.placeholder, RECIPES["template"]).items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def describe_recipe(self) -> str:
        """One line: the recipe's values in force, and the explicit options that differ from it (which won)."""
        recipe = RECIPES.get(self.placeholder, RECIPES["template"])
        applied = ", ".join(f"{k}={v!r}" for k, v in recipe.items() if getattr(self, k) == v)
        kept = ", ".join(f"{flag(k)} {getattr(self, k)!r}" for k, v in recipe.items() if getattr(self, k) != v)
        line = f"recipe {self.placeholder!r} (--placeholder {self.placeholder}): " + (applied or "nothing applied")
        return line + (f"; explicit options kept: {kept}" if kept else "")


# Options a resume may change: where and how often the run saves, how it runs on the machine, what it prints. Every
# other option defines the run (what it trains, on what, towards what, how): a resume that changes one would put
# steps of two different runs in one directory, so it is refused (`run_defining_options`).
MAY_CHANGE_ON_RESUME = (
    "output_dir", "save_steps", "resume", "use_cpu", "gradient_checkpointing", "trust_remote_code", "debug",
)  # fmt: skip


def run_defining_options(options: TrainOptions) -> dict[str, Any]:
    """The options that define the run, as recorded in `sarkern-run.json` (model and dataset as absolute paths)."""
    defining = {f.name: getattr(options, f.name) for f in fields(options) if f.name not in MAY_CHANGE_ON_RESUME}
    for name in ("model", "dataset"):
        if defining[name] is not None:
            defining[name] = str(Path(defining[name]).resolve())
    return defining


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


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
                flag, dest=f.name, choices=PLACEHOLDER_PRESETS, default=None,
                help="SAR's placeholder prompt and training recipe: template (default: the chat template with the "
                "question emptied, system messages kept; TRL's reward scaling) or paper (the official code's system "
                "prompt in the real prompts and the placeholder, no std scaling of advantages, 6 generations, SAR "
                "weight 0.2; explicit options win)",
            )  # fmt: skip
        elif f.name == "scale_rewards":
            train.add_argument(
                flag, dest=f.name, choices=SCALE_REWARDS, default=None,
                help="TRL's scaling of GRPO advantages: group (template recipe), batch, or none (paper recipe)",
            )  # fmt: skip
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split("|")[0].strip(), str)
            default = f.default
            if f.name in RECIPES["template"]:
                default = f"{RECIPES['template'][f.name]} (--placeholder paper: {RECIPES['paper'][f.name]})"
            train.add_argument(flag, dest=f.name, type=kind, default=None, help=f"default: {default}")
    return parser


def parse_options(argv: list[str]) -> TrainOptions:
    """Defaults, overridden by the YAML config, overridden by explicit command-line flags."""
    from .validation import check_option_values

    args = _parser().parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        values.update(_read_config(Path(args.config)))
    values.update(
        {k: v for k, v in vars(args).items() if k in {f.name for f in fields(TrainOptions)} and v is not None}
    )
    options = TrainOptions(**values)
    if options.reward not in REWARDS:
        raise SetupError(f"reward must be one of {REWARDS}, got {options.reward!r}")
    if options.placeholder not in PLACEHOLDER_PRESETS:
        raise SetupError(f"placeholder must be one of {PLACEHOLDER_PRESETS}, got {options.placeholder!r}")
    if options.scale_rewards not in SCALE_REWARDS:
        raise SetupError(f"scale_rewards must be one of {SCALE_REWARDS}, got {options.scale_rewards!r}")
    try:
        check_option_values(options)
    except ValueError as err:
        raise SetupError(f"{err}" + (f" (from {args.config} or the command line)" if args.config else "")) from None
    return options


def _read_config(path: Path) -> dict[str, Any]:
    """The options of a YAML config file, each converted to its option's type (or an error naming the key)."""
    import yaml

    from .validation import coerce_option

    if not path.is_file():
        raise SetupError(f"config file {path} not found")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise SetupError(f"config file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        raise SetupError(f"config file {path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(loaded, dict):
        raise SetupError(f"{path} must hold a mapping of option names to values")
    kinds = {f.name: str(f.type) for f in fields(TrainOptions)}
    loaded = {str(k).replace("-", "_"): v for k, v in loaded.items()}
    unknown = sorted(set(loaded) - set(kinds))
    if unknown:
        raise SetupError(f"unknown options in {path}: {', '.join(unknown)}")
    try:
        return {k: coerce_option(k, v, kinds[k]) for k, v in loaded.items()}
    except ValueError as err:
        raise SetupError(f"{path}: {err}") from None


# --------------------------------------------------------------------------------------------------- building blocks


class SetupError(SystemExit):
    """Bad input found before training starts; the message says what and where."""

    def __init__(self, message: str):
        super().__init__(f"sarkern train: error: {message}")


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the run; the message says where a rerun resumes."""


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def load_model_and_tokenizer(path: str | None, *, trust_remote_code: bool = False):
    """The bundled tiny model, or a local Hugging Face model directory (checked before anything heavy runs).

    Python code shipped in the directory (`auto_map` in its config) never runs, and transformers never asks about
    it, unless `trust_remote_code` is True (`--trust-remote-code`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .tiny import TINY_MODEL_DIR

    model_dir = Path(path) if path else Path(TINY_MODEL_DIR)
    if not model_dir.is_dir():
        raise SetupError(f"model directory {model_dir} does not exist or is not a directory")
    load = {"local_files_only": True, "trust_remote_code": bool(trust_remote_code)}
    try:
        AutoConfig.from_pretrained(model_dir, **load)
    except Exception as err:  # noqa: BLE001 - any failure here means the directory is not a usable model
        raise SetupError(f"cannot read a model config in {model_dir}: {_remote_code_hint(err)}") from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, **load)
    except Exception as err:  # noqa: BLE001
        raise SetupError(f"model directory {model_dir} has no usable tokenizer: {_remote_code_hint(err)}") from err
    # transformers may build an empty tokenizer from the config alone; one that cannot encode text is no tokenizer.
    if tokenizer is None or len(tokenizer) <= 1 or not tokenizer.encode("1 + 1 = 2", add_special_tokens=False):
        raise SetupError(f"model directory {model_dir} has no usable tokenizer (no tokenizer files with a vocabulary)")
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **load)
    except Exception as err:  # noqa: BLE001
        raise SetupError(f"cannot load the model weights in {model_dir}: {_remote_code_hint(err)}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _remote_code_hint(err: Exception) -> str:
    message = _one_line(err)
    if "trust_remote_code" in message:
        return (
            "it contains custom Python code, which sarkern does not run unless you pass --trust-remote-code "
            "(read that code first)"
        )
    return message


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


def _paper_dataset(dataset, tokenizer, options: TrainOptions):
    """The dataset's prompts as the official SAR code builds them (`sarkern.tasks.with_paper_prompts`); refused where
    TRL would not tokenize them as the official code does."""
    from .tasks import with_paper_prompts

    if not getattr(tokenizer, "chat_template", None):
        probe = "1 + 1 = 2"
        if tokenizer(probe)["input_ids"] != tokenizer(probe, add_special_tokens=False)["input_ids"]:
            raise SetupError(
                f"--placeholder paper: {options.model} has no chat template, so its prompts are the official code's "
                "plain text, which the official code tokenizes without special tokens; TRL tokenizes plain-text "
                "prompts with the tokenizer's special tokens (this one adds some, e.g. a BOS), so the real prompts "
                "would differ from the paper's: give the model a chat template, or use --placeholder template"
            )
    try:
        return with_paper_prompts(dataset, tokenizer)
    except ValueError as err:
        raise SetupError(f"--placeholder paper: {_one_line(err)}") from None


def build_trainer(options: TrainOptions, callbacks: list | None = None):
    """Check every input, then build the SARGRPOTrainer. Raises SetupError before any training on bad input."""
    import torch

    from .placeholder import PlaceholderError
    from .trainer import SARGRPOConfig, SARGRPOTrainer
    from .validation import check_answers_verifiable, fit_prompts

    dataset = load_dataset_for(options)
    # The config before the model: under DeepSpeed ZeRO-3 with zero3_init_flag, creating it switches on zero.Init,
    # so that transformers loads the policy already partitioned instead of whole on every process.
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
        scale_rewards=options.scale_rewards,
        **({"gradient_checkpointing": True} if options.gradient_checkpointing else {}),
        **sar,
    )
    model, tokenizer = load_model_and_tokenizer(options.model, trust_remote_code=options.trust_remote_code)
    if options.placeholder == "paper":
        dataset = _paper_dataset(dataset, tokenizer, options)
    try:
        if options.dataset is not None:
            check_answers_verifiable(dataset["answer"], text_answers=options.text_answers)
        dataset, dropped = fit_prompts(
            dataset,
            tokenizer,
            max_positions=getattr(model.config, "max_position_embeddings", None),
            max_completion_length=options.max_completion_length,
            drop=options.drop_long_prompts,
            # SAR scores every completion after its placeholder prompt too (not with self_confidence or weight 0)
            placeholder=options.placeholder if options.reward == "sar" and options.sar_weight != 0 else None,
        )
    except ValueError as err:
        raise SetupError(f"{options.dataset or 'synthetic task'}: {err}") from None
    if dropped:
        total = dropped + len(dataset)
        print(f"sarkern train: left out {dropped} of {total} prompts too long for the model", flush=True)
    if len(dataset) < options.prompts_per_step:
        raise SetupError(
            f"the dataset has {len(dataset)} usable rows, fewer than prompts_per_step={options.prompts_per_step}"
        )
    try:
        return SARGRPOTrainer(
            model=model,
            reward_funcs=funcs,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=callbacks or [],
        )
    except PlaceholderError as err:  # bad input (the model's template and the placeholder asked for), not a failure
        raise SetupError(_one_line(err)) from None


# --------------------------------------------------------------------------------------------------- train command


def run_train(options: TrainOptions, extra_callbacks: list | None = None) -> Path:
    """Train in `options.output_dir`, resuming its run from the newest complete checkpoint unless `options.resume`
    is False. A run that already finished is not trained again. Raises SetupError on bad input (before any step)
    and RunInterrupted on Ctrl-C."""
    from transformers.trainer_callback import ProgressCallback

    from .backends import requested_backend
    from .metrics import MetricsCallback, QuietProgressCallback, plot_metrics
    from .rundir import (
        RunDirectory,
        RunDirError,
        changed_options,
        check_writable,
        checkpoint_step,
        newest_checkpoint,
        read_run_record,
    )
    from .sharding import describe_engine

    output_dir = Path(options.output_dir)
    try:
        requested_backend()
        check_writable(output_dir)
        record = read_run_record(output_dir) if options.resume else None
        if record and isinstance(record.get("options"), dict):
            # Runs recorded before --scale-rewards existed trained with TRL's default scaling.
            record["options"].setdefault("scale_rewards", RECIPES["template"]["scale_rewards"])
        changed = changed_options(output_dir, record, run_defining_options(options)) if record else {}
    except (ValueError, RunDirError) as err:
        raise SetupError(str(err)) from None
    if changed:
        raise SetupError(_changed_options_message(output_dir, changed))
    if record and record.get("status") == "finished":
        if os.environ.get("RANK", "0") == "0":  # the launcher's global rank; the trainer does not exist yet
            print(
                f"sarkern train: the run in {output_dir} already finished its {record.get('steps')} steps; its model "
                f"is in {output_dir / 'final'}. Use --no-resume to train a new run there, or another --output-dir",
                flush=True,
            )
        return output_dir
    metrics_path = output_dir / "metrics.jsonl"
    trainer = build_trainer(options, callbacks=[MetricsCallback(metrics_path), *(extra_callbacks or [])])
    accelerator = trainer.accelerator
    try:
        run = RunDirectory.open(
            output_dir, main_process=accelerator.is_main_process, barrier=accelerator.wait_for_everyone
        )
    except RunDirError as err:
        raise SetupError(str(err)) from None
    with run:
        try:
            checkpoint = run.prepare(resume=options.resume, steps=options.steps, options=run_defining_options(options))
        except RunDirError as err:
            raise SetupError(str(err)) from None
        main_process = trainer.accelerator.is_main_process
        say = (lambda text: print(f"sarkern train: {text}", flush=True)) if main_process else (lambda text: None)
        trainer.sarkern_run_id = run.run_id
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(QuietProgressCallback)
        for damage in run.passed_over:  # a damaged newer checkpoint strands nothing: the next intact one is used
            say(f"{damage}; {f'falling back to {checkpoint}' if checkpoint else 'no intact checkpoint is left'}")
        if run.passed_over and checkpoint is None:
            say("starting this run over from step 0")
        where = f"resuming from {checkpoint}" if checkpoint else "starting"
        engine = describe_engine(trainer.accelerator)  # what runs, never silently another engine than asked
        say(f"{where}; {trainer.accelerator.num_processes} process(es) on {trainer.accelerator.device} ({engine})")
        say(options.describe_recipe())
        if options.debug:
            for line in _first_prompt_lines(trainer):
                say(line)
        try:
            if checkpoint is not None and checkpoint_step(checkpoint) >= options.steps:
                trainer._load_from_checkpoint(str(checkpoint))  # stopped after its last step: nothing to train
            else:
                trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        except KeyboardInterrupt:
            for callback in trainer.callback_handler.callbacks:  # end the progress bar's line before the message
                if isinstance(callback, ProgressCallback) and callback.training_bar is not None:
                    callback.training_bar.close()
            resume_from = newest_checkpoint(output_dir, run.run_id)
            step = trainer.state.global_step
            raise RunInterrupted(
                f"interrupted at step {step}; run the same command again to resume from {resume_from}"
                if resume_from
                else f"interrupted at step {step}, before the first checkpoint; running the same command again "
                "starts this run over"
            ) from None
        final = output_dir / "final"
        trainer.save_model(str(final))  # on every process: it saves on the main one
        if main_process:
            trainer.sarkern_model_card_dir = str(final)
            trainer.create_model_card(model_name=output_dir.name)
            plot_metrics(metrics_path, output_dir / "metrics.png")
        run.mark_finished(options.steps)
        say(f"metrics in {metrics_path}, plot in {output_dir / 'metrics.png'}, model in {final}")
    return output_dir


def _first_prompt_lines(trainer) -> list[str]:
    """The first training prompt as TRL tokenizes it for generation and its SAR placeholder, decoded (--debug)."""
    prompt = trainer.train_dataset[0]["prompt"]
    tokenizer = trainer.processing_class
    prompt_ids = trainer._tokenize_prompts([prompt])[0][0]  # TRL's own tokenization of generation prompts
    lines = [f"debug: prompt 1 as generated from: {tokenizer.decode(prompt_ids)!r}"]
    scorer = getattr(trainer, "sar_scorer", None)
    if scorer is not None and scorer.sar_options["use_comparison"]:
        placeholder = scorer.placeholder_prompts.for_prompt(prompt)
        lines.append(f"debug: its SAR placeholder ({trainer.args.sar_placeholder}): {tokenizer.decode(placeholder)!r}")
    return lines


def _changed_options_message(output_dir: Path, changed: dict[str, tuple]) -> str:
    listed = ", ".join(f"{flag(name)} (recorded {old!r}, now {new!r})" for name, (old, new) in sorted(changed.items()))
    may_change = ", ".join(flag(name) for name in MAY_CHANGE_ON_RESUME if name not in ("output_dir", "resume"))
    return (
        f"cannot resume the run in {output_dir} with changed options that define it: {listed}. Rerun with the "
        f"recorded values, or pass --no-resume to start a new run there, or use another --output-dir (a resume "
        f"may change only {may_change})"
    )


def _end_process_group() -> None:
    """Tear down the distributed group (under `accelerate launch`) before the interpreter exits: a gloo group left
    to the exit handlers can abort a process that has finished ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _print_sarkern_log() -> None:
    """sarkern's own log lines (which scoring path SAR takes, and why; notes on reused log-probs) on stdout, as
    `sarkern train: ...` lines like the CLI's own: Python's default shows none below WARNING."""
    log = logging.getLogger("sarkern")
    if not any(getattr(handler, "sarkern_cli", False) for handler in log.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("sarkern train: %(message)s"))
        handler.sarkern_cli = True
        log.addHandler(handler)
    log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """`sarkern train ...`: 0 on success; on failure one line `sarkern train: error: ...` and a non-zero status
    (the traceback only with --debug); 130 after Ctrl-C, with a line saying where a rerun resumes."""
    # transformers renames its gradient-checkpointing API in v6 and TRL still calls the old names: noise for users.
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*gradient_checkpointing.*")
    argv = sys.argv[1:] if argv is None else argv
    _print_sarkern_log()
    debug = "--debug" in argv
    try:
        options = parse_options(argv)
        debug = options.debug  # also when a config file sets it
        run_train(options)
        _end_process_group()
    except SetupError as err:
        if debug:
            raise
        print(err.code, file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt as err:
        if debug:
            raise
        message = str(err) if isinstance(err, RunInterrupted) else "interrupted"
        print(f"sarkern train: {message}", file=sys.stderr, flush=True)
        return 130
    except SystemExit:
        raise  # argparse's own usage errors and --help
    except Exception as err:  # noqa: BLE001 - the user gets one line; --debug shows the traceback
        if debug:
            raise
        print(
            f"sarkern train: error: {type(err).__name__}: {_one_line(err)} (rerun with --debug for the traceback)",
            file=sys.stderr,
            flush=True,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
