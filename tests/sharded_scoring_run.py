"""Run by tests/test_sharding.py under torchrun (two processes, gloo): SAR scores of a tiny test model whose
parameters ENGINE shards (fsdp2: `fully_shard` laid out as accelerate lays it out; zero3: DeepSpeed ZeRO-3 on its CPU
accelerator), with TIE'd or untied embeddings. Each process scores its own batch (of a different size, so that the
processes run different numbers of packed passes) before sharding and after, and writes OUT/rank<N>.json."""

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

engine, tie, out = sys.argv[1], sys.argv[2] == "tied", Path(sys.argv[3])
rank = int(os.environ["RANK"])


def shard_fsdp2(model):
    """fully_shard as accelerate 1.15's fsdp2_prepare_model applies it: each decoder layer, the untied input
    embeddings, a tail unit (final norm and LM head, plus the embeddings when tied) that keeps its parameters after
    forward, then the root."""
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    for layer in model.model.layers:
        fully_shard(layer)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not tie:
        fully_shard(embed)
    fully_shard([model.model.norm, embed, head] if tie else [model.model.norm, head], reshard_after_forward=False)
    fully_shard(model)
    return model


def shard_zero3(model):
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
    }
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    engine_, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine_.module


torch.manual_seed(0)
model = tiny_model("qwen3", tie_word_embeddings=tie)
tokenizer = chat_tokenizer()
generator = torch.Generator().manual_seed(100 + rank)
groups = 2 + 2 * rank  # rank 1 scores twice as many groups, hence more passes
prompts, completions = [], []
for _ in range(groups):
    prompt = random_ids(generator, 5 + int(torch.randint(0, 8, (1,), generator=generator)))
    for _ in range(3):
        prompts.append(prompt)
        completions.append(random_ids(generator, 1 + int(torch.randint(0, 12, (1,), generator=generator))))
completions[1] = []  # an empty completion: NaN, not scored


def score(scorer_model):
    # A small pass budget: several packed passes per call, and a different number on each process.
    scorer = SARScorer(scorer_model, tokenizer, max_tokens_per_pass=48)
    return gathered_call(scorer_model, scorer.score, prompts, completions)


whole = score(model)
tolerance = fp32_nll_tolerance(model, max(len(p) + len(c) for p, c in zip(prompts, completions)))  # before sharding
sharded_model = shard_fsdp2(model) if engine == "fsdp2" else shard_zero3(model)
found = detect_engine(sharded_model)
refused = None
try:  # scoring outside the gathering must be refused by name, never read a shard as whole
    SARScorer(sharded_model, tokenizer).score(prompts[:1], completions[:1])
except ShardedParameterError as err:
    refused = str(err)
sharded = score(sharded_model)
sharded_again = score(sharded_model)  # a second call: the engine's state after the first one is intact

head = sharded_model.get_output_embeddings().weight
if engine == "fsdp2":
    from torch.distributed.tensor import DTensor

    resharded = isinstance(head, DTensor) and all(isinstance(p, DTensor) for p in sharded_model.parameters())
    # ... and the model still trains: a forward and backward through the root after scoring.
    loss = sharded_model(input_ids=torch.tensor([prompts[0]]), labels=torch.tensor([prompts[0]])).loss
    loss.backward()
else:
    resharded = all(p.numel() == 0 for p in sharded_model.parameters())
    loss = sharded_model(input_ids=torch.tensor([prompts[0]]), labels=torch.tensor([prompts[0]])).loss

(out / f"rank{rank}.json").write_text(
    json.dumps(
        {
            "engine": found,
            "refused": refused,
            "resharded": resharded,
            "loss_finite": bool(torch.isfinite(loss)),
            "tolerance": tolerance,
            **{
                f"{name}_{field}": getattr(scores, field).tolist()
                for name, scores in (("whole", whole), ("sharded", sharded), ("again", sharded_again))
                for field in ("reward", "ppl_cond", "ppl_uncond", "valid")
            },
        }
    )
)
dist.barrier()
dist.destroy_process_group()
