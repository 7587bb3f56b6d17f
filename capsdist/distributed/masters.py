"""The fp32 master weights and Adam state of a DeepSpeed engine, one full tensor per parameter
name, whatever the ZeRO stage and precision: read to save a topology-free copy with every
checkpoint, written to continue from one on another world size, ZeRO stage or precision.

DeepSpeed 0.19 keeps them in one of three places, depending on ds.zero_stage × ds.precision
(found by building each engine: tests/integration/test_precision_zero.py):

    ZeRO 1/2, any precision   DeepSpeedZeroOptimizer: flat fp32 partitions, one per param group
      (bf16 + fp32 grads:     and rank; each parameter has an `_hp_mapping` to its fragment of
       BF16_Optimizer)        them (the safe_get/set_full_* API all-reduces the fragments)
    ZeRO-0, bf16 (or fp16)    FP16_UnfusedOptimizer: one fp32 copy per parameter in
                              `fp32_groups`, paired with the module's in `fp16_groups`
    ZeRO-0, fp32              the client torch Adam itself: the module's parameters are the
                              masters

Reading a ZeRO engine's state is a collective: every rank calls the same functions in the same
order. Adam's moments are `exp_avg` and `exp_avg_sq`; its `step` is one count for all
parameters (the count Adam's bias correction uses, not the training step: DeepSpeed's
FP16_UnfusedOptimizer takes one empty step when it is built).
"""

from __future__ import annotations

import torch

MOMENTS = ("exp_avg", "exp_avg_sq")


def _kind(engine) -> str:
    optimizer = engine.optimizer
    if any(hasattr(p, "_hp_mapping") for p in engine.module.parameters()):
        return "hp_mapped"
    if hasattr(optimizer, "fp32_groups") and hasattr(optimizer, "fp16_groups"):
        return "unfused"
    if isinstance(optimizer, torch.optim.Optimizer):
        return "plain"
    raise NotImplementedError(
        f"capsdist cannot read the master weights of DeepSpeed's {type(optimizer).__name__}: "
        "use ds.zero_stage=1 or 2"
    )


def _inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer that holds Adam's state (wrapped by DeepSpeed's, or not at all)."""
    optimizer = engine.optimizer
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else optimizer.optimizer


def trained_parameters(engine) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, module parameter) of every parameter the optimizer updates, in module order."""
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def _masters_by_module_param(engine) -> dict[int, torch.Tensor]:
    """ZeRO-0 kinds: id(module parameter) → the tensor Adam updates for it."""
    if _kind(engine) == "plain":
        return {id(p): p for _, p in trained_parameters(engine)}
    optimizer = engine.optimizer
    return {
        id(low): high
        for lows, highs in zip(optimizer.fp16_groups, optimizer.fp32_groups, strict=True)
        for low, high in zip(lows, highs, strict=True)
    }


def full_fp32_state(engine) -> dict[str, torch.Tensor]:
    """The whole module's state dict in fp32 on the CPU, parameters from their fp32 masters
    (buffers as the module holds them). A collective under ZeRO."""
    from deepspeed.utils import safe_get_full_fp32_param

    state = {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()}
    kind = _kind(engine)
    masters = {} if kind == "hp_mapped" else _masters_by_module_param(engine)
    for name, param in engine.module.named_parameters(remove_duplicate=False):
        if not param.requires_grad:
            continue
        master = safe_get_full_fp32_param(param) if kind == "hp_mapped" else masters[id(param)]
        state[name] = master.detach().float().cpu()
    return state


def adam_state(engine) -> tuple[dict[str, torch.Tensor], int]:
    """({`exp_avg.NAME` / `exp_avg_sq.NAME`: full fp32 tensor on the CPU}, Adam's step). Before
    the first step there is no state: ({}, 0). A collective under ZeRO."""
    from deepspeed.utils import safe_get_full_optimizer_state

    step = adam_step(engine)
    if step == 0:
        return {}, 0
    kind = _kind(engine)
    inner = _inner_optimizer(engine)
    masters = {} if kind == "hp_mapped" else _masters_by_module_param(engine)
    out = {}
    for name, param in trained_parameters(engine):
        for key in MOMENTS:
            if kind == "hp_mapped":
                value = safe_get_full_optimizer_state(param, key)
            else:
                value = inner.state[masters[id(param)]][key]
            out[f"{key}.{name}"] = value.detach().float().cpu().reshape(param.shape)
    return out, step


