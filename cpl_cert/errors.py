"""The one exception type the command line turns into a single clear sentence and exit code 1."""


class CplCertError(Exception):
    """A problem the user can fix (bad file, bad option, missing data). The message is one sentence."""
