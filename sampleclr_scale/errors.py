"""The one exception type users see for bad input."""


class InputError(ValueError):
    """Bad input: the message says what is wrong and how to fix it.

    The command line prints these without a traceback; everything else is a bug.
    """

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}\n  fix: {fix}")
