"""SARGRPOTrainer measures what the policy sees: the placeholder of each completion, the policy's precision, metrics
over all processes, and loud failures where TRL's internals differ from what the trainer expects."""

from __future__ import annotations

import functools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

import sarkern.scoring_model  # noqa: E402
from sarkern.capture import CAPTURE_NLL_BOUNDS, CaptureMismatchError  # noqa: E402
from sarkern.placeholder import PAPER_SYSTEM_PROMPT  # noqa: E402
from sarkern.rewards import correctness_reward  # noqa: E402
from sarkern.scorer import SelfAlignedReward  # noqa: E402
from sarkern.tasks import synthetic_arithmetic_dataset  # noqa: E402
from sarkern.tiny import TINY_MODEL_DIR  # noqa: E402
from sarkern.trainer import (  # noqa: E402
    SARGRPOConfig,
    SARGRPOTrainer,
    TRLInternalsError,
    check_trl_internals,
)

# A Qwen3-style template: the thinking switch adds an empty think block after the generation prompt.
QWEN3_STYLE_TEMPLATE = (
    "{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
SYSTEM = "be brief."


def qwen3_style_tokenizer():
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    tokenizer.chat_template = QWEN3_STYLE_TEMPLATE
    return tokenizer


def make_trainer(tmp_path, *, tokenizer=None, dataset=None, steps=1, model=None, **config) -> SARGRPOTrainer:
    base = dict(
        output_dir=str(tmp_path / "run"), max_steps=steps, per_device_train_batch_size=4, num_generations=2,
        max_completion_length=16, learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, bf16=False, seed=0, log_completions=False,
    )  # fmt: skip
    base.update(config)
    return SARGRPOTrainer(
        model=model if model is not None else AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR),
        reward_funcs=[correctness_reward],
        args=SARGRPOConfig(**base),
        train_dataset=dataset if dataset is not None else synthetic_arithmetic_dataset(16, seed=0),
        processing_class=tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(TINY_MODEL_DIR),
    )


def record_score_calls(scorer) -> list[dict]:
    calls = []
    score = scorer.score

    def recorded(prompt_ids, completion_ids, **kwargs):
        result = score(prompt_ids, completion_ids, **kwargs)
        calls.append({"prompt_ids": prompt_ids, "completion_ids": completion_ids, "scores": result, **kwargs})
        return result

    scorer.score = recorded
    return calls


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------------------ placeholder


def test_placeholder_keeps_the_system_message_and_chat_template_kwargs(tmp_path):
    tokenizer = qwen3_style_tokenizer()
    trainer = make_trainer(
        tmp_path,
        tokenizer=tokenizer,
        dataset=synthetic_arithmetic_dataset(16, seed=0, system_prompt=SYSTEM),
        chat_template_kwargs={"enable_thinking": False},
    )
    calls = record_score_calls(trainer.sar_scorer)
    generated_from = []  # the prompt ids the policy generated from (after any truncation TRL applies)
    generate_single_turn = trainer._generate_single_turn

    def recorded_generate(prompt_ids, *args, **kwargs):
        generated_from.append([list(p) for p in prompt_ids])
        return generate_single_turn(prompt_ids, *args, **kwargs)

    trainer._generate_single_turn = recorded_generate
    trainer.train()
    assert calls and all([list(p) for p in call["prompt_ids"]] == generated_from[-1] for call in calls)
    scaffold = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"
    generation_prompt = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    expected = encode(tokenizer, scaffold + "<|im_end|>\n" + generation_prompt)
    for call in calls:
        assert call["placeholder_ids"] == [expected] * len(call["completion_ids"])
        # ... which is the real prompt the policy saw, with the question's text left out.
        for prompt in call["prompt_ids"]:
            assert list(prompt[: len(encode(tokenizer, scaffold))]) == encode(tokenizer, scaffold)
            assert list(prompt[-len(encode(tokenizer, generation_prompt)) :]) == encode(tokenizer, generation_prompt)

    # SelfAlignedReward takes the same code path: same prompts, same placeholder ids.
    reward = SelfAlignedReward(trainer.sar_scorer.model, tokenizer, chat_template_kwargs={"enable_thinking": False})
    reward_calls = record_score_calls(reward.scorer)
    prompts = list(synthetic_arithmetic_dataset(4, seed=0, system_prompt=SYSTEM)["prompt"])
    reward(prompts, ["x"] * len(prompts), [[5, 3]] * len(prompts))
    assert reward_calls[0]["placeholder_ids"] == [expected] * len(prompts)


