"""The one error type users see: a single line that says what is wrong and how to fix it.

The CLI prints `error: <message>` for a QuantuneError and exits with status 2, never a traceback; with `-v` it
also logs the chain of underlying exceptions. Library callers catch it as a ValueError (it is bad input or an
unsupported request, not a bug) or by name.
"""


class QuantuneError(ValueError):
    """A user-facing error (bad input, missing file, unsupported option); the message names the fix."""


def cause_chain(error: BaseException) -> list[BaseException]:
    """The exceptions behind `error` (its __cause__, else its __context__, and theirs), nearest first; kept even
    where the message was raised `from None` so that `-v` can show them."""
    chain, seen = [], {id(error)}
    current = error.__cause__ or error.__context__
    while current is not None and id(current) not in seen:
        chain.append(current)
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return chain
