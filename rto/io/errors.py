"""The one exception type that means "the user gave us something we cannot use".

The CLI prints it as a single line and exits with code 2; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: a config value, a data row, a model directory, a task plug-in."""
