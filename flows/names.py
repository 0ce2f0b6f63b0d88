"""Flow run names that say what a run works on, e.g. ``segment heldout.zarr with unet.safetensors``.

Each function is a ``flow_run_name`` callable: Prefect calls it with no arguments once the run
starts, and it reads the run's ``spec`` parameter (a spec object, or its dict when a deployment
passes JSON). Locations are shortened to their last path components; they may be fsspec URLs.
"""

from __future__ import annotations

from typing import Any

from segcore.config import FLOW_RUN, flow_run_token

_GLOB = set("*?[")


def short_location(location: Any, *, parts: int = 1) -> str:
    """The last ``parts`` components of a path or URL (``s3://b/runs/r1`` -> ``r1``); a glob
    pattern is kept whole, as its last component alone says little."""
    text = str(location)
    if _GLOB & set(text):
        return text
    pieces = [p for p in text.rstrip("/").replace("\\", "/").split("/") if p]
    return "/".join(pieces[-parts:]) if pieces else text


def _field(obj: Any, name: str) -> Any:
    """``obj.name`` (or ``obj[name]``), with ``{flow_run}`` filled in as the flow will fill it in."""
    value = obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)
    if isinstance(value, str) and FLOW_RUN in value:
        from prefect.runtime import flow_run

        value = value.replace(FLOW_RUN, flow_run_token(flow_run.scheduled_start_time, flow_run.id))
    return value


def _spec() -> Any:
    from prefect.runtime import flow_run

    return flow_run.parameters.get("spec")


def _named(flow: str, text: str | None) -> str:
    return f"{flow} {text}" if text else f"segflow-{flow}"


def ingest_run_name() -> str:
    """``ingest <images folder> -> <store>``."""
    spec = _spec()
    if spec is None:
        return _named("ingest", None)
    return _named("ingest", f"{short_location(_field(spec, 'images'), parts=2)} -> "
                            f"{short_location(_field(spec, 'store'))}")


def segment_run_name() -> str:
    """``segment <store> with <checkpoint> -> <run directory>``."""
    spec = _spec()
    if spec is None:
        return _named("segment", None)
    return _named("segment", f"{short_location(_field(spec, 'store'))} with "
                             f"{short_location(_field(spec, 'checkpoint'))} -> {short_location(_field(spec, 'out'))}")


def run_run_name() -> str:
    """``run <images folder> with <checkpoint> -> <run directory>`` (ingest + segment)."""
    spec = _spec()
    ingest, segment = _field(spec, "ingest"), _field(spec, "segment")
    if ingest is None or segment is None:
        return _named("run", None)
    return _named("run", f"{short_location(_field(ingest, 'images'), parts=2)} with "
                         f"{short_location(_field(segment, 'checkpoint'))} -> {short_location(_field(segment, 'out'))}")


def train_run_name() -> str:
    """``train <model> on <store> -> <checkpoint>``."""
    spec = _spec()
    if spec is None:
        return _named("train", None)
    return _named("train", f"{_field(spec, 'model')} on {short_location(_field(spec, 'store'))} -> "
                           f"{short_location(_field(spec, 'out'))}")


def demo_run_name() -> str:
    """``demo <model> -> <output directory>``."""
    spec = _spec()
    if spec is None:
        return _named("demo", None)
    return _named("demo", f"{_field(spec, 'model')} -> {short_location(_field(spec, 'out'))}")
