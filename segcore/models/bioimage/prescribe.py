"""What a bioimage.io model description prescribes, in segflow's terms, and back.

- :func:`normalisation_from_inputs`: the input tensor's axes and preprocessing of a description
  (``bioimageio.spec`` v0.5 objects) -> a :class:`~segcore.normalise.Normalisation` in mode
  ``steps`` that computes the same intensities;
- :func:`output_rule_from_outputs`: the output tensor's axes and postprocessing -> an
  :class:`OutputRule` (how class labels follow from the model's output);
- :func:`preprocessing_of`: a segflow normalisation -> the preprocessing list of an rdf.yaml
  (plain dicts), used on export.

What segflow cannot run is refused with :class:`UnsupportedPackage`, naming the operation or axis
and what to do. Supported input layouts: ``batch`` (optional), ``channel`` (optional) and the two
spatial axes ``y``, ``x`` in any order (z, time and index axes are refused).
"""

from __future__ import annotations

from typing import Any, Sequence

from segcore.errors import SegflowError
from segcore.models.outputs import OutputRule
from segcore.normalise import (
    Binarize,
    Clip,
    FixedZeroMeanUnitVariance,
    Normalisation,
    ScaleLinear,
    ScaleRange,
    Sigmoid,
    Step,
    ZeroMeanUnitVariance,
)


class UnsupportedPackage(SegflowError, ValueError):
    """A bioimage.io package that segflow cannot run as described (axes, operations, weights)."""


#: The axis layout segflow feeds a model: batch, channel, y, x.
SEGFLOW_AXES = ("batch", "channel", "y", "x")


def axis_roles(axes: Sequence[Any], *, tensor: str) -> dict[str, str]:
    """Axis id -> role (``batch``, ``channel``, ``y``, ``x``) of a tensor's axes; refuses others."""
    roles: dict[str, str] = {}
    for axis in axes:
        kind, ident = str(axis.type), str(axis.id)
        if kind == "batch":
            roles[ident] = "batch"
        elif kind == "channel":
            roles[ident] = "channel"
        elif kind == "space" and ident in ("y", "x"):
            roles[ident] = ident
        else:
            raise UnsupportedPackage(
                f"tensor {tensor!r} has a {kind} axis {ident!r}; segflow runs 2-D models on (batch, channel, y, x) "
                "tensors only (no z, time or index axes). Use the package with a 3-D/time-aware tool.")
    missing = {"y", "x"} - set(roles.values())
    if missing:
        raise UnsupportedPackage(f"tensor {tensor!r} lacks spatial axis(es) {sorted(missing)}; segflow needs y and x")
    return roles


def _per_channel_axes(axes: Sequence[Any] | None, roles: dict[str, str], *, op: str, tensor: str) -> bool:
    """``True``: statistics per channel (reduced over y, x); ``False``: over channel, y, x jointly."""
    if axes is None:  # "all axes jointly": one image at a time in segflow, as the zoo's tools run a sample
        return False
    reduced = {roles.get(str(a), str(a)) for a in axes}
    if "batch" in reduced:
        raise UnsupportedPackage(f"{op} of tensor {tensor!r} reduces over the batch axis (statistics of a whole "
                                 "batch); segflow computes them per image. Ask the package's authors for per-sample "
                                 "axes, or fixed values (fixed_zero_mean_unit_variance).")
    if reduced == {"y", "x"}:
        return True
    if reduced == {"channel", "y", "x"}:
        return False
    raise UnsupportedPackage(f"{op} of tensor {tensor!r} reduces over axes {sorted(reduced)}; segflow supports "
                             "(y, x) per channel or (channel, y, x) per image")


def _values(value: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),)


def _along_channel(kwargs: Any, roles: dict[str, str], *, op: str, tensor: str) -> None:
    axis = getattr(kwargs, "axis", None)
    if axis is not None and roles.get(str(axis)) != "channel":
        raise UnsupportedPackage(f"{op} of tensor {tensor!r} has values along axis {str(axis)!r}; segflow supports "
                                 "one value or one per channel")