def test_paper_placeholder_preset(tmp_path):
    tokenizer = qwen3_style_tokenizer()
    trainer = make_trainer(
        tmp_path,
        tokenizer=tokenizer,
        dataset=synthetic_arithmetic_dataset(16, seed=0, system_prompt=SYSTEM),
        chat_template_kwargs={"enable_thinking": False},
        sar_placeholder="paper",
    )
    calls = record_score_calls(trainer.sar_scorer)
    trainer.train()
    expected = encode(
        tokenizer,
        f"<|im_start|>system\n{PAPER_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n",
    )
    assert calls and all(call["placeholder_ids"] == [expected] * len(call["completion_ids"]) for call in calls)
    with pytest.raises(ValueError, match="either sar_placeholder_ids or sar_placeholder='paper'"):
        SARGRPOConfig(output_dir=str(tmp_path), use_cpu=True, sar_placeholder="paper", sar_placeholder_ids=[1, 2])
    with pytest.raises(ValueError, match="placeholder preset must be one of"):
        SARGRPOConfig(output_dir=str(tmp_path), use_cpu=True, sar_placeholder="question")


# -------------------------------------------------------------------------------------------------------- precision


def test_bf16_autocast_scoring_matches_the_policy_forward(tmp_path, monkeypatch):
    """fp32 weights, bf16=True (TRL's default): the policy's forward runs under bf16 autocast, and so must both SAR
    halves. With num_iterations=2 TRL computes the old log-probs; reuse is off, so the scorer computes ppl(a|q)
    itself and must agree with TRL's own forward within bf16 rounding."""
    trainer = make_trainer(tmp_path, bf16=True, num_iterations=2, sar_reuse_logprobs=False)
    assert next(trainer.model.parameters()).dtype == torch.float32
    seen = []  # (autocast on, autocast dtype, LM-head input dtype) of every scoring pass
    op = sarkern.scoring_model.sequence_perplexity

    def recorded_op(hidden, weight, *args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), hidden.dtype, weight.dtype))
        return op(hidden, weight, *args, **kwargs)

    monkeypatch.setattr(sarkern.scoring_model, "sequence_perplexity", recorded_op)
    old_logps = []
    sar_rewards = trainer._sar_rewards

    def recorded_rewards(completion_ids):
        old_logps.append(trainer._sar_batch["old_logps"].detach().cpu())
        return sar_rewards(completion_ids)

    trainer._sar_rewards = recorded_rewards
    calls = record_score_calls(trainer.sar_scorer)
    trainer.train()

    assert seen and all(s == (True, torch.bfloat16, torch.bfloat16, torch.bfloat16) for s in seen)
    call = calls[0]
    assert call.get("cond_logprobs") is None  # both halves in the scorer's (bf16) pass
    scores = call["scores"]
    lengths = [len(c) for c in call["completion_ids"]]
    old_nll = torch.stack([-old_logps[0][i, :n].double().mean() for i, n in enumerate(lengths)])
    gap_bf16 = (scores.ppl_cond.double().log() - old_nll).abs().max().item()
    assert gap_bf16 <= CAPTURE_NLL_BOUNDS[torch.bfloat16]

    # The same scorer in fp32 (the old behaviour) is further from the policy's own log-probs.
    monkeypatch.setattr(trainer.sar_scorer, "forward_context", None)
    fp32 = trainer.sar_scorer.score(call["prompt_ids"], call["completion_ids"])
    gap_fp32 = (fp32.ppl_cond.double().log() - old_nll).abs().max().item()
    assert gap_fp32 > CAPTURE_NLL_BOUNDS[torch.bfloat16]  # what the scorer did before it followed the autocast


# ----------------------------------------------------------------------------------------------- TRL's internals


def test_trl_internals_are_checked():
    check_trl_internals()  # the installed TRL is the tested one

    class Changed(GRPOTrainer):
        def _generate_single_turn(self, prompts, sampling_params=None):
            raise AssertionError

    with pytest.raises(TRLInternalsError, match="_generate_single_turn"):
        check_trl_internals(Changed)


def test_version_outside_the_tested_range_warns(monkeypatch):
    import trl

    monkeypatch.setattr(trl, "__version__", "9.0.0")
    with pytest.warns(UserWarning, match="tested with TRL >=1.16.0,<1.17.0, not 9.0.0"):
        check_trl_internals()


def test_a_changed_generate_output_fails_loudly(tmp_path, monkeypatch):
    original = GRPOTrainer._generate
    monkeypatch.setattr(GRPOTrainer, "_generate", lambda self, prompts: original(self, prompts)[:7])
    trainer = make_trainer(tmp_path)
    with pytest.raises(TRLInternalsError, match="returned 7 values, expected 8"):
        trainer.train()


