"""The one error hierarchy of segflow.

Every error derives from :class:`SegflowError` and also from the builtin that
matches it, so callers may catch either (``except ValueError`` keeps working).
Messages say what to do next.
"""

from __future__ import annotations


class SegflowError(Exception):
    """Base class of every error segflow raises on purpose."""


class ConfigError(SegflowError, ValueError):
    """A run option or spec is invalid."""


class ImageReadError(SegflowError, OSError):
    """An image or mask file cannot be decoded."""


class CheckpointError(SegflowError, ValueError):
    """A checkpoint is missing, malformed or does not fit its architecture."""


class StoreError(SegflowError, ValueError):
    """A collection store or run directory is missing or inconsistent."""


class LakeError(SegflowError, ValueError):
    """A data-lake location is not a lake, or holds a file that cannot be read as a lake table."""


class NotFound(SegflowError, FileNotFoundError):
    """A path or image id that was asked for does not exist."""


class PlanError(SegflowError, ValueError):
    """A work-unit plan is inconsistent with the arrays it writes."""


class ModelError(SegflowError, RuntimeError):
    """The model failed on its input (a shape it cannot take, an error inside its forward pass)."""


#: Errors a step raises again on every attempt at the same input: a run does not retry a step for them.
#: (Out of memory, a read error, a lost worker, or a checkpoint a worker could not read, may pass on
#: another attempt; these do not.)
NOT_RETRIED: tuple[type[SegflowError], ...] = (ConfigError, PlanError, ModelError)


def error_line(exc: BaseException, limit: int | None = 300) -> str:
    """``exc``'s message on one line, at most ``limit`` characters (None: all of it): of an error
    raised inside a TorchScript model (whose message is the script's traceback), the original error,
    its last line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].startswith("The following operation failed in the TorchScript interpreter"):
        lines = lines[-1:]
    text = " ".join(" ".join(lines).split())
    return text if limit is None else text[:limit]


def a_model(runtime: str) -> str:
    """``"a torchscript model"``, ``"an onnx model"``: a runtime or format named in a message."""
    return f"{'an' if runtime[:1] in ('a', 'e', 'i', 'o', 'u') else 'a'} {runtime} model"
