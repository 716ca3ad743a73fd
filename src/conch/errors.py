"""The one exception a user can cause.

A `ConchError` carries a single sentence that names what is wrong (file, record, field,
parameter) and how to fix it. The CLI prints only that sentence; notebooks show it as is.
Everything else that goes wrong is a bug and keeps its traceback.
"""


class ConchError(Exception):
    """A problem the user can fix; the message says what and how."""
