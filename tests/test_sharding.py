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
from scorer_models import chat_tokenizer, fp32_nll_tolerance, tiny_model

from sarkern import SARScorer
from sarkern.sharding import (
    ShardedParameterError,
    check_whole_parameters,
    detect_engine,
    gathered_call,
    refuse_fsdp1,
    run_requested_engine,
)

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
        # Rank 0's first sharded call had nothing to score, rank 1's had a batch: both finished.
    assert ranks[0]["tied"]["empty_first_valid"] == [False] * 3
    assert ranks[1]["tied"]["empty_first_valid"] == [True, False, True]
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


# ------------------------------------------------------------------------------------ training under each engine

TRAIN_RUNNER = Path(__file__).with_name("two_process_sharded_train.py")
CONFIGS = Path(__file__).parents[1] / "examples" / "accelerate"


def launch_two_processes(config: str, runner: Path, out: Path, port: int) -> None:
    """`runner OUT` on two CPU processes under `accelerate launch` with the shipped accelerate config `config`."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
        "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(port), str(runner), str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TWO_PROCESS_TIMEOUT_S, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


@pytest.mark.parametrize(
    ("config", "distributed_type", "engine"),
    [
        ("ddp.yaml", "DistributedType.MULTI_CPU", "none"),
        ("fsdp2.yaml", "DistributedType.FSDP", "FSDP2"),
        ("zero3.yaml", "DistributedType.DEEPSPEED", "DeepSpeed ZeRO-3"),
    ],
    ids=["ddp", "fsdp2", "zero3"],
)
def test_two_training_steps_score_sar_as_a_single_process_would(tmp_path, free_port, config, distributed_type, engine):
    """`sarkern train`'s setup for two GRPO steps under `accelerate launch` with the shipped config, on two CPU
    processes. The engine runs as asked (never DDP in place of another), and every SAR value scored under it equals
    what one process without any engine scores for the same completions with the same weights (the bundled model's
    weights at step 1, the updated ones at step 2), within fp32 rounding."""
    if engine.startswith("DeepSpeed"):
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed)")
    launch_two_processes(config, TRAIN_RUNNER, tmp_path, free_port)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sarkern.capture import CAPTURE_NLL_BOUNDS
    from sarkern.tiny import TINY_MODEL_DIR

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    initial = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR).float().eval()
    weights_by_step: dict[int, dict] = {}
    for rank in (0, 1):
        run = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert (run["distributed_type"], run["engine"], run["num_processes"]) == (distributed_type, engine, 2)
        # `sarkern train` makes its config before loading the policy, so ZeRO-3 loads it already partitioned.
        assert run["engine_at_construction"] == ("DeepSpeed ZeRO-3" if engine.startswith("DeepSpeed") else "none")
        assert sorted({call["step"] for call in run["calls"]}) == [0, 1]
        for index, call in enumerate(run["calls"]):
            weights = torch.load(tmp_path / f"rank{rank}-call{index}.pt")
            seen = weights_by_step.setdefault(call["step"], weights)
            assert all(torch.equal(seen[name], weights[name]) for name in seen)  # both processes, one model
            model = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR).float().eval()
            model.load_state_dict(weights, strict=False)
            assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
            reference = SARScorer(model, tokenizer).score(
                call["prompt_ids"], call["completion_ids"], placeholder_ids=call["placeholder_ids"]
            )
            longest = max(len(p) + len(c) for p, c in zip(call["prompt_ids"], call["completion_ids"]))
            bound = 2 * fp32_nll_tolerance(model, longest)
            # The conditioned half comes from the scorer's pass, or from the log-probs captured while sampling
            # (which the trainer checks against a fresh pass within the capture bound).
            cond_bound = CAPTURE_NLL_BOUNDS[torch.float32] if call["cond_given"] else bound
            assert call["valid"] == reference.valid.tolist()
            for field, field_bound in (("ppl_uncond", bound), ("ppl_cond", cond_bound)):
                got = torch.tensor(call[field]).log()
                want = getattr(reference, field).log()
                torch.testing.assert_close(got, want, atol=field_bound, rtol=0, equal_nan=True)
            # reward = 1 - exp(nll_cond - nll_uncond): first order, (1 - reward) times the two halves' bounds
            want = reference.reward
            scale = float((1 - want[reference.valid]).max())
            torch.testing.assert_close(
                torch.tensor(call["reward"]), want, atol=scale * (bound + cond_bound), rtol=0, equal_nan=True
            )
    # Step 1 scored with the bundled model's weights (bit for bit), step 2 with the weights after one update.
    assert all(torch.equal(p, weights_by_step[0][n]) for n, p in initial.named_parameters())
    assert any(not torch.equal(weights_by_step[0][n], weights_by_step[1][n]) for n in weights_by_step[0])
    logged = [entry for entry in run["log_history"] if "rewards/sar/mean" in entry]
    assert len(logged) == 2 and all(math.isfinite(entry["rewards/sar/mean"]) for entry in logged)


CONSTRUCTION_RUNNER = Path(__file__).with_name("two_process_zero3_construction.py")


def test_zero3_policy_partitioned_at_load_is_checked_at_construction(tmp_path, free_port):
    """A policy loaded after its config under the shipped ZeRO-3 config (zero.Init: every parameter partitioned at
    load, as TRL users load large models), on two CPU processes. The head check runs when the trainer is built, on
    every process, inside the engine's gathering (the LM head whole there, a placeholder again after): a policy no
    path can score is refused at construction on both processes, not at step 1, and the bundled model passes."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed)")
    launch_two_processes("zero3.yaml", CONSTRUCTION_RUNNER, tmp_path, free_port)
    for rank in (0, 1):
        run = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert run["zero3_init"] and run["processes"] == [rank, 2]
        assert run["distributed_type"] == "DistributedType.DEEPSPEED"
        assert run["refused_engine_at_load"] == run["engine_at_load"] == "DeepSpeed ZeRO-3"
        assert "ScaledLogits's logits are not what SARScorer computes" in run["refused"]
        whole = [{"engine": "DeepSpeed ZeRO-3", "head_numel": run["expected_numel"]}]
        assert run["refused_checks"] == run["checks"] == whole  # once each, with the head gathered
        assert run["head_numel_after"] == 0  # partitioned again once the check is done


