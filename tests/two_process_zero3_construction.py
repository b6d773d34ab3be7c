"""Run by tests/test_sharding.py under `accelerate launch` with the shipped ZeRO-3 config (two CPU processes): the
policy is loaded after its SARGRPOConfig, so transformers builds it already partitioned (zero.Init), as TRL users
load large models. Each process builds an SARGRPOTrainer on a policy no path can score (it must be refused at
construction, not at step 1) and then on the bundled model (its head check must run at construction, inside the
engine's parameter gathering). Each process writes what it saw to OUT/rank<N>.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from sarkern.cli import _end_process_group
from sarkern.model_support import UnsupportedModelError
from sarkern.rewards import correctness_reward
from sarkern.scorer import SARScorer
from sarkern.sharding import detect_engine
from sarkern.tasks import synthetic_arithmetic_dataset
from sarkern.tiny import TINY_MODEL_DIR
from sarkern.trainer import SARGRPOConfig, SARGRPOTrainer

out = Path(sys.argv[1])


def make_config() -> SARGRPOConfig:
    """A config per trainer, made before its model is loaded: it is what switches on zero.Init for the load."""
    return SARGRPOConfig(
        output_dir=str(out / "run"), max_steps=1, per_device_train_batch_size=4, num_generations=2,
        max_completion_length=8, logging_steps=1, save_strategy="no", report_to="none", bf16=False, seed=0,
        use_cpu=not torch.cuda.is_available(),
    )  # fmt: skip


tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
dataset = synthetic_arithmetic_dataset(8, seed=0)
checks: list[dict] = []
check_head = SARScorer.check_head


def recorded_check_head(scorer):
    head = scorer.model.get_output_embeddings().weight
    # Inside the engine's gathering the head is whole; outside it a ZeRO-3 placeholder has no elements.
    checks.append({"engine": detect_engine(scorer.model), "head_numel": head.numel()})
    return check_head(scorer)


SARScorer.check_head = recorded_check_head


class ScaledLogits(AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR).__class__):
    """Rescales its logits in its own forward: neither scoring path reproduces it."""

    def forward(self, *args, **kwargs):
        result = super().forward(*args, **kwargs)
        result.logits = result.logits * 3.0
        return result


def build(model, config):
    return SARGRPOTrainer(
        model=model, reward_funcs=[correctness_reward], args=config, train_dataset=dataset, processing_class=tokenizer
    )


config = make_config()
record = {"zero3_init": is_deepspeed_zero3_enabled()}
refused_model = ScaledLogits.from_pretrained(TINY_MODEL_DIR)
record["refused_engine_at_load"] = detect_engine(refused_model)
try:
    build(refused_model, config)
    record["refused"] = None
except UnsupportedModelError as err:
    record["refused"] = str(err)
record["refused_checks"] = list(checks)
checks.clear()
config = make_config()
model = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR)
record["engine_at_load"] = detect_engine(model)
trainer = build(model, config)
record["checks"] = checks
record["rank"] = torch.distributed.get_rank()
record["processes"] = [trainer.accelerator.process_index, trainer.accelerator.num_processes]
record["distributed_type"] = str(trainer.accelerator.distributed_type)
record["head_numel_after"] = model.get_output_embeddings().weight.numel()
record["expected_numel"] = int(torch.Size(model.get_output_embeddings().weight.ds_shape).numel())
(out / f"rank{record['rank']}.json").write_text(json.dumps(record))
_end_process_group()
