"""The one error type users see: a single line that says what is wrong and how to fix it.

The CLI prints `error: <message>` for a QuantuneError and exits with status 2, never a traceback.
"""


class QuantuneError(Exception):
    """A user-facing error (bad input, missing file, unsupported option); the message names the fix."""
