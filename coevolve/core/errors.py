"""The errors that are the user's to fix, not bugs: the CLI shows them as one line (exit 2)."""


class InputError(ValueError):
    """The user's input is wrong (a config, a data file, a model source, the state of a run directory):
    shown as one line naming the file, row or field, where any other error is a bug and keeps its
    traceback."""
