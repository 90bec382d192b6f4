"""One exception type for bad user input, so every entry point can report it the same way."""


class RPLInputError(ValueError):
    """Bad input from the user (file, option, checkpoint, model).

    The message is one paragraph that names the file or option and says what was expected.
    Command lines print it and exit with code 2, without a traceback unless ``--debug``.
    """
