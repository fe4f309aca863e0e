"""User-facing errors.

A ``UserError`` is a mistake in what the user gave us (a config key, a path, a corpus, a checkpoint).
The command line prints its message as one line and exits with code 2, without a traceback unless
``--debug`` is given. Internal invariants use ``assert`` instead, so a bug still shows its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input. The message says what is wrong, the value given, and how to fix it."""

    exit_code = 2


def closest(name: str, choices) -> str:
    """A ' (did you mean X?)' suffix naming the closest of ``choices``, or '' when nothing is close."""
    import difflib

    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""
