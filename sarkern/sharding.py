"""Scoring a model whose parameters a distributed engine shards (FSDP2, DeepSpeed ZeRO-3), and running the engine
that was asked for.

:class:`~sarkern.SARScorer` calls the model's backbone directly (not the root module's ``forward``) and reads the
LM head's weight itself. Engines that shard parameters make them whole only around a module's own ``forward``, so
scoring runs inside the engine's parameter gathering, which :func:`gathered_call` provides:

* plain models and DDP: nothing to gather, the call runs as is;
* FSDP2 (``fully_shard``, as accelerate applies it): the call runs as a forward of the root module (FSDP2's
  ``register_fsdp_forward_method``), so the root's pre- and post-forward hooks run around it as around any forward;
  inside, every FSDP2 unit is unsharded with ``FSDPModule.unshard()`` and kept whole for the call, and every unit
  that was sharded on entry is resharded with ``FSDPModule.reshard()`` on exit;
* DeepSpeed ZeRO-3: every parameter is gathered with ``deepspeed.zero.GatheredParameters`` and held for the call
  (ZeRO-3's module hooks then neither fetch nor release any: a released tied embedding would leave the LM head a
  placeholder), and partitioned again on exit;
* FSDP1 (``FullyShardedDataParallel``) and any other parameter sharding (tensor-parallel DTensors) are refused by
  name.

The whole model is gathered once per call rather than layer by layer because each process scores its own batch:
the packed passes it needs differ from process to process, and a per-layer all-gather inside each pass would leave
the processes waiting on different collectives. So scoring needs the unsharded model's memory for the call (as
TRL's generation under ZeRO-3 does by default); memory returns to what the engine holds when the call ends.

:func:`check_whole_parameters` is the guard the scorer runs before every scoring: a sharded LM head (an FSDP2
DTensor, an FSDP1 flat shard, a ZeRO-3 size-0 placeholder) is never read as if it were whole.

:func:`run_requested_engine`: accelerate turns FSDP off on CPU processes and trains as DDP instead; FSDP2 runs on the
CPU over gloo, so it is switched back on as asked, and what cannot be (FSDP1, DeepSpeed dropped) is refused.
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = [
    "ShardedParameterError",
    "check_whole_parameters",
    "describe_engine",
    "detect_engine",
    "gathered_call",
    "refuse_fsdp1",
    "run_requested_engine",
]

T = TypeVar("T")

# The engines `detect_engine` tells apart.
NO_SHARDING, FSDP2, FSDP1, ZERO3, DTENSOR = "none", "FSDP2", "FSDP1", "DeepSpeed ZeRO-3", "DTensor"

# Attribute name of the method `gathered_call` registers as an FSDP2 forward of the root module.
_FSDP2_CALL = "_sarkern_call_as_forward"
# A marker held in a ZeRO-3 parameter's set of active modules so that no module's post-forward hook partitions it.
_ZERO3_HOLD = "sarkern.gathered_call"


class ShardedParameterError(RuntimeError):
    """The scorer was about to read a parameter that a distributed engine shards, or the engine is not supported."""


def _is_dtensor(tensor: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support has no DTensors
        return False
    return isinstance(tensor, DTensor)


def _is_zero3(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id") and hasattr(param, "ds_status")


def _fsdp_classes() -> tuple[type | None, type | None]:
    """(FSDPModule, FullyShardedDataParallel), None where this torch lacks them."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:
        return None, None
    return FSDPModule, FullyShardedDataParallel


def detect_engine(model: nn.Module) -> str:
    """Which engine shards ``model``'s parameters: ``"none"``, ``"FSDP2"``, ``"FSDP1"``, ``"DeepSpeed ZeRO-3"`` or
    ``"DTensor"`` (parameters sharded some other way, e.g. tensor parallelism)."""
    fsdp2, fsdp1 = _fsdp_classes()
    modules = list(model.modules())
    if fsdp2 is not None and any(isinstance(m, fsdp2) for m in modules):
        return FSDP2
    if fsdp1 is not None and any(isinstance(m, fsdp1) for m in modules):
        return FSDP1
    params = list(model.parameters())
    if any(type(p).__name__ == "FlatParameter" for p in params):
        return FSDP1
    if any(_is_zero3(p) for p in params):
        return ZERO3
    if any(_is_dtensor(p) for p in params):
        return DTENSOR
    return NO_SHARDING


