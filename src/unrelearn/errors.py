"""The one exception type that the CLI turns into a one-line message."""


class UnrelearnError(Exception):
    """A problem with the user's input or environment, phrased as problem + fix.

    The CLI prints ``str(error)`` on one line and exits non-zero; library users catch it
    like any other exception.
    """
