"""SAR scoring: sarkern's SARScorer against the paper's way, time and peak memory.

Contenders (each returns per-completion ``(ppl_cond, ppl_uncond)``):

* ``paper``: what the reference implementation does: two separate forwards over padded batches (prompts left-padded,
  completions right-padded; once with the real prompts, once with the placeholder), full ``[B, S, V]`` logits, then
  ``log_softmax`` and ``gather`` over the completion positions and a masked mean;
* ``sarkern``: :class:`sarkern.SARScorer` (``scoring_path="auto"``, which takes the packed path on this Qwen3 model):
  one packed, padding-free forward, each distinct prompt encoded once, one fused ``sequence_perplexity`` call, no
  logits tensor;
* ``sarkern-universal``: the scorer with ``scoring_path="universal"``: right-padded, length-bucketed batches through
  the model's own forward (each prefix recomputed per completion), then the same fused op on the hidden states;
* ``sarkern-uncond``: the scorer given the conditioned log-probs (the trainer's case): only the placeholder half runs;
* ``sarkern-flex``, ``sarkern-sdpa``, ``sarkern-flash`` (CUDA only; flash also needs flash-attn installed):
  ``sarkern`` with its attention backend forced to compiled FlexAttention (one call per layer over a block mask), to
  the per-segment SDPA loop or to flash-attn varlen. ``sarkern`` itself uses ``auto``: flash-attn when installed,
  else flex. On CPU they are not run: there flex needs a compilation per shape bucket and is not the scorer's path.

Every scorer decides its path with :meth:`SARScorer.verify` when the contender is built, so neither the packed path's
probe nor the head check is timed; the path that ran is reported per contender (``scoring_path``).

Run ``python benchmarks/bench_scorer.py`` for a table of times and peak memory as ratios to ``paper`` (written to
``benchmarks/results/scorer_<device>.json``), or ``pytest benchmarks/test_bench_scorer.py --benchmark-only`` for the
pytest-benchmark version. On CPU, peak memory is the peak resident set of a fresh process per contender, counted from
a baseline taken after the model and inputs exist (Linux: the peak is reset through ``/proc/self/clear_refs``); on
CUDA, the caching allocator's peak beyond the same baseline.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import cpu_extra_peak_bytes, cuda_peak_bytes, measure_in_subprocess  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CUDA = torch.cuda.is_available()


@dataclass(frozen=True)
class ScorerShape:
    """A Qwen3-shaped model and a GRPO batch: ``num_prompts`` prompts, ``group`` completions each."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    num_prompts: int
    group: int
    prompt_len: int
    min_completion: int
    max_completion: int
    dtype: str

    @property
    def batch(self) -> int:
        return self.num_prompts * self.group


# CPU: a couple of minutes for the whole comparison on a 2-core machine.
CPU_SHAPE = ScorerShape("cpu-small", 4, 256, 8, 4, 32, 704, 32000, 4, 4, 64, 128, 256, "float32")
# DESIGN.md section 4: N = 96 (G = 6, prompt 256, completion 2048), Qwen3-1.7B-shaped, bf16.
CUDA_SHAPE = ScorerShape("qwen3-1.7b", 28, 2048, 16, 8, 128, 6144, 151936, 16, 6, 256, 2048, 2048, "bfloat16")
SHAPE = CUDA_SHAPE if CUDA else CPU_SHAPE
DEVICE = "cuda" if CUDA else "cpu"


def build_model(shape: ScorerShape, device: str = DEVICE):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=max(4096, shape.prompt_len + shape.max_completion + 64),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(getattr(torch, shape.dtype))
    model.set_attn_implementation("sdpa")
    return model.eval()


def make_batch(shape: ScorerShape, seed: int = 0):
    """Prompts (each repeated ``group`` times, as GRPO does), completions of varied lengths, the placeholder."""
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for _ in range(shape.num_prompts):
        prompt = torch.randint(10, shape.vocab, (shape.prompt_len,), generator=g).tolist()
        prompts += [prompt] * shape.group
    lengths = torch.randint(shape.min_completion, shape.max_completion + 1, (shape.batch,), generator=g).tolist()
    completions = [torch.randint(10, shape.vocab, (n,), generator=g).tolist() for n in lengths]
    placeholder = torch.randint(10, shape.vocab, (12,), generator=g).tolist()
    return prompts, completions, placeholder


