"""Run by tests/test_sharding.py under torchrun (two processes, gloo): SAR scores of tiny test models, with tied
and with untied embeddings, whose parameters ENGINE shards (fsdp2: `fully_shard` laid out as accelerate lays it out;
zero3: DeepSpeed ZeRO-3 on its CPU accelerator). Each process scores its own batch (of a different size, so that the
processes run different numbers of packed passes) before sharding and after; it writes OUT/rank<N>.json."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from scorer_models import chat_tokenizer, fp32_nll_tolerance, random_ids, tiny_model  # noqa: E402

from sarkern import SARScorer  # noqa: E402
from sarkern.sharding import ShardedParameterError, detect_engine, gathered_call  # noqa: E402

engine, out = sys.argv[1], Path(sys.argv[2])
rank = int(os.environ["RANK"])


def shard_fsdp2(model, tie):
    """fully_shard as accelerate 1.15's fsdp2_prepare_model applies it: each decoder layer, the untied input
    embeddings, a tail unit (final norm and LM head, plus the embeddings when tied) that keeps its parameters after
    forward, then the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not tie:
        fully_shard(embed)
    fully_shard([model.model.norm, embed, head] if tie else [model.model.norm, head], reshard_after_forward=False)
    fully_shard(model)
    return model


def shard_zero3(model, tie):
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
    }
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    engine_, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine_.module


def batch() -> tuple[list[list[int]], list[list[int]]]:
    generator = torch.Generator().manual_seed(100 + rank)
    groups = 2 + 2 * rank  # rank 1 scores twice as many groups, hence more packed passes
    prompts, completions = [], []
    for _ in range(groups):
        prompt = random_ids(generator, 5 + int(torch.randint(0, 8, (1,), generator=generator)))
        for _ in range(3):
            prompts.append(prompt)
            completions.append(random_ids(generator, 1 + int(torch.randint(0, 12, (1,), generator=generator))))
    completions[1] = []  # an empty completion: NaN, not scored
    return prompts, completions


def score(scorer_model, prompts, completions):
    # A small pass budget: several packed passes per call, and a different number on each process.
    scorer = SARScorer(scorer_model, tokenizer, max_tokens_per_pass=48)
    return gathered_call(scorer_model, scorer.score, prompts, completions)


def run(tie: bool) -> dict:
    torch.manual_seed(0)
    model = tiny_model("qwen3", tie_word_embeddings=tie)
    prompts, completions = batch()
    whole = score(model, prompts, completions)
    tolerance = fp32_nll_tolerance(model, max(len(p) + len(c) for p, c in zip(prompts, completions)))
    sharded_model = (shard_fsdp2 if engine == "fsdp2" else shard_zero3)(model, tie)
    refused = None
    try:  # scoring outside the gathering is refused by name: a shard is never read as if it were whole
        SARScorer(sharded_model, tokenizer).score(prompts[:1], completions[:1])
    except ShardedParameterError as err:
        refused = str(err)
    # The first call on the sharded model: nothing to score on rank 0, a batch on rank 1. Every process runs the
    # first-call checks (the head check's root forward) alike, so neither waits on a collective the other skips.
    empty_first = score(sharded_model, prompts[:3], [[] for _ in range(3)] if rank == 0 else completions[:3])
    sharded = score(sharded_model, prompts, completions)
    sharded_again = score(sharded_model, prompts, completions)  # the engine's state after the first call is intact
    if engine == "fsdp2":
        from torch.distributed.tensor import DTensor

        resharded = all(isinstance(p, DTensor) for p in sharded_model.parameters())
    else:
        resharded = all(p.numel() == 0 for p in sharded_model.parameters())
    # ... and the model still runs its own forward (and backward) through the engine's hooks.
    ids = torch.tensor([prompts[0]])
    loss = sharded_model(input_ids=ids, labels=ids).loss
    if engine == "fsdp2":
        loss.backward()
    return {
        "engine": detect_engine(sharded_model),
        "refused": refused,
        "resharded": resharded,
        "loss_finite": bool(torch.isfinite(loss)),
        "tolerance": tolerance,
        "empty_first_valid": empty_first.valid.tolist(),
        **{
            f"{name}_{field}": getattr(scores, field).tolist()
            for name, scores in (("whole", whole), ("sharded", sharded), ("again", sharded_again))
            for field in ("reward", "ppl_cond", "ppl_uncond", "valid")
        },
    }


if engine == "zero3":
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
else:
    dist.init_process_group("gloo")
tokenizer = chat_tokenizer()
results = {"tied": run(True), "untied": run(False)}
(out / f"rank{rank}.json").write_text(json.dumps(results))
dist.barrier()
dist.destroy_process_group()