def _lm_head(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module):
        raise ShardedParameterError(f"{type(model).__name__} has no output embeddings (LM head) to score with")
    return head


def check_whole_parameters(model: nn.Module) -> None:
    """Raise :class:`ShardedParameterError`, naming the engine, if the LM head's parameters (which the scorer reads
    directly) are not whole: an FSDP2/tensor-parallel DTensor, a ZeRO-3 placeholder that is not gathered, or a
    parameter whose shape is not its module's (an FSDP1 flat shard). Cheap: looks at the LM head only."""
    head = _lm_head(model)
    expected = {}
    if isinstance(head, nn.Linear):
        expected = {"weight": (head.out_features, head.in_features), "bias": (head.out_features,)}
    for name, param in head.named_parameters(recurse=False):
        what = None
        if _is_dtensor(param):
            what = "a sharded DTensor (FSDP2 or tensor parallelism)"
        elif _is_zero3(param) and (param.ds_status.name != "AVAILABLE" or param.numel() == 0):
            what = f"a DeepSpeed ZeRO-3 placeholder of shape {tuple(param.shape)}, not {tuple(param.ds_shape)}"
        elif type(param).__name__ == "FlatParameter" or (name in expected and tuple(param.shape) != expected[name]):
            what = f"a flat shard of shape {tuple(param.shape)}, not {expected.get(name)} (FSDP1 or similar)"
        if what is not None:
            raise ShardedParameterError(
                f"the LM head's {name} of {type(model).__name__} is {what}: scoring would read a shard as if it were "
                "the whole parameter. Score inside the engine's parameter gathering: "
                "sarkern.sharding.gathered_call(model, scorer.score, ...), as SARGRPOTrainer and SelfAlignedReward do"
            )


def _engine_from_accelerator(accelerator: Any) -> str | None:
    """The sharding engine accelerate was configured with, or None (no accelerator, or one that does not shard)."""
    if accelerator is None:
        return None
    state = getattr(accelerator, "state", None)
    kind = str(getattr(state, "distributed_type", "")).rsplit(".", 1)[-1]
    if kind == "FSDP":
        plugin = getattr(state, "fsdp_plugin", None)
        return FSDP2 if getattr(plugin, "fsdp_version", 1) == 2 else FSDP1
    if kind == "DEEPSPEED":
        plugin = getattr(state, "deepspeed_plugin", None)
        return ZERO3 if getattr(plugin, "zero_stage", 0) == 3 else None
    return None


