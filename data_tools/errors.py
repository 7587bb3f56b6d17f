"""The one error class of `data_tools`: bad input files or an output folder we must not touch."""

from capsdist.errors import UserError


class DataToolError(UserError, ValueError):
    """A converter cannot go on; the one-line message names the file or folder at fault.

    A `UserError`: `capsdist data` prints it as that one line on stderr and exits with 2.
    """
