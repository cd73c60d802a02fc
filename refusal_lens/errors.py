"""The base of every error caused by the user's input (config, specs, data, model names, results
folders). The CLI reports these as one line and exits with status 2; anything else is a bug and
keeps its traceback."""


class UserError(Exception):
    """Bad input: the message names the field and what is allowed."""
