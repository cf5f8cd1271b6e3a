"""The one exception type for problems a user can cause and fix."""


class AlignkitError(Exception):
    """A bad file, row, field, option or model combination.

    The message names the file, row, field or option at fault and what was expected. The CLI
    prints it without a traceback and exits with status 2.
    """