def step_from_descr(descr: Any, roles: dict[str, str], *, tensor: str) -> Step | None:
    """One pre/postprocessing description -> a segflow :data:`~segcore.normalise.Step`
    (``None`` for an operation that changes nothing segflow computes, e.g. ``ensure_dtype`` float32)."""
    op, kw = str(descr.id), getattr(descr, "kwargs", None)
    if op == "scale_range":
        ref = getattr(kw, "reference_tensor", None)
        if ref is not None and str(ref) != tensor:
            raise UnsupportedPackage(f"scale_range of tensor {tensor!r} takes its percentiles from tensor {str(ref)!r}; "
                                     "segflow computes them from the tensor itself")
        return ScaleRange(low=kw.min_percentile, high=kw.max_percentile, eps=kw.eps,
                          per_channel=_per_channel_axes(kw.axes, roles, op=op, tensor=tensor))
    if op == "zero_mean_unit_variance":
        return ZeroMeanUnitVariance(eps=kw.eps, per_channel=_per_channel_axes(kw.axes, roles, op=op, tensor=tensor))
    if op == "fixed_zero_mean_unit_variance":
        _along_channel(kw, roles, op=op, tensor=tensor)
        return FixedZeroMeanUnitVariance(mean=_values(kw.mean), std=_values(kw.std))
    if op == "scale_linear":
        _along_channel(kw, roles, op=op, tensor=tensor)
        return ScaleLinear(gain=_values(kw.gain), offset=_values(kw.offset))
    if op == "clip":
        if getattr(kw, "min_percentile", None) is not None or getattr(kw, "max_percentile", None) is not None:
            raise UnsupportedPackage(f"clip of tensor {tensor!r} uses percentiles; segflow clips at fixed values only")
        return Clip(min=kw.min, max=kw.max)
    if op == "binarize":
        _along_channel(kw, roles, op=op, tensor=tensor)
        return Binarize(threshold=_values(kw.threshold))
    if op == "sigmoid":
        return Sigmoid()
    if op == "ensure_dtype" and str(kw.dtype) == "float32":
        return None
    raise UnsupportedPackage(
        f"operation {op!r} on tensor {tensor!r} is not supported by segflow (supported: scale_range, "
        "zero_mean_unit_variance, fixed_zero_mean_unit_variance, scale_linear, clip, binarize, sigmoid, "
        "ensure_dtype float32); segflow never runs custom code shipped in a package")


def normalisation_from_inputs(inputs: Sequence[Any]) -> tuple[Normalisation, int]:
    """``(normalisation, channels)`` of a description's only input tensor. Raises
    :class:`UnsupportedPackage` for several inputs, unsupported axes or operations."""
    if len(inputs) != 1:
        raise UnsupportedPackage(f"the model takes {len(inputs)} input tensors; segflow feeds one image tensor")
    tensor = inputs[0]
    name = str(tensor.id)
    roles = axis_roles(tensor.axes, tensor=name)
    channels = 1
    for axis in tensor.axes:
        if str(axis.type) == "channel":
            channels = len(axis.channel_names)
    steps = [s for d in tensor.preprocessing if (s := step_from_descr(d, roles, tensor=name)) is not None]
    if not steps:  # raw values as they are: a no-op scale keeps the mode's invariant (non-empty steps)
        steps = [ScaleLinear(gain=(1.0,), offset=(0.0,))]
    return Normalisation(mode="steps", steps=tuple(steps)), channels


def output_rule_from_outputs(outputs: Sequence[Any]) -> tuple[OutputRule, tuple[str, ...]]:
    """``(rule, class_names)`` of a description's only output tensor (see :class:`OutputRule`):
    one channel -> ``threshold`` (postprocessing applied, foreground above 0.5), classes
    ``("background", <channel name>)``; several -> ``argmax``, one class per channel name."""
    if len(outputs) != 1:
        raise UnsupportedPackage(f"the model gives {len(outputs)} output tensors; segflow reads one (N, C, H, W) "
                                 "score tensor")
    tensor = outputs[0]
    name = str(tensor.id)
    roles = axis_roles(tensor.axes, tensor=name)
    channel_names: tuple[str, ...] = ("foreground",)
    for axis in tensor.axes:
        if str(axis.type) == "channel":
            channel_names = tuple(str(c) for c in axis.channel_names)
    steps = tuple(s for d in tensor.postprocessing if (s := step_from_descr(d, roles, tensor=name)) is not None)
    if len(channel_names) == 1:
        return OutputRule(rule="threshold", threshold=0.5, steps=steps), ("background", channel_names[0])
    return OutputRule(rule="argmax", steps=steps), channel_names


def _axis_kwargs(values: tuple[float, ...], key: str) -> dict[str, Any]:
    return {key: values[0]} if len(values) == 1 else {key: list(values), "axis": "channel"}


