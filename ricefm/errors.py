"""One exception type for bad user input, so the CLI can print it as a single clear line."""


class RiceFMInputError(ValueError):
    """Bad input from the user: the message names the file, the field and the fix."""


def did_you_mean(name: str, choices: "list[str] | tuple[str, ...]", prefix: str = "") -> str:
    """``did you mean X or Y?`` from the closest ``choices`` (difflib), else the list of choices."""
    import difflib

    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)
    if close:
        return f"did you mean {' or '.join(prefix + c for c in close)}?"
    return f"choose one of {', '.join(prefix + c for c in choices)}"