def adam_step(engine) -> int:
    """Adam's step count (the same for every parameter); 0 before its first step."""
    steps = {int(s["step"]) for s in _inner_optimizer(engine).state.values() if "step" in s}
    if len(steps) > 1:
        raise RuntimeError(f"Adam's parameters are at different steps {sorted(steps)}")
    return steps.pop() if steps else 0


def set_fp32_weights(engine, weights: dict[str, torch.Tensor]) -> None:
    """Write full fp32 values (name → tensor; parameters and buffers, any subset) into the
    masters and the module's own copies (cast to its dtype), on every rank."""
    from deepspeed.utils import safe_set_full_fp32_param

    kind = _kind(engine)
    masters = {} if kind == "hp_mapped" else _masters_by_module_param(engine)
    params = dict(engine.module.named_parameters(remove_duplicate=False))
    buffers = dict(engine.module.named_buffers())
    with torch.no_grad():
        for name, value in weights.items():
            if name in buffers:
                buffers[name].copy_(value.to(buffers[name].dtype))
                continue
            param = params[name]
            value = value.to(device=param.device, dtype=torch.float32).reshape(param.shape)
            if kind == "hp_mapped":
                safe_set_full_fp32_param(param, value)  # this rank's fragment of the partition
            elif masters.get(id(param)) is not None and masters[id(param)] is not param:
                masters[id(param)].copy_(value)
            param.copy_(value.to(param.dtype))


def set_adam_state(engine, moments: dict[str, torch.Tensor], step: int) -> None:
    """Write Adam's moments (as `adam_state` returns them) and its step count into a freshly
    built engine's optimizer, creating Adam's state where it does not exist yet (torch Adam and
    ZeRO create it lazily, at the first step)."""
    kind = _kind(engine)
    inner = _inner_optimizer(engine)
    if kind == "hp_mapped":
        _set_partitioned_adam_state(engine, inner, moments, step)
        return
    masters = _masters_by_module_param(engine)
    group_of = {id(p): g for g in inner.param_groups for p in g["params"]}
    for name, param in trained_parameters(engine):
        master = masters[id(param)]
        state = inner.state[master]
        _init_adam_state(state, master, group_of[id(master)], step)
        for key in MOMENTS:
            state[key].copy_(moments[f"{key}.{name}"].reshape(master.shape))


def _init_adam_state(state: dict, like: torch.Tensor, group: dict, step: int) -> None:
    """Adam's per-tensor state as torch.optim.Adam's _init_group makes it, at `step`."""
    if "step" not in state:
        on_device = group.get("fused") or group.get("capturable")
        dtype = torch.float32 if on_device or torch.get_default_dtype() != torch.float64 else None
        device = like.device if on_device else "cpu"
        state["step"] = torch.zeros((), dtype=dtype, device=device)
        for key in MOMENTS:
            state[key] = torch.zeros_like(like, memory_format=torch.preserve_format)
    state["step"].fill_(float(step))


def _set_partitioned_adam_state(engine, inner, moments: dict, step: int) -> None:
    """ZeRO 1/2 (and BF16_Optimizer): Adam's state lives on the flat fp32 partitions of
    this rank. Each parameter's `_hp_mapping` says which slice of the parameter (lp fragment)
    sits where in which group's partition (hp fragment): copy those slices."""
    partitions = inner.param_groups
    for group in partitions:
        for flat in group["params"]:
            _init_adam_state(inner.state[flat], flat, group, step)
    for name, param in trained_parameters(engine):
        mapping = param._hp_mapping
        if mapping is None:  # no fragment of this parameter on this rank
            continue
        flat = partitions[mapping.param_group_index]["params"][0]
        # Point the mapping at the state just made, as DeepSpeed does after its first step, so
        # that the state can be read (adam_state) before that step.
        mapping.set_optim_state_fragment(flat, inner.state[flat])
        lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
        for key in MOMENTS:
            full = moments[f"{key}.{name}"].to(flat.device, torch.float32).flatten()
            inner.state[flat][key].narrow(0, hp.start, hp.numel).copy_(
                full.narrow(0, lp.start, lp.numel)
            )
