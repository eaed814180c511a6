"""The one exception type that the CLI turns into a one-line message."""


class UnrelearnError(Exception):
    """A problem with the user's input or environment, phrased as problem + fix.

    The CLI prints ``str(error)`` on one line and exits non-zero; library users catch it
    like any other exception.
    """


class TrainingDiverged(UnrelearnError):
    """A training run whose loss or weights stopped being finite at ``step``. To a benchmark an
    attack that diverges is an outcome (a setting the attacker cannot use), not a failure."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step
