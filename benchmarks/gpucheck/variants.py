"""Which sarkern configurations section 4 times: one per backend, with and without the input check, and the
primary one again under each kernel candidate (`gpu_candidates()` of `sarkern.kernels.linear_logprobs_tiles`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .report import Run
from .timing import env_vars, sarkern_backend

CANDIDATES_HOOK = "gpu_candidates"


@dataclass(frozen=True)
class Variant:
    """One way of running a sarkern op: under SARKERN_BACKEND=backend, with these keyword arguments, and with these
    environment variables set for the whole call, its backward included (a kernel candidate's)."""

    backend: str
    kwargs: dict = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)


def sarkern_variants(run: Run) -> dict[str, Variant]:
    """contender key -> variant, one per backend, with and without the input check where the ops have
    `check_inputs` (the trainer and scorer validate on the CPU and skip it)."""
    variants = {}
    for backend in run.settings.backends:
        key = "sarkern" if backend == "auto" else f"sarkern[{backend}]"
        variants[key] = Variant(backend)
        if run.data.get("sarkern", {}).get("check_inputs"):
            variants[f"{key}, check_inputs=False"] = Variant(backend, {"check_inputs": False})
    return variants


def refusal(run: Run, key: str, variants: dict[str, Variant]) -> str | None:
    """Why the row `key` is not run here, decided before the section (environment.py): a sarkern backend that cannot
    run (Triton's interpreter with this numpy), or a peer whose requirements the image does not meet."""
    if key in variants:
        return run.data.get("sarkern", {}).get("refused_backends", {}).get(variants[key].backend)
    return run.data.get("peer_requirements", {}).get("rows_lost", {}).get(key)


def primary_sarkern(run: Run) -> str:
    """The sarkern contender the targets are judged on: the first backend not refused here, unchecked where
    possible."""
    variants = sarkern_variants(run)
    refused = run.data.get("sarkern", {}).get("refused_backends", {})
    keys = [k for k, v in variants.items() if v.backend not in refused] or list(variants)
    unchecked = [k for k in keys if "check_inputs=False" in k]
    return unchecked[0] if unchecked else keys[0]


def kernel_candidates(run: Run) -> dict[str, Variant]:
    """The primary sarkern variant again under each kernel candidate: what the next change of a default would be.

    `sarkern.kernels.linear_logprobs_tiles.gpu_candidates()` names them: label -> the environment variables that select
    one (`{"tile 128x64x64 w4 s4": {"SARKERN_FORWARD_BLOCKS": "128,64,64,4,4"}, "pointer loads, no TMA":
    {"SARKERN_TMA": "0"}}`), each timed forward and forward + backward.
    """
    try:
        from sarkern.kernels import linear_logprobs_tiles
    except ImportError:  # no Triton here
        return {}
    candidates = checked_candidates(getattr(linear_logprobs_tiles, CANDIDATES_HOOK)())
    primary = primary_sarkern(run)
    base = sarkern_variants(run)[primary]
    return {
        f"{primary}, {label}": Variant(base.backend, base.kwargs, environment)
        for label, environment in candidates.items()
    }


def checked_candidates(candidates) -> dict[str, dict[str, str]]:
    """`gpu_candidates()`'s result, refused by name unless it is label -> {variable: value}, all strings, each
    label fit for a markdown table cell."""
    where = f"sarkern.kernels.linear_logprobs_tiles.{CANDIDATES_HOOK}()"
    if not isinstance(candidates, dict):
        raise TypeError(f"{where} returned {type(candidates).__name__}: expected dict[str, dict[str, str]]")
    for label, environment in candidates.items():
        if not isinstance(label, str) or not label.strip() or any(c in label for c in "|\n"):
            raise ValueError(f"{where}: label {label!r} is not a one-line, non-empty string without '|'")
        if not isinstance(environment, dict) or not all(
            isinstance(k, str) and k and isinstance(v, str) for k, v in environment.items()
        ):
            raise TypeError(f"{where}[{label!r}] = {environment!r}: expected {{variable name: value}}, all strings")
    return candidates


def sarkern_runner(op: str, variant: Variant, inputs, backward: bool):
    """The timed call of sarkern's `op` (`linear` or `logits`) under `variant`, forward or forward + backward."""
    import contenders

    import sarkern

    def compute(x):
        with sarkern_backend(variant.backend):
            if op == "linear":
                return sarkern.linear_token_logprobs(x.hidden, x.weight, x.targets, **variant.kwargs)
            return sarkern.token_logprobs(x.logits, x.targets, **variant.kwargs)

    fn = contenders.runner(compute, inputs, backward)
    if not variant.environment:
        return fn

    def with_environment():
        with env_vars(variant.environment):
            return fn()

    return with_environment


def forward_plan(variant: Variant, inputs) -> str | None:
    """How sarkern's fused forward launches for `inputs` under `variant` (tiles, operand loads, resident programs,
    vocabulary splits), or None where the Triton kernels do not run it (the torch backend)."""
    from sarkern.backends import select_backend

    with sarkern_backend(variant.backend), env_vars(variant.environment):
        if select_backend(inputs.hidden.device) != "triton":
            return None
        from sarkern.kernels.linear_logprobs import plan_forward

        return plan_forward(inputs.hidden, inputs.weight, None, inputs.targets, return_entropy=False).describe()
