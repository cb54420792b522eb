"""costeff's own exception types, importable without torch (the CLI catches them before anything heavy loads)."""


class ExtensionNotBuiltError(ImportError):
    """Raised when an op is called but costeff._C was never compiled."""


class MissingDependencyError(ImportError):
    """Raised when a feature needs an optional package (e.g. onnxruntime) that is not installed."""
