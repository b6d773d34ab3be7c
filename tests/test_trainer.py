"""SARGRPOTrainer: a few real GRPO steps with SAR on the bundled tiny model (CPU)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("trl")

from sarkern.capture import CAPTURE_NLL_BOUNDS  # noqa: E402
from sarkern.cli import TrainOptions, build_trainer  # noqa: E402
from sarkern.tiny import TINY_MODEL_DIR  # noqa: E402

SAR_WEIGHT = 0.2


def options(tmp_path, **overrides) -> TrainOptions:
    base = dict(
        model=str(TINY_MODEL_DIR),
        output_dir=str(tmp_path / "run"),
        steps=2,
        num_problems=32,
        prompts_per_step=2,
        num_generations=4,
        max_completion_length=24,
        save_steps=1000,
        sar_weight=SAR_WEIGHT,
    )
    base.update(overrides)
    return TrainOptions(**base)


class Recorder:
    """Wraps the trainer's generation step and scorer to see what went where."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.score_calls: list[dict] = []
        self.rewards_per_func: list[torch.Tensor] = []
        self.advantages: list[torch.Tensor] = []
        score, calculate, generate_and_score = (
            trainer.sar_scorer.score,
            trainer._calculate_rewards,
            trainer._generate_and_score_completions,
        )

        def recorded_score(prompt_ids, completion_ids, *, cond_logprobs=None, **kwargs):
            result = score(prompt_ids, completion_ids, cond_logprobs=cond_logprobs, **kwargs)
            self.score_calls.append(
                {
                    "cond_logprobs": cond_logprobs,
                    "scores": result,
                    "n": len(completion_ids),
                    "prompt_ids": prompt_ids,
                    "completion_ids": completion_ids,
                    "placeholder_ids": kwargs.get("placeholder_ids"),
                }
            )
            return result

        def recorded_calculate(*args, **kwargs):
            out = calculate(*args, **kwargs)
            self.rewards_per_func.append(out.detach().clone())
            return out

        def recorded_generate_and_score(inputs):
            out = generate_and_score(inputs)
            self.advantages.append(out["advantages"].detach().clone())
            return out

        trainer.sar_scorer.score = recorded_score
        trainer._calculate_rewards = recorded_calculate
        trainer._generate_and_score_completions = recorded_generate_and_score


def expected_advantages(rewards_per_func: torch.Tensor, weights: list[float], group: int) -> torch.Tensor:
    """TRL's default (`sum_then_normalize`, `scale_rewards="group"`) advantages, written out."""
    rewards = (rewards_per_func * torch.tensor(weights)).nansum(dim=1).view(-1, group)
    std = rewards.std(dim=1, keepdim=True)
    return ((rewards - rewards.mean(dim=1, keepdim=True)) / (std + 1e-4)).reshape(-1)


def advantage_tolerance(rewards_per_func: torch.Tensor, group: int) -> float:
    """TRL and `expected_advantages` compute the same fp32 advantages, perhaps summing in another order. A group
    mean or std of G rewards is off by at most G u max|r| (u = 2^-24, first order), so (r - mean) / (std + 1e-4)
    is off by at most 2 G u max|r| (1 + max|advantage|) / (std + 1e-4); the weighted reward sum adds its own u."""
    u = 2.0**-24
    rewards = (rewards_per_func * torch.tensor([1.0, SAR_WEIGHT])).nansum(dim=1).view(-1, group)
    biggest = rewards.abs().max().item() + 1.0
    smallest_scale = rewards.std(dim=1).min().item() + 1e-4
    largest_advantage = (group - 1) / group**0.5  # |r - mean| / std never exceeds (G - 1) / sqrt(G)
    return 4 * group * u * biggest * (1 + largest_advantage) / smallest_scale


