"""Errors that stop a run with a message naming the problem."""


class NonFiniteError(FloatingPointError):
    """A loss, observation or reward that is NaN or infinite; the message names it and the env step."""