def descr_of_step(step: Step) -> dict[str, Any]:
    """One segflow step -> its rdf.yaml (format 0.5) entry."""
    if isinstance(step, ScaleRange):
        axes = ["y", "x"] if step.per_channel else ["channel", "y", "x"]
        return {"id": "scale_range", "kwargs": {"axes": axes, "min_percentile": step.low,
                                                "max_percentile": step.high, "eps": step.eps}}
    if isinstance(step, ZeroMeanUnitVariance):
        axes = ["y", "x"] if step.per_channel else ["channel", "y", "x"]
        return {"id": "zero_mean_unit_variance", "kwargs": {"axes": axes, "eps": step.eps}}
    if isinstance(step, FixedZeroMeanUnitVariance):
        if len(step.mean) == 1:
            return {"id": "fixed_zero_mean_unit_variance", "kwargs": {"mean": step.mean[0], "std": step.std[0]}}
        return {"id": "fixed_zero_mean_unit_variance",
                "kwargs": {"mean": list(step.mean), "std": list(step.std), "axis": "channel"}}
    if isinstance(step, ScaleLinear):
        gain, offset = step.gain, step.offset
        if len(gain) == 1 and len(offset) == 1:
            return {"id": "scale_linear", "kwargs": {"gain": gain[0], "offset": offset[0]}}
        return {"id": "scale_linear", "kwargs": {"gain": list(gain), "offset": list(offset), "axis": "channel"}}
    if isinstance(step, Clip):
        return {"id": "clip", "kwargs": {k: v for k, v in (("min", step.min), ("max", step.max)) if v is not None}}
    if isinstance(step, Binarize):
        return {"id": "binarize", "kwargs": _axis_kwargs(step.threshold, "threshold")}
    return {"id": "sigmoid"}


def steps_of(norm: Normalisation) -> tuple[Step, ...]:
    """``norm`` as a list of the spec's operations: ``percentile`` -> ``scale_range`` per image and
    channel; ``range`` -> ``scale_linear`` by ``1/scale``; ``window LO,HI`` -> ``clip`` to LO..HI then
    ``scale_linear`` onto 0..1; ``ct`` -> ``clip`` to its fitted bounds; mean/std (``zscore``, ``ct``)
    -> ``fixed_zero_mean_unit_variance`` per channel; a ``steps`` normalisation as it is. The spec
    adds ``eps`` (1e-6) to divisors where segflow's own modes do not: outputs differ by about 1e-6,
    relative. Raises :class:`UnsupportedPackage` for what the spec cannot say (``ct`` clip bounds
    that differ between channels: its ``clip`` takes one bound for all)."""
    if norm.mode == "steps":
        return norm.steps
    first: tuple[Step, ...]
    if norm.mode == "percentile":
        first = (ScaleRange(low=norm.low, high=norm.high, per_channel=True),)
    elif norm.mode == "range":
        first = (ScaleLinear(gain=(1.0 / norm.scale,)),)
    elif norm.mode == "window":
        lo, hi = norm.window
        first = (Clip(min=lo, max=hi), ScaleLinear(gain=(1.0 / (hi - lo),), offset=(-lo / (hi - lo),)))
    elif norm.mode == "ct":
        if not norm.fitted:
            raise UnsupportedPackage("a ct normalisation that has not been fitted cannot be exported")
        if len(set(norm.clip_low)) > 1 or len(set(norm.clip_high)) > 1:
            raise UnsupportedPackage(f"ct clip bounds differ between channels ({norm.clip_low}, {norm.clip_high}); "
                                     "a bioimage.io clip takes one bound for every channel")
        first = (Clip(min=norm.clip_low[0], max=norm.clip_high[0]),)
    else:  # zscore: mean/std alone
        if not norm.fitted:
            raise UnsupportedPackage("a zscore normalisation that has not been fitted cannot be exported")
        first = ()
    if norm.mean is not None and norm.std is not None:
        return (*first, FixedZeroMeanUnitVariance(mean=norm.mean, std=norm.std))
    return first


def preprocessing_of(norm: Normalisation) -> list[dict[str, Any]]:
    """The rdf.yaml preprocessing list that computes ``norm`` (see :func:`steps_of`); a no-op
    ``scale_linear`` (gain 1, offset 0) is left out (the spec forbids it)."""
    out = [descr_of_step(s) for s in steps_of(norm)]
    return [d for d in out if not (d["id"] == "scale_linear" and d["kwargs"] == {"gain": 1.0, "offset": 0.0})]


__all__ = ["OutputRule", "SEGFLOW_AXES", "UnsupportedPackage", "axis_roles", "descr_of_step",
           "normalisation_from_inputs", "output_rule_from_outputs", "preprocessing_of", "step_from_descr",
           "steps_of"]
