"""The exceptions fxprune raises. Every one is an :class:`FxPruneError`.

Each message names the node, module or Python line at fault and says what to do.
"""


class FxPruneError(Exception):
    """Base class of every error fxprune raises on bad input or a failed check."""


class TraceError(FxPruneError):
    """The model could not be captured by ``torch.fx.symbolic_trace``."""


class ConfigError(FxPruneError):
    """An argument to a public function is out of range or inconsistent."""


class PlanError(FxPruneError):
    """A plan does not match the model it is applied to."""


class DataError(FxPruneError):
    """Data passed to a data-driven criterion is missing or malformed."""


class RewriteError(FxPruneError):
    """A rule could not resize a module or fix a node's arguments for a plan."""


class VerificationError(FxPruneError):
    """The pruned model disagrees with the masked original or with ONNX Runtime."""


class ExportError(VerificationError):
    """``torch.onnx`` could not write the model's ONNX file (an exporter's limit, which the
    unpruned model may share: :meth:`fxprune.pipeline.Pipeline.finish` then skips the check)."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is the allocator running out of memory (Python's, or torch's CPU or CUDA allocator)."""
    text = str(exc)
    return isinstance(exc, MemoryError) or "can't allocate memory" in text or "bad_alloc" in text or \
        type(exc).__name__ == "OutOfMemoryError"
