"""Sub-commands of the `scgene` command line (see `scgene.cli`)."""

# what a user's input can raise: reported as one line naming the fix, not as a traceback
USER_ERRORS = (OSError, KeyError, ValueError)


def user_error_message(command: str, error: Exception) -> str:
    """`scgene COMMAND: error: MESSAGE`, with a KeyError's message free of the quotes its repr adds."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else error
    return f"scgene {command}: error: {message}"
