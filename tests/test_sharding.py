"""SAR scoring inside a distributed engine's parameter gathering (sarkern.sharding): FSDP2 and DeepSpeed ZeRO-3 on
two CPU processes (gloo) give the unsharded scores; a sharded LM head is never read as if it were whole."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from scorer_models import chat_tokenizer, tiny_model

from sarkern import SARScorer
from sarkern.sharding import ShardedParameterError, check_whole_parameters, detect_engine, gathered_call

RUNNER = Path(__file__).with_name("sharded_scoring_run.py")
TWO_PROCESS_TIMEOUT_S = 600  # a hang (mismatched collectives) fails the test instead of blocking the suite


def run_two_processes(engine: str, out: Path) -> list[dict]:
    """The runner on two processes; torchrun's --standalone rendezvous picks a free port."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's CPU accelerator (collectives over gloo)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(RUNNER)]
    done = subprocess.run(
        [*cmd, engine, str(out)], capture_output=True, text=True, timeout=TWO_PROCESS_TIMEOUT_S, env=env
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def assert_scores_match(result: dict) -> None:
    """Sharded and whole scoring compute the same fp32 forward from the same (all-gathered, bit-identical) weights;
    they may still differ in summation order (other buffers, other BLAS paths). `tolerance` bounds one fp32 mean NLL's
    error (scorer_models.fp32_nll_tolerance), so two results differ by at most twice that in log-perplexity, and the
    reward 1 - exp(nll_cond - nll_uncond) by at most (1 - reward) * 4 * tolerance (first order; both terms move)."""
    bound = 2 * result["tolerance"]
    for name in ("sharded", "again"):
        assert result[f"{name}_valid"] == result["whole_valid"]
        for field in ("ppl_cond", "ppl_uncond"):
            for got, want in zip(result[f"{name}_{field}"], result[f"whole_{field}"]):
                assert math.isnan(got) == math.isnan(want)
                if not math.isnan(want):
                    assert abs(math.log(got) - math.log(want)) <= bound, (name, field, got, want)
        for got, want in zip(result[f"{name}_reward"], result["whole_reward"]):
            if not math.isnan(want):
                assert abs(got - want) <= (1 - want) * 2 * bound + 1e-7, (name, got, want)


def check_engine_run(ranks: list[dict], engine: str) -> None:
    for rank in ranks:
        for tie in ("tied", "untied"):
            result = rank[tie]
            assert result["engine"] == engine
            assert result["refused"] is not None and engine.split()[-1] in result["refused"]  # named, not a crash
            assert result["resharded"], "parameters sharded again after scoring"
            assert result["loss_finite"]
            assert_scores_match(result)
    # The two processes scored batches of different sizes (so different numbers of packed passes) without a hang.
    assert len(ranks[0]["tied"]["whole_reward"]) != len(ranks[1]["tied"]["whole_reward"])


def test_fsdp2_scores_equal_unsharded_scores(tmp_path):
    check_engine_run(run_two_processes("fsdp2", tmp_path), "FSDP2")


def test_zero3_scores_equal_unsharded_scores_with_tied_and_untied_embeddings(tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed)")
    check_engine_run(run_two_processes("zero3", tmp_path), "DeepSpeed ZeRO-3")


# --------------------------------------------------------------------------------------------- one process, no engine


def test_a_plain_model_is_scored_as_is():
    model = tiny_model("qwen2")
    scorer = SARScorer(model, chat_tokenizer())
    assert detect_engine(model) == "none"
    direct = scorer.score([[10, 11, 12]], [[13, 14]])
    gathered = gathered_call(model, scorer.score, [[10, 11, 12]], [[13, 14]])
    assert torch.equal(direct.reward, gathered.reward)


def test_a_flat_shard_is_refused_by_name():
    """An FSDP1 flat shard (or any partition) left in place of the LM head's weight: never read as whole."""
    model = tiny_model("qwen2")
    scorer = SARScorer(model, chat_tokenizer())
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().reshape(-1)[: head.weight.numel() // 2].clone())
    with pytest.raises(ShardedParameterError, match=r"flat shard of shape \(1792,\), not \(112, 32\) \(FSDP1"):
        check_whole_parameters(model)
    with pytest.raises(ShardedParameterError, match="gathered_call"):
        scorer.score([[10, 11, 12]], [[13, 14]])


def test_the_accelerators_engine_must_be_the_models():
    """accelerate trains with FSDP2 or ZeRO-3 but the scorer holds an unsharded model: another model than the one
    trained, refused by name."""
    model = tiny_model("qwen2")
    fsdp2 = SimpleNamespace(
        state=SimpleNamespace(distributed_type="DistributedType.FSDP", fsdp_plugin=SimpleNamespace(fsdp_version=2))
    )
    zero3 = SimpleNamespace(
        state=SimpleNamespace(
            distributed_type="DistributedType.DEEPSPEED", deepspeed_plugin=SimpleNamespace(zero_stage=3)
        )
    )
    for accelerator, engine in ((fsdp2, "FSDP2"), (zero3, "DeepSpeed ZeRO-3")):
        with pytest.raises(ShardedParameterError, match=f"accelerate trains with {engine}.*not sharded"):
            gathered_call(model, lambda: None, accelerator=accelerator)
    ddp = SimpleNamespace(state=SimpleNamespace(distributed_type="DistributedType.MULTI_CPU"))
    assert gathered_call(model, lambda: 7, accelerator=ddp) == 7
