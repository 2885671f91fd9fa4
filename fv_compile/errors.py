"""The one exception type fv_compile raises for bad input; its message says what to change.

Every error docs/errors.md lists is an `FvCompileError` (a `ValueError`). Where Python has a
more specific built-in type for the case, the error is that type too, so code that catches the
built-in keeps working: a missing optional package is also an `ImportError`, a wrong type of
object also a `TypeError`, an operation a backend does not implement also a
`NotImplementedError`.
"""


class FvCompileError(ValueError):
    pass


class FvCompileTypeError(FvCompileError, TypeError):
    """An object of the wrong kind (metadata that is not a dataclass, a model not from the zoo)."""


class MissingDependency(FvCompileError, ImportError):
    """An optional package the chosen backend or helper needs is not installed."""


class NotSupportedByBackend(FvCompileError, NotImplementedError):
    """The chosen backend does not implement what the call asks (a backward of a forward-only one)."""
