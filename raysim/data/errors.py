"""The data layer's user-facing error."""
from raysim.config import ConfigError


class DataError(ConfigError):
    """Bad input data (a path, format, column, image or partition): the CLI prints the
    message, one paragraph naming the file, column or value and what to do, and exits 2."""
