"""The package's error for a bad argument. Torch only, relative imports only: it travels next to the model code for
`trust_remote_code`."""


class ArgumentError(ValueError):
    """A bad argument of a library function or a generation run. `argument` names it as data (`"temperature"`), so
    that a caller (a pipeline, the `pdm` command) can name its own spelling of it (`--temperature`) without reading
    the message."""

    def __init__(self, argument: str, message: str):
        super().__init__(message)
        self.argument = argument
