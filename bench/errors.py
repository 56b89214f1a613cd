"""One error type for bad input: its message is the single line the user sees."""


class BenchError(ValueError):
    """Bad input (config key, file, asset, URI): the message names the key or file and the valid choices."""
