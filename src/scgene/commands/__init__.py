"""Sub-commands of the `scgene` command line (see `scgene.cli`)."""

# what a user's input can raise: reported as one line naming the fix, not as a traceback
USER_ERRORS = (OSError, KeyError, ValueError)


def user_error_message(command: str, error: Exception, flags: dict[str, str] | None = None) -> str:
    """`scgene COMMAND: error: MESSAGE`, with a KeyError's message free of the quotes its repr adds, and the Python
    argument names of the library's messages replaced by the command's flags (`flags`: name -> flag)."""
    message = str(error.args[0] if isinstance(error, KeyError) and error.args else error)
    for name, flag in (flags or {}).items():
        message = message.replace(name, flag)
    return f"scgene {command}: error: {message}"