def test_sar_is_scored_logged_and_enters_the_advantages(tmp_path, caplog):
    """`sarkern train`'s defaults (transformers generation, num_iterations=1): TRL computes no old log-probs, so
    the conditioned half comes from the log-probs captured while sampling; only the placeholder half runs."""
    trainer = build_trainer(options(tmp_path))
    recorder = Recorder(trainer)
    with caplog.at_level("INFO", logger="sarkern.trainer"):
        trainer.train()

    # The first batch also runs a full pass once, to check the captured log-probs against it.
    verify, *reused = recorder.score_calls
    assert verify["cond_logprobs"] is None and len(reused) == 2  # then one scoring per generation batch
    torch.testing.assert_close(
        reused[0]["scores"].ppl_cond.log(), verify["scores"].ppl_cond.log(), atol=CAPTURE_NLL_BOUNDS[torch.float32],
        rtol=0, equal_nan=True,
    )  # fmt: skip
    torch.testing.assert_close(reused[0]["scores"].ppl_uncond, verify["scores"].ppl_uncond, equal_nan=True)
    for call, rewards_per_func in zip(reused, recorder.rewards_per_func):
        assert isinstance(call["cond_logprobs"], list) and len(call["cond_logprobs"]) == call["n"]
        sar_column = rewards_per_func[:, -1]
        torch.testing.assert_close(sar_column, call["scores"].reward.cpu(), equal_nan=True)
        assert torch.isfinite(call["scores"].ppl_uncond).any()
    for rewards_per_func, advantages in zip(recorder.rewards_per_func, recorder.advantages):
        expected = expected_advantages(rewards_per_func, [1.0, SAR_WEIGHT], 4)
        torch.testing.assert_close(advantages.cpu(), expected, atol=advantage_tolerance(rewards_per_func, 4), rtol=0)
        without_sar = expected_advantages(rewards_per_func[:, :1], [1.0], 4)
        assert not torch.allclose(advantages.cpu(), without_sar, atol=1e-3)  # SAR changed them

    logged = [entry for entry in trainer.state.log_history if "reward" in entry]
    assert len(logged) == 2
    for entry in logged:
        for key in ("rewards/sar/mean", "sar/ppl_cond", "sar/ppl_uncond", "sar/seconds", "sar/step_share"):
            assert key in entry and math.isfinite(entry[key]), key
        assert 0.0 < entry["sar/step_share"] < 1.0
        assert entry["sar/cond_reused"] == 1.0
    assert trainer.sar_calls == {"scored": 2, "cond_reused": 2}

    # The scorer's path (issue 20): one log line after the first scoring, and a metric on every logged step.
    path = getattr(trainer.sar_scorer, "scoring_path", "packed")  # a scorer without the attribute packs only
    assert path in ("packed", "universal")
    lines = [r.getMessage() for r in caplog.records if "SAR scoring path" in r.getMessage()]
    assert len(lines) == 1 and f"SAR scoring path: {path} (" in lines[0], lines
    assert all(entry["sar/packed_path"] == {"packed": 1.0, "universal": 0.0}[path] for entry in logged)


def test_old_logprobs_are_reused_when_the_trainer_has_them(tmp_path):
    """With num_iterations=2, TRL computes the old log-probs; SAR takes them and runs only the placeholder half."""
    trainer = build_trainer(options(tmp_path, num_iterations=2, steps=2))
    recorder = Recorder(trainer)
    trainer.train()
    verify, *reused = recorder.score_calls
    assert verify["cond_logprobs"] is None and reused
    for call in reused:
        cond = call["cond_logprobs"]
        assert isinstance(cond, torch.Tensor) and cond.shape[0] == call["n"]
    assert trainer.sar_calls["cond_reused"] == trainer.sar_calls["scored"] >= 1

    # The reused log-probs give the same conditioned perplexities as the fresh packed pass, although TRL's forward
    # left-pads prompts of different lengths and the scorer packs them without padding.
    assert len({len(p) for p in verify["prompt_ids"]}) > 1
    first = reused[0]["scores"]
    torch.testing.assert_close(first.ppl_cond.log(), verify["scores"].ppl_cond.log(), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "overrides",
    [{"beta": 0.04}, {"gradient_checkpointing": True}, {"reward": "self_confidence"}, {"temperature": 0.7}],
    ids=["beta", "grad-checkpointing", "self-confidence", "temperature"],
)
def test_trainer_variants_run(tmp_path, overrides):
    trainer = build_trainer(options(tmp_path, steps=1, **overrides))
    trainer.train()
    assert trainer.state.global_step == 1
    entry = next(e for e in trainer.state.log_history if "reward" in e)
    assert math.isfinite(entry["rewards/sar/mean"])
    if overrides.get("reward") == "self_confidence":
        assert "sar/ppl_uncond" not in entry  # no unconditioned pass at all
    assert trainer.sar_scorer.temperature == trainer.args.temperature


def test_sar_is_not_scored_at_evaluation(tmp_path):
    trainer = build_trainer(options(tmp_path, steps=1))
    trainer.model.eval()
    assert trainer._sar_rewards([[1, 2, 3]]) == [None]


