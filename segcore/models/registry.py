"""The model registry: architectures by name, with their kind, extensible by other packages.

``MODELS`` (``name -> keyword-only builder``) and ``MODEL_KINDS`` (``name -> "semantic" |
"instance"``) are plain dicts; :func:`register_model` adds to both. Other packages plug in
through the entry-point group ``segflow.models`` (:func:`load_entry_points`): each entry point is
named like the architecture and loads either a ``(builder, kind)`` pair or a builder with a
``kind`` attribute. A builder takes keyword arguments, at least ``in_channels`` and
``num_classes`` (background included), and returns an ``nn.Module``: a semantic one maps
``(N, C, H, W)`` float batches to ``(N, num_classes, H, W)`` logits for any ``H`` and ``W``.

A volumetric model declares itself with a ``spatial_dims = 3`` attribute on its builder (read by
:func:`spatial_dims_of`; absent means 2, an image model) and on the module it builds; a semantic
one maps ``(N, C, D, H, W)`` float batches to ``(N, num_classes, D, H, W)`` logits for any ``D``,
``H`` and ``W``. Its checkpoints record ``input_axes="bczyx"``
(:class:`~segcore.models.checkpoint.ModelMeta`).

A builder may carry a ``normalisation`` attribute (:class:`~segcore.normalise.Normalisation`):
the inputs its weights expect, used when a model is imported without one.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from importlib import metadata
from typing import Any, Callable, Iterable

from torch import nn

from segcore.errors import ConfigError

log = logging.getLogger(__name__)

#: Entry-point group through which other packages register architectures.
ENTRY_POINT_GROUP = "segflow.models"
KINDS = ("semantic", "instance")
#: The spatial dimensionalities a model may declare: 2 (images) or 3 (volumes).
SPATIAL_DIMS = (2, 3)

#: name -> keyword-only builder returning an ``nn.Module``.
MODELS: dict[str, Callable[..., nn.Module]] = {}
#: name -> kind of output ("semantic" label maps or "instance" label maps + records).
MODEL_KINDS: dict[str, str] = {}


class LazyBuilder:
    """The builder ``module:name``, imported when first called or asked about (its signature or an
    attribute such as ``spatial_dims`` or ``normalisation``).

    Registering a builder this way keeps its module's imports out of every process that only lists
    the registry or builds another model: segflow's Mask R-CNNs need torchvision, whose import
    (with the ``torch._dynamo`` it pulls in) costs about 1.3 s of CPU in each worker process.
    """

    def __init__(self, target: str) -> None:
        module, _, name = target.partition(":")
        if not module or not name:
            raise ConfigError(f"a lazy builder is named module:name, got {target!r}")
        self.target = target
        self.__module__, self.__name__, self.__qualname__ = module, name, name

    def resolve(self) -> Callable[..., nn.Module]:
        """The builder itself (its module imported). Raises :class:`ConfigError` naming the target
        when the module cannot be imported or lacks the name (never an ``AttributeError``, which
        ``getattr(builder, attr, default)`` would take for a missing attribute)."""
        module, _, name = self.target.partition(":")
        try:
            return getattr(importlib.import_module(module), name)
        except Exception as exc:
            raise ConfigError(f"the model builder {self.target} could not be loaded ({type(exc).__name__}: "
                              f"{exc}); check that the packages it needs are installed") from exc

    def __call__(self, **kwargs: Any) -> nn.Module:
        return self.resolve()(**kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.resolve())

    def __getattr__(self, name: str) -> Any:  # only for what the instance itself lacks
        if name.startswith("__") or name == "target":
            raise AttributeError(name)
        return getattr(self.resolve(), name)

    def __repr__(self) -> str:
        return f"LazyBuilder({self.target!r})"


def register_model(name: str, builder: Callable[..., nn.Module], *, kind: str, replace: bool = False) -> None:
    """Register ``builder`` as architecture ``name`` of ``kind`` (``semantic`` or ``instance``).
    Raises :class:`ConfigError` for a bad kind or a name already taken (unless ``replace``)."""
    if kind not in KINDS:
        raise ConfigError(f"model kind must be one of {KINDS}, got {kind!r} for {name!r}")
    if not callable(builder):
        raise ConfigError(f"the builder of model {name!r} is not callable: {builder!r}")
    if name in MODELS and not replace and MODELS[name] is not builder:
        raise ConfigError(f"model name {name!r} is already registered (by {MODELS[name].__module__}); "
                          "choose another name")
    MODELS[name] = builder
    MODEL_KINDS[name] = kind


def spatial_dims_of(arch: str) -> int:
    """2 for an image model, 3 for a volumetric one: the ``spatial_dims`` attribute of the builder
    registered as ``arch`` (absent: 2). Raises :class:`ConfigError` for an unknown name or a value
    other than 2 or 3."""
    try:
        builder = MODELS[arch]
    except KeyError:
        raise ConfigError(f"unknown model {arch!r}; valid names: {', '.join(sorted(MODELS))}") from None
    dims = getattr(builder, "spatial_dims", 2)
    if dims not in SPATIAL_DIMS:
        raise ConfigError(f"model {arch!r} declares spatial_dims={dims!r}; a builder's spatial_dims must be 2 or 3")
    return int(dims)


def load_entry_points(entry_points: Iterable[metadata.EntryPoint] | None = None) -> list[str]:
    """Register the architectures of the ``segflow.models`` entry points (default: those of the
    installed distributions); returns the names registered. An entry point that fails to load, or
    gives no usable builder, is skipped with a warning: a broken plugin never breaks segflow."""
    if entry_points is None:
        entry_points = metadata.entry_points(group=ENTRY_POINT_GROUP)
    added = []
    for ep in entry_points:
        try:
            obj = ep.load()
            builder, kind = obj if isinstance(obj, tuple) else (obj, getattr(obj, "kind", "semantic"))
            register_model(ep.name, builder, kind=kind)
        except Exception as exc:  # a plugin's import may fail in any way
            log.warning("segflow.models entry point %r (%s) skipped: %s", ep.name, ep.value, exc)
            continue
        added.append(ep.name)
    return added


#: Exceptions a builder raises for arguments it refuses: reported as :class:`ConfigError` naming the model.
BUILDER_ERRORS = (TypeError, ValueError, KeyError, IndexError, AttributeError, AssertionError, NotImplementedError)


def create_model(arch: str, **kwargs: Any) -> nn.Module:
    """Build the registered architecture ``arch`` with keyword arguments ``kwargs``."""
    try:
        builder = MODELS[arch]
    except KeyError:
        raise ConfigError(f"unknown model {arch!r}; valid names: {', '.join(sorted(MODELS))}") from None
    try:
        return builder(**kwargs)
    except BUILDER_ERRORS as exc:  # what builders raise for arguments they refuse (smp: KeyError, asserts)
        why = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise ConfigError(f"bad arguments for model {arch!r}: {why or type(exc).__name__}") from exc


__all__ = ["ENTRY_POINT_GROUP", "KINDS", "LazyBuilder", "MODELS", "MODEL_KINDS", "SPATIAL_DIMS", "create_model",
           "load_entry_points", "register_model", "spatial_dims_of"]
