"""LM-head weights held by a distributed wrapper, as plain tensors for the ``linear_`` functions.

- A ``torch.distributed.tensor.DTensor`` weight / bias (FSDP2, ``DeviceMesh`` layouts):

  * without ``tp_group``, any ``Shard`` / ``Replicate`` placement is all-gathered with
    ``full_tensor`` (one ``[V, H]`` gather per call; the weight is needed whole). The gradient
    goes back through the gather as a ``Partial("avg")`` gradient: each rank's shard gets the
    mean over the mesh of every rank's gradient, that of the mean of the ranks' losses, as
    FSDP2's reduce-scatter gives every other parameter;
  * with ``tp_group`` (vocabulary-parallel), the DTensor must be ``Shard(0)`` on a 1-D mesh over
    that group: its local rows are this rank's vocabulary shard (``to_local``, no gather), and
    its gradient is its shard's.

  A ``Partial`` placement (unreduced values) cannot be used and raises a ValueError.
- A DeepSpeed ZeRO-3 parameter (``ds_status`` / ``ds_numel`` attributes) must be gathered by the
  caller for the forward and the backward (``deepspeed.zero.GatheredParameters``, or score
  inside the module's forward): a partitioned one raises a ValueError saying so, since a
  gather here would be released before the backward reads it.

``hidden`` must be a plain tensor (a DTensor ``hidden`` raises, naming ``full_tensor`` /
``to_local``). Plain tensors pass through unchanged, and nothing here imports
``torch.distributed.tensor`` unless a DTensor is given.
"""

from __future__ import annotations

import torch


def is_dtensor(value) -> bool:
    """Whether ``value`` is a ``torch.distributed.tensor.DTensor`` (without importing it)."""
    return (
        isinstance(value, torch.Tensor)
        and hasattr(value, "device_mesh")
        and (hasattr(value, "placements"))
    )


def is_zero3_param(value) -> bool:
    """Whether ``value`` is a DeepSpeed ZeRO-3 parameter."""
    return isinstance(value, torch.Tensor) and (
        hasattr(value, "ds_status") or hasattr(value, "ds_numel")
    )


def plain_linear_weights(hidden, weight, bias, tp_group=None):
    """``(weight, bias)`` as plain tensors for the linear kernels (see the module docstring).

    Raises:
        ValueError: naming the argument, for a DTensor ``hidden``, a ``Partial`` DTensor, a
            DTensor that does not match ``tp_group``, or a partitioned ZeRO-3 parameter.
    """
    if is_dtensor(hidden):
        raise ValueError(
            "hidden must be a plain torch.Tensor, got a DTensor: pass hidden.full_tensor() "
            "(or hidden.to_local() when every rank holds the same rows)"
        )
    return _plain("weight", weight, tp_group), _plain("bias", bias, tp_group)


def _plain(name: str, value, tp_group):
    if is_dtensor(value):
        return _from_dtensor(name, value, tp_group)
    if is_zero3_param(value):
        return _from_zero3(name, value)
    return value


def _from_dtensor(name: str, value, tp_group):
    from torch.distributed.tensor import Partial, Shard

    placements = tuple(value.placements)
    if any(isinstance(p, Partial) for p in placements):
        raise ValueError(
            f"{name} is a DTensor with a Partial placement {placements}: reduce it first "
            "(redistribute to Shard / Replicate)"
        )
    if tp_group is None:
        return value.full_tensor(grad_placements=[Partial("avg")] * len(placements))
    mesh = value.device_mesh
    dist = torch.distributed
    same_group = mesh.ndim == 1 and dist.get_process_group_ranks(
        mesh.get_group()
    ) == dist.get_process_group_ranks(tp_group)
    if not (same_group and placements == (Shard(0),)):
        raise ValueError(
            f"{name} is a DTensor with placements {placements} on a {mesh.ndim}-D mesh; with "
            "tp_group it must be Shard(0) on a 1-D mesh over tp_group's ranks (or pass "
            f"{name}.to_local(), this rank's vocabulary rows)"
        )
    return value.to_local()


def _from_zero3(name: str, value):
    status = getattr(value, "ds_status", None)
    numel = getattr(value, "ds_numel", None)
    if getattr(status, "name", None) == "AVAILABLE" and (numel is None or value.numel() == numel):
        return value
    raise ValueError(
        f"{name} is a partitioned DeepSpeed ZeRO-3 parameter (ds_status={status}, "
        f"ds_numel={numel}, local shape {tuple(value.shape)}): gather it for the forward and "
        f"the backward, e.g. `with deepspeed.zero.GatheredParameters([{name}]): ...` around "
        "the loss and its backward, or score inside the module's own forward"
    )