@pytest.mark.parametrize("reward", ["none", "o1_pruner", "efficient_reasoner"])
def test_baselines_without_sar_run_plain_grpo(tmp_path, reward):
    """sar_weight = 0 (correctness alone, or a length-penalty baseline): no scorer, no SAR pass, no SAR metrics."""
    trainer = build_trainer(options(tmp_path, steps=1, reward=reward))
    assert trainer.sar_scorer is None and "sar" not in trainer.reward_func_names
    trainer.train()
    entry = next(e for e in trainer.state.log_history if "reward" in e)
    assert not any(key.startswith("sar/") or key.startswith("rewards/sar") for key in entry)
    if reward != "none":
        assert math.isfinite(entry[f"rewards/{trainer.reward_func_names[1]}/mean"])


def test_truncated_completions_are_rescored_not_reused(tmp_path):
    """With mask_truncated_completions, TRL's old log-probs of truncated completions are zeros: SAR must not reuse
    them, and the conditioned perplexities come from the packed pass instead."""
    trainer = build_trainer(options(tmp_path, num_iterations=2, steps=1, max_completion_length=6))
    trainer.args.mask_truncated_completions = trainer.mask_truncated_completions = True
    recorder = Recorder(trainer)
    trainer.train()
    call = recorder.score_calls[0]
    assert call["cond_logprobs"] is None and len(recorder.score_calls) == 1  # completions of 6 tokens are truncated
    assert (call["scores"].ppl_cond[call["scores"].valid] > 1.0).all()


def tiny_family_dir(tmp_path, family: str):
    """A tiny random model of another family saved next to the bundled model's tokenizer, as `--model` takes it."""
    import shutil

    from scorer_models import tiny_family_model
    from transformers import AutoConfig

    bundled = AutoConfig.from_pretrained(TINY_MODEL_DIR)
    model = tiny_family_model(family, vocab_size=bundled.vocab_size, pad_token_id=0, bos_token_id=None, eos_token_id=3)
    path = tmp_path / family
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(TINY_MODEL_DIR / name, path / name)
    return path


def test_trainer_accepts_every_family_the_scorer_accepts(tmp_path):
    """No allow-list in the trainer or `sarkern train --model`: a Gemma3 model (sliding and global layers, two RoPE
    bases) trains with SAR like the bundled Qwen2."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__).major < 5:
        pytest.skip(
            f"TRL's fused LM head reaches the backbone as `base_model`, which Gemma3ForCausalLM of transformers "
            f"{transformers.__version__} does not name (base_model_prefix 'language_model'): GRPOTrainer fails too"
        )
    trainer = build_trainer(options(tmp_path, model=str(tiny_family_dir(tmp_path, "gemma3")), steps=1))
    assert trainer.sar_scorer.model.config.model_type == "gemma3_text"
    trainer.train()
    entry = next(e for e in trainer.state.log_history if "reward" in e)
    assert math.isfinite(entry["rewards/sar/mean"]) and math.isfinite(entry["sar/ppl_uncond"])


def test_trainer_with_a_peft_lora_policy(tmp_path, monkeypatch):
    """`SARGRPOTrainer(peft_config=...)`: TRL wraps the policy in a PeftModel; SAR scores with the adapters on."""
    peft = pytest.importorskip("peft", reason="peft is an optional dependency")
    from sarkern import trainer as trainer_module

    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    real = trainer_module.SARGRPOTrainer
    monkeypatch.setattr(trainer_module, "SARGRPOTrainer", lambda **kwargs: real(peft_config=lora, **kwargs))
    trainer = build_trainer(options(tmp_path, steps=1, learning_rate=1e-2))
    assert isinstance(trainer.sar_scorer.model, peft.PeftModel)
    recorder = Recorder(trainer)
    trainer.train()
    assert recorder.score_calls and all(torch.isfinite(c["scores"].ppl_uncond).any() for c in recorder.score_calls)
    # After a step the adapters are non-zero and the scorer sees them: its ppl(a|q) equals the PEFT model's own.
    from scorer_models import fp32_nll_tolerance, naive_perplexity

    policy = trainer.sar_scorer.model
    assert any(p.abs().max() > 0 for n, p in policy.named_parameters() if "lora_B" in n)
    call = recorder.score_calls[-1]
    prompt, completion = call["prompt_ids"][0], call["completion_ids"][0]
    scores = trainer.sar_scorer.score([prompt], [completion])
    expected = naive_perplexity(policy, list(prompt), list(completion))
    bound = fp32_nll_tolerance(policy.get_base_model(), len(prompt) + len(completion))
    assert abs(math.log(scores.ppl_cond.item() / expected)) <= bound