def gathered_call(model: nn.Module, fn: Callable[..., T], *args: Any, accelerator: Any = None, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` run inside the parameter gathering of the engine that shards ``model`` (see the
    module's docstring), e.g. ``gathered_call(model, scorer.score, prompt_ids, completion_ids)``.

    Args:
        model: the model ``fn`` scores with, as the engine left it (for FSDP2 the module ``fully_shard`` was applied
            to; for ZeRO-3 the module inside the DeepSpeed engine).
        accelerator: the ``accelerate.Accelerator`` training ``model``, if any: the engine it was configured with
            must be the one found on the model (otherwise the scorer holds another model than the one trained).

    Raises:
        ShardedParameterError: FSDP1, tensor-parallel DTensors, or a model the accelerator's engine did not shard.
    """
    engine = detect_engine(model)
    configured = _engine_from_accelerator(accelerator)
    if configured is not None and configured != engine:
        raise ShardedParameterError(
            f"accelerate trains with {configured}, but the model given to the scorer "
            f"({type(model).__name__}) is {'not sharded' if engine == NO_SHARDING else 'sharded by ' + engine}: "
            "give the scorer the model instance the trainer prepared"
        )
    if engine == NO_SHARDING:
        return fn(*args, **kwargs)
    if engine == FSDP2:
        return _fsdp2_call(model, fn, args, kwargs)
    if engine == ZERO3:
        return _zero3_call(model, fn, args, kwargs)
    if engine == FSDP1:
        raise ShardedParameterError(
            "SAR scoring does not support FSDP1 (FullyShardedDataParallel): its flat parameters hold no whole LM head "
            "outside the root's forward. Use FSDP2 (accelerate: fsdp_version: 2) or DeepSpeed ZeRO-3"
        )
    raise ShardedParameterError(
        f"{type(model).__name__} holds DTensor parameters that neither FSDP2 nor DeepSpeed manages (tensor "
        "parallelism?); SAR scoring cannot gather them"
    )


# ---------------------------------------------------------------------------------------------------------- FSDP2


def _fsdp2_units(model: nn.Module) -> Iterator[tuple[nn.Module, list[torch.Tensor]]]:
    """Each FSDP2 module in ``model`` with the parameters it manages (its own, not those of nested FSDP2 modules)."""
    fsdp2, _ = _fsdp_classes()

    def own(module: nn.Module) -> Iterator[torch.Tensor]:
        yield from module.parameters(recurse=False)
        for child in module.children():
            if not isinstance(child, fsdp2):
                yield from own(child)

    for module in model.modules():
        if isinstance(module, fsdp2):
            yield module, list(own(module))


def _reshard_after_forward(unit: nn.Module) -> list[Any]:
    """What ``set_reshard_after_forward`` sets on each parameter group of ``unit`` (FSDP2 has no public getter)."""
    try:
        return [group.post_forward_mesh_info for group in unit._get_fsdp_state()._fsdp_param_groups]
    except AttributeError as err:
        raise ShardedParameterError(
            f"torch {torch.__version__}'s FSDP2 internals differ from those sarkern was tested with ({err})"
        ) from None


def _fsdp2_call(model: nn.Module, fn: Callable[..., T], args: tuple, kwargs: dict) -> T:
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    if not isinstance(model, FSDPModule):
        raise ShardedParameterError(
            f"{type(model).__name__} has FSDP2 submodules but fully_shard was not applied to the model itself (as "
            "accelerate does): SAR scoring needs the root FSDP2 module"
        )
    units = list(_fsdp2_units(model))
    sharded_on_entry = [unit for unit, params in units if any(_is_dtensor(p) for p in params)]
    settings = [(unit, _reshard_after_forward(unit)) for unit, _ in units]
    if _FSDP2_CALL not in vars(model):
        # The root's pre-forward hook initialises FSDP2's state (which unit is the root) and gets the streams ready;
        # its post-forward hook completes units whose forward ran only in part (the LM head is read, not called).
        # FSDP2's public way to run them around a method other than forward():
        setattr(model, _FSDP2_CALL, types.MethodType(lambda self, thunk: thunk(), model))
        register_fsdp_forward_method(model, _FSDP2_CALL)
    result: list[T] = []

    def run() -> None:  # no tensors cross the hooks: they would cast them under a mixed-precision policy
        # Every unit whole for the whole call, in the same order on every process: the scoring itself then needs no
        # collective, so processes may run different numbers of packed passes (their batches differ).
        for unit, _ in units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        result.append(fn(*args, **kwargs))

    try:
        getattr(model, _FSDP2_CALL)(run)
    finally:
        for unit, setting in settings:
            for group, mesh_info in zip(unit._get_fsdp_state()._fsdp_param_groups, setting):
                group.post_forward_mesh_info = mesh_info
        for unit in sharded_on_entry:
            unit.reshard()
    return result[0]


# ------------------------------------------------------------------------------------------------ DeepSpeed ZeRO-3


def _zero3_call(model: nn.Module, fn: Callable[..., T], args: tuple, kwargs: dict) -> T:
    import deepspeed

    # Every parameter gathered once and held for the whole call: ZeRO-3's module hooks then find them available and
    # neither fetch nor release any (a released tied embedding would leave the LM head a placeholder), so the scoring
    # needs no collective and processes may run different numbers of packed passes.
    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        for param in params:
            param.ds_active_sub_modules.add(_ZERO3_HOLD)  # ZeRO-3 releases a parameter only when this set is empty
        try:
            return fn(*args, **kwargs)
        finally:
            for param in params:
                param.ds_active_sub_modules.discard(_ZERO3_HOLD)


# ------------------------------------------------------------------------------------ the engine accelerate runs


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def refuse_fsdp1(fsdp_plugin_args: dict | None = None) -> None:
    """Raise :class:`NotImplementedError` if ``accelerate launch`` (its ``FSDP_VERSION``) or ``fsdp_plugin_args`` ask
    for FSDP1: SAR cannot be scored under it (its flat parameters hold no whole LM head). Checked before accelerate
    starts, which on a machine without GPUs fails on FSDP1 with a message that does not name it."""
    if fsdp_plugin_args is not None:
        version = int(fsdp_plugin_args.get("fsdp_version", 1))
    elif _flag("ACCELERATE_USE_FSDP"):
        version = int(os.environ.get("FSDP_VERSION", "1"))  # accelerate's default
    else:
        return
    if version == 1:
        raise NotImplementedError(
            f"SAR scoring does not support {FSDP1} (FullyShardedDataParallel): its flat parameters hold no whole LM "
            "head to score with. Use FSDP2 (accelerate: --fsdp_version 2, or examples/accelerate/fsdp2.yaml)"
        )


def describe_engine(accelerator: Any) -> str:
    """The engine ``accelerator`` trains with, in words: "DDP", "FSDP2", "DeepSpeed ZeRO-3", "one process"."""
    state = accelerator.state
    kind = str(state.distributed_type).rsplit(".", 1)[-1]
    if kind == "FSDP":
        return f"FSDP{getattr(state.fsdp_plugin, 'fsdp_version', 1)}"
    if kind == "DEEPSPEED":
        return f"DeepSpeed ZeRO-{getattr(state.deepspeed_plugin, 'zero_stage', '?')}"
    if kind.startswith("MULTI_"):
        return "DDP"
    return "one process" if kind == "NO" else kind


def run_requested_engine(accelerator: Any, fsdp_plugin_args: dict | None = None) -> bool:
    """Make ``accelerator`` run the engine ``accelerate launch`` (or ``fsdp_plugin_args``) asked for, or refuse.

    accelerate enables FSDP and DeepSpeed only on accelerators: on CPU processes it silently trains as DDP over gloo
    (``MULTI_CPU``). FSDP2 itself runs on the CPU (``fully_shard`` over gloo), so a request for it switches the
    accelerator's state to FSDP with that plugin; FSDP1 (torch's needs an accelerator device) and DeepSpeed are
    refused by name. Returns True when it switched the accelerator to FSDP2.

    Raises:
        NotImplementedError: FSDP1 or DeepSpeed asked for where accelerate would silently run DDP instead.
    """
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    on_cpu = state.distributed_type in (DistributedType.MULTI_CPU, DistributedType.NO) and state.device.type == "cpu"
    if not on_cpu:
        return False  # GPUs (and other accelerators): accelerate runs what was asked
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        raise NotImplementedError(
            "DeepSpeed was asked for, but accelerate runs DeepSpeed only on GPUs (or other accelerators): these CPU "
            "processes would silently train as DDP. Launch on GPUs, or use FSDP2 on the CPU "
            "(examples/accelerate/fsdp2.yaml)"
        )
    if fsdp_plugin_args is None and not _flag("ACCELERATE_USE_FSDP"):
        return False
    plugin = FullyShardedDataParallelPlugin(**(fsdp_plugin_args or {}))  # the launcher's FSDP_* settings
    if plugin.fsdp_version != 2:
        raise NotImplementedError(
            f"FSDP{plugin.fsdp_version} was asked for on CPU processes: torch's FSDP1 needs a GPU, and accelerate "
            "would silently train as DDP. Use FSDP2 (fsdp_version: 2, examples/accelerate/fsdp2.yaml)"
        )
    if state.distributed_type == DistributedType.NO:
        raise NotImplementedError(
            "FSDP2 was asked for in a single CPU process: there is nothing to shard across. Launch several processes "
            "(accelerate launch --num_processes 2 ...) or leave FSDP out"
        )
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    # AcceleratorState copies PartialState's fields whenever it is instantiated again: switch both.
    state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
    return True
