"""The exception and warning types of tram_dist.data: a bad input a user can fix, with the fix in the text."""


class DataError(ValueError):
    """A data problem the user can fix (unknown domain, missing file, offline hub, bad batch
    layout). The message is one line that names the problem and the fix; launchers print it
    as ``error: <message>`` without a traceback."""


class DataWarning(UserWarning):
    """Data that is used, but not exactly as written (e.g. invalid UTF-8 replaced by U+FFFD).
    The message is one line naming the file and what happened."""
