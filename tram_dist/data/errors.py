"""The one exception type of tram_dist.data: a bad input a user can fix, with the fix in the text."""


class DataError(ValueError):
    """A data problem the user can fix (unknown domain, missing file, offline hub, bad batch
    layout). The message is one line that names the problem and the fix; launchers print it
    as ``error: <message>`` without a traceback."""