def test_wrong_captured_logprobs_fail_loudly(tmp_path):
    """Captured log-probs that are not ppl(a|q) at the scorer's temperature (here: captured at another temperature,
    as if generation changed how it scales the logits) are caught on the first batch, not reused."""
    trainer = make_trainer(tmp_path)
    trainer.temperature = 0.5  # what the capture uses; the scorer and TRL's generation stay at 1.0
    with pytest.raises(CaptureMismatchError, match="captured log-probs differ from a fresh conditioned pass") as error:
        trainer.train()
    # The causes that were ruled out before reuse are not blamed; what is left is named.
    assert "with plain sampling and no dropout" in str(error.value) and "another temperature" in str(error.value)


def gpt2_style_policy():
    """A tiny random GPT-2 on the bundled tokenizer's vocabulary, with GPT-2's default dropouts of 0.1."""
    from transformers import GPT2Config, GPT2LMHeadModel

    vocab = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR).config.vocab_size
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=vocab, n_positions=256, n_embd=32, n_layer=2, n_head=4, bos_token_id=None, eos_token_id=3,
        pad_token_id=0,
    )  # fmt: skip
    assert config.attn_pdrop == config.resid_pdrop == config.embd_pdrop == 0.1
    return GPT2LMHeadModel(config)


@pytest.mark.parametrize(
    "policy, config",
    [
        ("gpt2", {}),  # nn.Dropout modules
        ("qwen2-attention-dropout", {}),  # a float attribute the attention function reads in training mode
        ("qwen2-attention-dropout", {"num_iterations": 2}),  # TRL's old log-probs, also computed in training mode
    ],
    ids=["gpt2-captured", "qwen2-captured", "qwen2-old-logprobs"],
)
def test_a_policy_with_dropout_trains_on_the_conditioned_pass(tmp_path, caplog, policy, config):
    """TRL generates (and computes old log-probs) in training mode: with dropout those log-probs come from a random
    sub-network. They are not reused; one line says why, and SAR scores both halves with dropout off."""
    if policy == "gpt2":
        model = gpt2_style_policy()
    else:
        model = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR, attention_dropout=0.1)
    trainer = make_trainer(tmp_path, model=model, **config)
    calls = record_score_calls(trainer.sar_scorer)
    with caplog.at_level("WARNING", logger="sarkern.trainer"):
        trainer.train()
    assert trainer.state.global_step == 1 and trainer.sar_calls == {"scored": 1, "cond_reused": 0}
    assert len(calls) == 1 and calls[0].get("cond_logprobs") is None
    notes = [r.getMessage() for r in caplog.records if r.name == "sarkern.trainer"]
    expected = "transformer.drop (p=0.1)" if policy == "gpt2" else "self_attn.attention_dropout=0.1"
    assert len(notes) == 1 and "applies dropout in training mode" in notes[0] and expected in notes[0], notes


def test_a_generate_that_runs_no_logits_processors_trains_on_the_conditioned_pass(tmp_path, caplog):
    """A policy with its own `generate` (here a plain sampling loop) never calls the capture: nothing is reused, one
    line says why, and SAR scores both halves."""
    trainer = make_trainer(tmp_path)
    policy = trainer.model

    def own_sampling_loop(input_ids, attention_mask, generation_config, **kwargs):
        for _ in range(generation_config.max_new_tokens):
            logits = policy(input_ids=input_ids, attention_mask=attention_mask).logits[:, -1].float()
            token = torch.multinomial(torch.softmax(logits / generation_config.temperature, dim=-1), 1)
            input_ids = torch.cat([input_ids, token], dim=1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(token)], dim=1)
        return input_ids

    policy.generate = own_sampling_loop
    calls = record_score_calls(trainer.sar_scorer)
    with caplog.at_level("WARNING", logger="sarkern.trainer"):
        trainer.train()
    assert trainer.sar_calls == {"scored": 1, "cond_reused": 0} and calls[0].get("cond_logprobs") is None
    notes = [r.getMessage() for r in caplog.records if r.name == "sarkern.trainer"]
    assert len(notes) == 1 and "saw no generation step" in notes[0], notes


def test_generation_that_bypasses_the_capture_fails_loudly(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path)
    monkeypatch.setattr(trainer, "_generate_single_turn", functools.partial(GRPOTrainer._generate_single_turn, trainer))
    with pytest.raises(TRLInternalsError, match="no sampling log-probs were captured"):
        trainer.train()


def test_missing_old_logprobs_fail_loudly(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path)
    monkeypatch.setattr(trainer, "_trainer_computes_old_logps", lambda: True)
    with pytest.raises(TRLInternalsError, match="computed no old log-probs"):
        trainer.train()


