"""The toolkit's one error type: a one-line message that says what was wrong and what to do."""


class ToolkitError(Exception):
    """An error a user can act on. The CLI prints its message alone, never a traceback."""


class SettingsError(ToolkitError):
    """A bad settings.ini: the message names the section and the key."""


class ImageError(ToolkitError):
    """A file that is not a usable image: the message names the file and the reason."""
