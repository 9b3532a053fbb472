"""One exception family, so the CLI can print a one-line error (problem + fix) instead of a traceback."""


class HfExtError(Exception):
    """Base class of every error hf-ext raises on bad input. The message names the problem and the fix."""


class UnknownModelError(HfExtError, ValueError):
    pass


class MissingAssetError(HfExtError, ImportError):
    pass


class OutputExistsError(HfExtError, FileExistsError):
    pass


class BadTextError(HfExtError, ValueError):
    pass


class HubPushError(HfExtError, RuntimeError):
    pass


class BadConfigError(HfExtError, ValueError):
    """Settings that cannot be met (checked before any slow work)."""