@pytest.mark.parametrize("name", ["tools", "rollout_func"])
def test_setups_the_scorer_cannot_see_are_refused(tmp_path, name):
    def tool(x: int) -> int:
        """A tool.

        Args:
            x: a number.
        """
        return x

    value = [tool] if name == "tools" else (lambda prompts, trainer: {})
    with pytest.raises(NotImplementedError, match=f"does not support {name}"):
        SARGRPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR),
            reward_funcs=[correctness_reward],
            args=SARGRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none"),
            train_dataset=synthetic_arithmetic_dataset(8, seed=0),
            processing_class=AutoTokenizer.from_pretrained(TINY_MODEL_DIR),
            **{name: value},
        )


# -------------------------------------------------------------------------------------------- metrics, 2 processes

TWO_PROCESS_SCRIPT = Path(__file__).with_name("two_process_sar_run.py")


def test_sar_metrics_are_reduced_over_processes(tmp_path, free_port):
    """Two processes (DDP over gloo on the CPU, see test_cli.py): the logged sar/ppl_cond and sar/ppl_uncond are the
    means over both processes' completions, sar/seconds the slower process's time."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port), str(TWO_PROCESS_SCRIPT), str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    logged = next(e for e in ranks[0]["log_history"] if "sar/ppl_cond" in e)
    for key in ("ppl_cond", "ppl_uncond"):
        values = [v for rank in ranks for v in rank[key]]
        local_means = [sum(rank[key]) / len(rank[key]) for rank in ranks]
        assert local_means[0] != local_means[1]  # so that rank 0's own mean would be wrong
        assert math.isclose(logged[f"sar/{key}"], sum(values) / len(values), rel_tol=1e-6)
    assert math.isclose(logged["sar/seconds"], max(rank["seconds"] for rank in ranks), rel_tol=1e-6)
    assert logged["sar/cond_reused"] == 1.0


# ------------------------------------------------------------------------------------------------------------ plot


def test_metrics_plot_has_a_moving_average_and_sar_panels(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from sarkern.metrics import moving_average, plot_metrics

    assert moving_average([1.0, 3.0, math.nan, 5.0, 7.0], 2) == [1.0, 2.0, 2.0, 4.0, 6.0]
    assert math.isnan(moving_average([math.nan, 1.0], 3)[0])
    keys = ["reward", "rewards/correctness/mean", "completions/mean_length", "rewards/sar/mean", "sar/ppl_cond",
            "sar/ppl_uncond"]  # fmt: skip
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, **{k: float(s % 3) for k in keys}}) + "\n" for s in range(1, 21)))
    figures = []
    savefig = plt.Figure.savefig

    def keep(fig, *args, **kwargs):
        figures.append(fig)
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", keep)
    plot_metrics(path, tmp_path / "metrics.png")
    assert (tmp_path / "metrics.png").stat().st_size > 0
    visible = [ax for ax in figures[0].axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == [
        "reward", "accuracy", "completion length (tokens)", "SAR reward", "ppl(a|q)", "ppl(a) (placeholder)",
    ]  # fmt: skip
    for ax in visible:
        points, average = ax.get_lines()
        assert list(average.get_ydata()) == moving_average([float(s % 3) for s in range(1, 21)], 2)


def test_cli_placeholder_option(tmp_path):
    from sarkern.cli import build_trainer, parse_options

    options = parse_options(["train", "--placeholder", "paper", "--output-dir", str(tmp_path), "--num-problems", "8"])
    trainer = build_trainer(options)
    assert trainer.args.sar_placeholder == "paper"
    assert trainer.sar_scorer.placeholder_ids == trainer.sar_scorer.placeholder_prompts.default
    assert PAPER_SYSTEM_PROMPT in trainer.processing_class.decode(trainer.sar_scorer.placeholder_ids)
    assert parse_options(["train"]).placeholder == "template"
    with pytest.raises(SystemExit):
        parse_options(["train", "--placeholder", "question"])


def test_a_model_no_path_can_score_is_refused_at_construction(tmp_path):
    """A policy that rescales its logits in its own forward: neither scoring path reproduces it, and the trainer
    says so when it is built, not at the first training step."""
    from sarkern.model_support import UnsupportedModelError

    class ScaledLogits(type(AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR))):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3.0
            return out

    model = ScaledLogits.from_pretrained(TINY_MODEL_DIR)
    with pytest.raises(UnsupportedModelError, match="ScaledLogits's logits are not what SARScorer computes"):
        make_trainer(tmp_path, model=model)
