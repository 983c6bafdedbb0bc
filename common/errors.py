"""The errors that mean "fix your input", below every module that raises them.

``run.py`` prints each as one line and exits with code 2, before any expensive work where the check allows.
"""


class PreflightError(ValueError):
    """A config value or file that cannot work; the message names it and says how to fix it."""


class AnyModelError(ValueError):
    """Bad ``anymodel_descriptor`` or block configs; the message says what to fix."""
