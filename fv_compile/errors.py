"""The one exception type fv_compile raises for bad input; its message says what to change."""


class FvCompileError(ValueError):
    pass
