"""The error every data-source problem raises, shared by the source and archive readers."""

from __future__ import annotations

from mve.errors import UserError

__all__ = ["DataError"]


class DataError(UserError):
    """A data source is missing, unsupported, corrupt or inconsistent."""
