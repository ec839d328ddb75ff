"""Sub-commands of the `scgene` command line (see `scgene.cli`)."""

import contextlib
import logging
import os
import sys

# what a user's input can raise: reported as one line naming the fix, not as a traceback
USER_ERRORS = (OSError, KeyError, ValueError)


def user_error_message(command: str, error: Exception, flags: dict[str, str] | None = None) -> str:
    """`scgene COMMAND: error: MESSAGE`, with a KeyError's message free of the quotes its repr adds, and the Python
    argument names of the library's messages replaced by the command's flags (`flags`: name -> flag)."""
    message = str(error.args[0] if isinstance(error, KeyError) and error.args else error)
    for name, flag in ({"pass overwrite=True (--overwrite)": "pass --overwrite"} | (flags or {})).items():
        message = message.replace(name, flag)
    return f"scgene {command}: error: {message}"


def load_tokenizer(name: str | None):
    """The tokenizer of --tokenizer: the default human vocabulary, a local folder (a path that starts with /, . or ~
    must be one) or a Hub id; problems are named in terms of the flag."""
    from ..fileio import TOKENIZER_FOLDER, local_or_hub
    from ..tokenization_scgene import ScGeneTokenizer

    if name is None:
        return ScGeneTokenizer()
    try:
        source = local_or_hub(name, TOKENIZER_FOLDER)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"--tokenizer {error}") from None
    try:
        return ScGeneTokenizer.from_pretrained(source)
    except OSError as error:
        raise FileNotFoundError(f"--tokenizer {name} is neither a saved tokenizer folder nor a Hub repository that "
                                f"could be loaded ({str(error).splitlines()[0]}).") from error


@contextlib.contextmanager
def coverage_report_shown():
    """Show scgene's reports logged as info (gene coverage, prior coverage) on the command's stderr, only during it
    (a `with` block, or `@coverage_report_shown()` on a command's `run`)."""
    scgene_logger, report = logging.getLogger("scgene"), logging.StreamHandler(sys.stderr)
    level = scgene_logger.level
    scgene_logger.setLevel(logging.INFO)
    scgene_logger.addHandler(report)
    try:
        yield
    finally:
        scgene_logger.removeHandler(report)
        scgene_logger.setLevel(level)


def add_report_arguments(parser, saved: str = "the scores, settings and targets") -> None:
    """--json and --markdown: where an evaluate command saves its report."""
    parser.add_argument("--json", metavar="FILE", help=f"save {saved} as JSON")
    parser.add_argument("--markdown", metavar="FILE", help="save the table as markdown")


def existing_paths(*paths) -> list:
    """The given paths that exist here (a Hub id or an unset option is no local input)."""
    return [path for path in paths if path and os.path.exists(path)]


@contextlib.contextmanager
def claimed_files(paths, inputs: list, command: str, overwrite: bool):
    """Claim each output file in `paths` (unset ones skipped) before the run: checked first, never an input, an
    existing one replaced only with `overwrite` (`fileio.claimed_output`)."""
    from ..fileio import claimed_output

    with contextlib.ExitStack() as claims:
        for path in paths:
            if path:
                claims.enter_context(claimed_output(path, inputs, command=command, folder=False, overwrite=overwrite))
        yield


def claimed_reports(args, inputs: list, command: str):
    """Claim --markdown and --json before the run: checked first, replaced if they exist, never an input."""
    return claimed_files((args.markdown, args.json), inputs, command, overwrite=True)


def show_report(report, args) -> int:
    """Print the report's table and the files it was saved to; the command's exit status."""
    print(report.to_markdown())
    for path in (args.markdown, args.json):
        if path:
            print(f"Wrote {path}")
    return 0
