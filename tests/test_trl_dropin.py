"""SARGRPOTrainer as a drop-in for TRL's GRPOTrainer: TRL 1.16's own GRPOTrainer tests (tests/test_grpo_trainer.py of
huggingface/trl) that exercise `args=None`, `reward_funcs`, `reward_processing_classes` and `generation_kwargs`,
run against both trainers.

Ported to run offline and cheaply: the hub models (trl-internal-testing/tiny-*) are the bundled tiny Qwen2 and tiny
random sequence classifiers built from its config (saved to disk, so that they can be passed by path as TRL's tests
pass hub ids), the "zen" dataset is a small in-memory `datasets.Dataset`, training runs one step on the CPU. Where SAR
necessarily differs (its reward column, its processing-class slot), the test says how.
"""

from __future__ import annotations

import functools
import logging

import pytest
import torch
import transformers.training_args

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForSequenceClassification,
    Qwen2ForSequenceClassification,
)
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from sarkern.placeholder import PlaceholderError  # noqa: E402
from sarkern.tiny import TINY_MODEL_DIR  # noqa: E402
from sarkern.trainer import SARGRPOConfig, SARGRPOTrainer  # noqa: E402

POLICY = str(TINY_MODEL_DIR)
PROMPTS = ["1+1=", "2+3=", "4+4=", "5+2=", "3+6=", "7+1="]

TRAINERS = {"trl": (GRPOTrainer, GRPOConfig), "sar": (SARGRPOTrainer, SARGRPOConfig)}


@pytest.fixture(params=list(TRAINERS))
def flavour(request):
    """(trainer class, config class, is SAR): each test runs against TRL's trainer and against SARGRPOTrainer."""
    trainer_class, config_class = TRAINERS[request.param]
    if request.param == "sar":
        # Plain-text prompts and a tokenizer that adds no BOS: the plain-text placeholder (the tokenization of an
        # empty text) would be empty, which SAR refuses; as a user must, the placeholder's ids are given.
        placeholder = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)("=")["input_ids"]
        config_class = functools.partial(SARGRPOConfig, sar_placeholder_ids=placeholder)
    return trainer_class, config_class, request.param == "sar"


@pytest.fixture(scope="module")
def dataset():
    return Dataset.from_dict({"prompt": PROMPTS})


@pytest.fixture(scope="module")
def reward_models(tmp_path_factory):
    """Two tiny random sequence classifiers of different families, saved with the bundled tokenizer: the stand-ins
    of trl-internal-testing/tiny-Qwen2ForSequenceClassification-2.5 and tiny-Qwen3ForSequenceClassification."""
    root = tmp_path_factory.mktemp("reward_models")
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    policy_config = AutoConfig.from_pretrained(TINY_MODEL_DIR)
    torch.manual_seed(0)
    qwen2 = Qwen2ForSequenceClassification(AutoConfig.from_pretrained(TINY_MODEL_DIR, num_labels=1))
    llama = LlamaForSequenceClassification(
        LlamaConfig(
            vocab_size=policy_config.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=0, eos_token_id=3,
            bos_token_id=None,
        )
    )  # fmt: skip
    paths = []
    for name, model in (("qwen2-rm", qwen2), ("llama-rm", llama)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths.append(str(root / name))
    return paths


def config(config_class, tmp_path, **overrides):
    """TRL's test settings (batch 3, 3 generations, 8 completion tokens, lr 0.1), one step on the CPU."""
    base = dict(
        output_dir=str(tmp_path / "run"), learning_rate=0.1, per_device_train_batch_size=3, num_generations=3,
        max_completion_length=8, report_to="none", max_steps=1, use_cpu=True, bf16=False, save_strategy="no",
        logging_steps=1, seed=0,
    )  # fmt: skip
    base.update(overrides)
    return config_class(**base)


def assert_trained(trainer, *, moved=True):
    """TRL's check after `train()`: a loss was logged and (`moved`) every parameter moved."""
    previous = {n: p.clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] is not None
    for name, param in previous.items() if moved else ():
        assert not torch.equal(param, trainer.model.get_parameter(name)), f"Parameter {name} has not changed."


# ------------------------------------------------------------------------------------------------ args, rewards


def test_init_minimal(flavour, dataset, reward_models, tmp_path, monkeypatch):
    """TRL's `test_init_minimal`: model, reward model and dataset only; `args=None` builds a default config named
    after the model (in the working directory). SAR refuses plain-text prompts it has no placeholder for here."""
    trainer_class, config_class, is_sar = flavour
    monkeypatch.chdir(tmp_path)
    # The default config asks for bf16, which TrainingArguments refuses on a machine without a bf16 GPU (this one):
    # let it through, as on the GPU machines TRL's test runs on (the CPU runs bf16 autocast).
    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)
    if is_sar:
        # The default config has no placeholder ids, and these plain-text prompts have no placeholder without them:
        # refused when the trainer is built, not at its first step. Conversational prompts need none.
        with pytest.raises(PlaceholderError, match=r"empty text, which is empty .*sar_placeholder_ids="):
            trainer_class(model=POLICY, reward_funcs=reward_models[0], train_dataset=dataset)
        dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": text}] for text in PROMPTS]})
    trainer = trainer_class(model=POLICY, reward_funcs=reward_models[0], train_dataset=dataset)
    assert type(trainer.args) is getattr(config_class, "func", config_class)
    assert trainer.args.output_dir.endswith(f"{TINY_MODEL_DIR.name}-GRPO")


