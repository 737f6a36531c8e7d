"""One error type for everything a user can get wrong; its message is one line."""


class PolyarchError(Exception):
    """A user-facing error: says what went wrong, where, and how to fix it.

    `str(err)` is a single line: "<what> [at <where>]. <fix>"."""

    def __init__(self, what, where=None, fix=None):
        self.what, self.where, self.fix = what, where, fix
        msg = what
        if where:
            msg += f" at {where}"
        if fix:
            msg += f". Fix: {fix}"
        super().__init__(msg)


class BundleError(PolyarchError):
    """A bundle that cannot be used: corrupt, wrong schema, or wrong inputs."""


class IndexRangeError(BundleError, IndexError):
    """An index (a token id, a position) outside the range of the table it indexes: given as
    an input, or computed in the model. An IndexError too, as PyTorch raises."""


class DeviceError(PolyarchError):
    """A device spec that is malformed, unknown, or not present on this host."""
