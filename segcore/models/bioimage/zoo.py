"""The bioimage.io tooling (``bioimageio.spec``, ``bioimageio.core``), loaded for offline use.

:func:`zoo` imports ``bioimageio.spec`` (an optional dependency: ``pip install 'segflow[bioimageio]'``)
and returns it ready to use offline: its loguru messages are silenced (segflow logs what matters)
and one known incompatibility is repaired (below). Every description is loaded with an explicit
``perform_io_checks``: ``True`` only for packages segflow wrote itself, whose files are all local
(no URL is ever fetched), ``False`` for packages from elsewhere (segflow then checks the sha256 of
each file it uses itself).

Compatibility: bioimageio.spec 0.5.12.0 (the release bioimageio.core 0.11.0 requires) calls
pydantic's serializer handler as ``handler(value, info)``; pydantic-core >= 2.30 takes the second
argument as an index key and fails with "'index_key' is expected to be an integer or a string".
bioimageio.spec 0.5.14 calls ``handler(value)``. :func:`zoo` gives the three affected functions of
0.5.12.x that body (their function objects stay, so the schemas built on them use it).
"""

from __future__ import annotations

import logging
import threading
from types import ModuleType
from typing import Any

from segcore.errors import ConfigError

log = logging.getLogger(__name__)

_lock = threading.Lock()
_ready = False

INSTALL_HINT = "install the bioimage.io extra: pip install -c constraints.txt '.[bioimageio]'"


def _file_descr(value: Any, handler: Any, info: Any) -> Any:  # body of bioimageio.spec 0.5.14
    ret = handler(value)
    ret["source"] = _package(value.source, info, sha256=value.sha256)  # noqa: F821 (the patched module's global)
    return ret


def _weights(value: Any, handler: Any, info: Any) -> Any:  # body of bioimageio.spec 0.5.14
    ctxt = packaging_context_var.get()  # noqa: F821
    if ctxt is not None and ctxt.weights_priority_order is not None:
        for wf in ctxt.weights_priority_order:
            w = getattr(value, wf, None)
            if w is not None:
                break
        else:
            raise ValueError(f"None of the weight formats in `weights_priority_order` ({ctxt.weights_priority_order})"
                             " is present in the given model.")
        new_w = w.model_construct(**{k: v for k, v in w if k != "parent"})
        value = value.model_construct(None, **{wf: new_w})
    return handler(value)


def _inner_node(self: Any, handler: Any, info: Any) -> Any:  # body of bioimageio.spec 0.5.14
    _ = self._inner_node.model_dump(mode=info.mode)
    return handler(self)


def _repair(spec: ModuleType) -> None:
    from bioimageio.spec._internal import io_packaging, validated_string_with_inner_node
    from bioimageio.spec.model import v0_4

    if not spec.__version__.startswith("0.5.12"):
        return
    inner = validated_string_with_inner_node.ValidatedStringWithInnerNode.__dict__["_serialize"]
    for target, body in ((io_packaging.package_file_descr_serializer, _file_descr),
                         (v0_4.package_weights, _weights),
                         (getattr(inner, "wrapped", inner), _inner_node)):
        target.__code__ = body.__code__


def zoo() -> ModuleType:
    """``bioimageio.spec``, imported once, quiet and repaired (see the module docstring)."""
    global _ready
    try:
        import bioimageio.spec as spec
        from loguru import logger
    except ImportError as exc:
        raise ConfigError(f"bioimage.io packages need bioimageio.spec: {INSTALL_HINT}") from exc
    with _lock:
        if not _ready:
            logger.disable("bioimageio")
            _repair(spec)
            _ready = True
    return spec


def zoo_core() -> ModuleType:
    """``bioimageio.core`` (after :func:`zoo`)."""
    zoo()
    try:
        import bioimageio.core as core
    except ImportError as exc:
        raise ConfigError(f"testing a bioimage.io package needs bioimageio.core: {INSTALL_HINT}") from exc
    return core


__all__ = ["INSTALL_HINT", "zoo", "zoo_core"]