def test_no_reward_source_raises(flavour, dataset, tmp_path):
    """TRL's `test_no_reward_source_raises`: no `reward_funcs` is refused; SAR alone is no reward source either."""
    trainer_class, config_class, _ = flavour
    with pytest.raises(ValueError, match="No reward source provided"):
        trainer_class(model=POLICY, args=config(config_class, tmp_path), train_dataset=dataset)


def test_mismatched_reward_processing_classes_length(flavour, dataset, reward_models, tmp_path):
    """TRL's test: one processing class for two reward models is refused, counting the caller's reward functions
    (SAR's own slot is not the caller's business)."""
    trainer_class, config_class, _ = flavour
    expected = r"reward processing classes \(1\) must match the number of reward functions \(2\)"
    with pytest.raises(ValueError, match=expected):
        trainer_class(
            model=POLICY,
            reward_funcs=list(reward_models),  # TRL replaces the paths in the list it is given by models
            reward_processing_classes=AutoTokenizer.from_pretrained(reward_models[0]),
            args=config(config_class, tmp_path),
            train_dataset=dataset,
        )


def test_correct_reward_processing_classes_list(flavour, dataset, reward_models, tmp_path):
    """TRL's test: one processing class per reward model is taken as given; SARGRPOTrainer adds None for SAR."""
    trainer_class, config_class, sar = flavour
    classes = [AutoTokenizer.from_pretrained(path) for path in reward_models]
    trainer = trainer_class(
        model=POLICY,
        reward_funcs=list(reward_models),  # TRL replaces the paths in the list it is given by models
        reward_processing_classes=classes,
        args=config(config_class, tmp_path),
        train_dataset=dataset,
    )
    assert trainer.reward_processing_classes[: len(reward_models)] == classes
    assert len(trainer.reward_processing_classes) == len(reward_models) + sar
    if sar:
        assert trainer.reward_processing_classes[-1] is None and trainer.reward_func_names[-1] == "sar"


def test_single_reward_model_with_single_processing_class(flavour, dataset, reward_models, tmp_path):
    trainer_class, config_class, sar = flavour
    single = AutoTokenizer.from_pretrained(reward_models[0])
    trainer = trainer_class(
        model=POLICY,
        reward_funcs=reward_models[0],
        reward_processing_classes=single,
        args=config(config_class, tmp_path),
        train_dataset=dataset,
    )
    assert len(trainer.reward_processing_classes) == 1 + sar
    assert trainer.reward_processing_classes[0] == single


def test_train_different_reward_model(flavour, dataset, reward_models, tmp_path):
    """TRL's test: a reward model with its own tokenizer object, passed as a module; one step trains."""
    trainer_class, config_class, sar = flavour
    reward_model = AutoModelForSequenceClassification.from_pretrained(reward_models[1])
    reward_tokenizer = AutoTokenizer.from_pretrained(reward_models[1])
    trainer = trainer_class(
        model=POLICY,
        reward_funcs=reward_model,
        args=config(config_class, tmp_path),
        train_dataset=dataset,
        reward_processing_classes=reward_tokenizer,
    )
    assert trainer.reward_processing_classes[0] is reward_tokenizer
    assert_trained(trainer)
    if sar:
        assert trainer.sar_calls["scored"] == 1


def test_warning_raised_all_rewards_none(flavour, dataset, tmp_path, caplog):
    """TRL's test: a reward function that always returns None gets TRL's warning, although SAR still scores."""
    trainer_class, config_class, sar = flavour

    def always_none_reward_func(completions, **kwargs):
        return [None] * len(completions)

    trainer = trainer_class(
        model=POLICY, reward_funcs=always_none_reward_func, args=config(config_class, tmp_path), train_dataset=dataset
    )
    with caplog.at_level("WARNING", logger="trl.trainer.grpo_trainer"):
        trainer.train()
    assert "All reward functions returned None for the following kwargs:" in caplog.text
    if sar:
        assert "rewarded by SAR alone" in caplog.text and trainer.sar_calls["scored"] == 1


# ------------------------------------------------------------------------------------------------ generation


def test_train_with_generation_kwargs(flavour, dataset, reward_models, tmp_path, caplog):
    """TRL's test: beam search through `generation_kwargs`. SARGRPOTrainer captures nothing (the beams' rows are not
    the returned completions), says so in one line and scores both halves itself."""
    trainer_class, config_class, sar = flavour
    args = config(
        config_class, tmp_path,
        generation_kwargs={"do_sample": True, "top_k": 50, "num_beams": 2, "length_penalty": -0.1},
    )  # fmt: skip
    trainer = trainer_class(model=POLICY, reward_funcs=reward_models[0], args=args, train_dataset=dataset)
    with caplog.at_level(logging.WARNING, logger="sarkern.trainer"):
        # Beam search returns the same completion for every row of a group of the bundled model: the advantages,
        # hence the updates, are zero here, so TRL's "every parameter moved" cannot be asserted.
        assert_trained(trainer, moved=False)
    if sar:
        assert trainer.sar_calls == {"scored": 1, "cond_reused": 0}
        notes = [r.getMessage() for r in caplog.records if r.name == "sarkern.trainer"]
        assert len(notes) == 1 and "beam_sample" in notes[0] and "own conditioned pass" in notes[0]
