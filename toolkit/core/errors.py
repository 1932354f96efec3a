"""The toolkit's one error type: a one-line message that says what was wrong and what to do."""

import errno


class ToolkitError(Exception):
    """An error a user can act on. The CLI prints its message alone, never a traceback."""


class SettingsError(ToolkitError):
    """A bad settings.ini: the message names the section and the key."""


class ImageError(ToolkitError):
    """A file that is not a usable image: the message names the file and the reason."""


def os_error_line(exc: OSError) -> str:
    """An OSError (disk full, permission denied, a name too long...) as one line naming the file."""
    where = f"{exc.filename}: " if exc.filename else ""
    hint = {errno.ENOSPC: "free some disk space and run it again", errno.EACCES: "check its permissions",
            errno.EPERM: "check its permissions", errno.ENAMETOOLONG: "use a shorter name",
            errno.EROFS: "the file system is read-only"}.get(exc.errno or 0, "check the path")
    return f"{where}{exc.strerror or exc} ({hint})"
