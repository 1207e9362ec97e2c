"""One exception type for bad user input, so the CLI can print it as a single clear line."""


class RiceFMInputError(ValueError):
    """Bad input from the user: the message names the file, the field and the fix."""
