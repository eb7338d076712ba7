"""The one exception type a user ever sees: a one-line message, never a traceback."""


class UserError(Exception):
    """A mistake in the user's input (path, image, prompt, source, model folder, store)."""


def first_line(exc: BaseException) -> str:
    """The first line of a library exception, for wrapping it in a UserError."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