def _padded_perplexity(model, prefixes, completions, pad_id: int = 0) -> torch.Tensor:
    """The paper's scoring of one half: padded batch, full logits, log_softmax, gather, masked mean."""
    device = model.device
    p_max, c_max = max(map(len, prefixes)), max(map(len, completions))
    batch = len(completions)
    ids = torch.full((batch, p_max + c_max), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (p, c) in enumerate(zip(prefixes, completions)):
        ids[i, p_max - len(p) : p_max] = torch.tensor(p)
        ids[i, p_max : p_max + len(c)] = torch.tensor(c)
        mask[i, p_max - len(p) : p_max + len(c)] = 1
    ids, mask = ids.to(device), mask.to(device)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits  # [B, S, V]
        logp = torch.log_softmax(logits[:, p_max - 1 : -1].float(), dim=-1)
        token_logp = logp.gather(-1, ids[:, p_max:].unsqueeze(-1)).squeeze(-1)
        completion_mask = mask[:, p_max:].float()
        mean_logp = (token_logp * completion_mask).sum(-1) / completion_mask.sum(-1)
    return torch.exp(-mean_logp)


def _padded_perplexity_batches(model, prefixes, completions, micro_batch: int | None) -> torch.Tensor:
    """``_padded_perplexity`` over micro-batches of ``micro_batch`` completions (None: all at once), as a trainer
    does when the whole batch's ``[B, S, V]`` logits would not fit."""
    step = micro_batch or len(completions)
    parts = [
        _padded_perplexity(model, prefixes[i : i + step], completions[i : i + step])
        for i in range(0, len(completions), step)
    ]
    return torch.cat(parts)


def make_contender(
    name: str, model, prompts, completions, placeholder, *, paper_micro_batch: int | None = None
) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    if name == "paper":

        def run():
            return (
                _padded_perplexity_batches(model, prompts, completions, paper_micro_batch),
                _padded_perplexity_batches(model, [placeholder] * len(completions), completions, paper_micro_batch),
            )

        return run
    from sarkern.scorer import SARScorer

    backend = {"sarkern-flex": "flex", "sarkern-sdpa": "sdpa", "sarkern-flash": "flash"}.get(name, "auto")
    path = "universal" if name == "sarkern-universal" else "auto"
    scorer = SARScorer(model, placeholder_ids=placeholder, attention_backend=backend, scoring_path=path)
    # Decide the path now (head check, and the packed path's probe at rows as long as this batch's longest pass can
    # be), so that the timed and memory-measured calls are scoring calls only.
    scorer.verify(min(scorer.max_tokens_per_pass, _packed_rows_bound(prompts, completions, placeholder)))
    if name in BOTH_HALVES:

        def run():
            scores = scorer.score(prompts, completions)
            run.scoring_path = scores.scoring_path
            return scores.ppl_cond, scores.ppl_uncond

    elif name == "sarkern-uncond":
        # The trainer already has the conditioned per-token log-probs: stand-ins of the right shape here.
        cond_logprobs = [torch.full((len(c),), -2.0) for c in completions]

        def run():
            scores = scorer.score(prompts, completions, cond_logprobs=cond_logprobs)
            run.scoring_path = scores.scoring_path
            return scores.ppl_cond, scores.ppl_uncond

    else:
        raise ValueError(f"unknown contender {name!r}")
    run.scoring_path = scorer.scoring_path
    return run


def _packed_rows_bound(prompts, completions, placeholder) -> int:
    """Rows of one packed pass holding the whole batch: each distinct prefix once, every completion twice."""
    distinct = {tuple(p) for p in prompts}
    return sum(map(len, distinct)) + len(placeholder) + 2 * sum(map(len, completions))


# The scorer with a forced attention backend: compared on CUDA only (see the module docstring).
ATTENTION_CONTENDERS = ("sarkern-flex", "sarkern-sdpa", "sarkern-flash")
# The scorer contenders that score both halves: their perplexities must equal the paper's way's.
BOTH_HALVES = ("sarkern", "sarkern-universal", *ATTENTION_CONTENDERS)


def attention_contender_skip_reason(name: str) -> str | None:
    """Why a forced-backend contender does not run here (None: it runs)."""
    from sarkern.attention import flash_attn_available

    if not CUDA:
        return "attention backends are compared on CUDA only (on CPU flex compiles per shape bucket; SDPA is the path)"
    if name == "sarkern-flash" and not flash_attn_available():
        return "flash-attn is not installed (pip install -e '.[flash]')"
    return None


CONTENDERS = (
    "paper",
    "sarkern",
    "sarkern-universal",
    "sarkern-uncond",
    *(c for c in ATTENTION_CONTENDERS if attention_contender_skip_reason(c) is None),
)


# ----------------------------------------------------------------------------------------------------- memory


def measure_peak_here(name: str) -> dict:
    """Build everything, then run the contender once and report its peak memory beyond that baseline."""
    model = build_model(SHAPE)
    prompts, completions, placeholder = make_batch(SHAPE)
    fn = make_contender(name, model, prompts, completions, placeholder)
    gc.collect()
    peak = cuda_peak_bytes(fn) if CUDA else cpu_extra_peak_bytes(fn)
    return {"contender": name, "extra_peak_bytes": peak}


def measure_peak(name: str) -> dict:
    """The contender's peak memory, measured in a fresh process (its own peak, nobody else's)."""
    return measure_in_subprocess([str(Path(__file__).resolve()), "--memory", name])


# ------------------------------------------------------------------------------------------------------- main


def _load_average() -> float | None:
    """The 1-minute load average (others' work on a shared machine shows here); None where unknown."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"CPU {name}"


def _timed_call(fn: Callable[[], object]) -> float:
    if CUDA:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if CUDA:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """``rounds`` timed calls of each contender (already warmed up), round-robin: round ``r`` of every contender runs
    before round ``r + 1`` of any, so a change in the machine's load (a shared CPU) reaches all contenders alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(_timed_call(fn))
    return times


def check_agreement(results: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Largest relative difference between the scorer's perplexities (both paths, every backend run) and the paper's."""
    paper_c, paper_u = results["paper"]
    worst = 0.0
    for name in BOTH_HALVES:
        if name in results:
            ours_c, ours_u = results[name]
            rel = torch.cat([(ours_c.cpu() / paper_c.cpu() - 1).abs(), (ours_u.cpu() / paper_u.cpu() - 1).abs()])
            worst = max(worst, float(rel.max()))
    return worst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory", metavar="CONTENDER", help="(internal) measure one contender's peak and exit")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / f"scorer_{DEVICE}.json")
    args = parser.parse_args(argv)
    if args.memory:
        print(json.dumps(measure_peak_here(args.memory)))
        return

    model = build_model(SHAPE)
    prompts, completions, placeholder = make_batch(SHAPE)
    outputs, fns, paths = {}, {}, {}
    for name in CONTENDERS:
        fns[name] = make_contender(name, model, prompts, completions, placeholder)
        outputs[name] = fns[name]()  # the warm-up call, untimed (the path was decided when the scorer was built)
        paths[name] = getattr(fns[name], "scoring_path", None)
    load_before = _load_average()
    times = time_interleaved(fns, args.rounds)
    load_after = _load_average()
    del fns
    max_rel_diff = check_agreement(outputs)
    del model
    gc.collect()
    memory = {name: measure_peak(name) for name in CONTENDERS}

    import transformers

    report = {
        "shape": asdict(SHAPE),
        "completion_tokens": sum(map(len, completions)),
        "machine": {
            "device": torch.cuda.get_device_name() if CUDA else _cpu_name(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "load_average_1min_before_after": [load_before, load_after],
        },
        "rounds": args.rounds,
        "timing": "median of the rounds, contenders interleaved round-robin after one untimed call each",
        "max_relative_difference_vs_paper": max_rel_diff,
        "contenders": {
            name: {
                "scoring_path": paths[name],
                "median_s": statistics.median(times[name]),
                "min_s": min(times[name]),
                "times_s": times[name],
                "extra_peak_mib": memory[name]["extra_peak_bytes"] / 2**20,
                "time_ratio_vs_paper": statistics.median(times[name]) / statistics.median(times["paper"]),
                "memory_ratio_vs_paper": memory[name]["extra_peak_bytes"] / max(1, memory["paper"]["extra_peak_bytes"]),
            }
            for name in CONTENDERS
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"shape {SHAPE.name}: {SHAPE.batch} completions ({SHAPE.num_prompts} prompts x {SHAPE.group}), prompt "
        f"{SHAPE.prompt_len}, completions {SHAPE.min_completion}..{SHAPE.max_completion} tokens, {SHAPE.dtype}, "
        f"{report['machine']['device']}, {report['machine']['torch_threads']} threads"
    )
    print(f"max relative difference sarkern vs paper perplexities: {max_rel_diff:.2e}")
    print(f"{'contender':<19}{'path':>10}{'median s':>10}{'min s':>8}{'x paper':>9}{'peak MiB':>11}{'x paper':>9}")
    for name, row in report["contenders"].items():
        print(
            f"{name:<19}{row['scoring_path'] or '-':>10}{row['median_s']:>10.3f}{row['min_s']:>8.3f}"
            f"{row['time_ratio_vs_paper']:>9.3f}{row['extra_peak_mib']:>11.1f}{row['memory_ratio_vs_paper']:>9.3f}"
        )
    print(f"load average (1 min) before/after the timed rounds: {load_before} / {load_after}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