def cpu_accelerator(distributed_type):
    return SimpleNamespace(state=SimpleNamespace(distributed_type=distributed_type, device=torch.device("cpu")))


@pytest.mark.parametrize(
    ("env", "distributed_type", "refusal"),
    [
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, "MULTI_CPU", "DeepSpeed was asked for.*silently train as DDP"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "MULTI_CPU", "FSDP1 was asked for.*fsdp_version: 2"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "NO", "single CPU process"),
    ],
    ids=["deepspeed-dropped", "fsdp1", "fsdp2-one-process"],
)
def test_an_engine_accelerate_would_drop_on_cpu_is_refused(monkeypatch, env, distributed_type, refusal):
    """accelerate turns FSDP and DeepSpeed off on CPU processes and trains as DDP without a word: what sarkern
    cannot switch back on is refused by name."""
    from accelerate.utils import DistributedType

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(NotImplementedError, match=refusal):
        run_requested_engine(cpu_accelerator(DistributedType[distributed_type]))


def test_nothing_asked_nothing_switched(monkeypatch):
    from accelerate.utils import DistributedType

    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    accelerator = cpu_accelerator(DistributedType.MULTI_CPU)
    assert run_requested_engine(accelerator) is False
    assert accelerator.state.distributed_type == DistributedType.MULTI_CPU
    # On GPUs accelerate runs what was asked: nothing to do.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    gpu = SimpleNamespace(state=SimpleNamespace(distributed_type=DistributedType.FSDP, device=torch.device("cuda")))
    assert run_requested_engine(gpu) is False


def test_fsdp1_is_refused_by_name_before_accelerate_starts(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    refuse_fsdp1(None)  # nothing asked
    refuse_fsdp1({"fsdp_version": 2})
    with pytest.raises(NotImplementedError, match="does not support FSDP1.*fsdp_version 2"):
        refuse_fsdp1({"fsdp_version": 1})
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    refuse_fsdp1(None)
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(NotImplementedError, match="does not support FSDP1"):
        refuse_fsdp1(None)
