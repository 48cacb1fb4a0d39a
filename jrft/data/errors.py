"""The one error type of jrft.data: it names the source (file or dataset), the row and the field."""

from __future__ import annotations


class DataError(ValueError):
    """A row (or a whole source) that cannot be used.

    Attributes:
      source: the file path, hub dataset name, or ``"<inline rows>"``.
      row: 0-based index of the row in the source (None for source-level problems).
      field: the column at fault (None when the problem is the whole row or source).
    """

    def __init__(self, source: str, message: str, *, row: int | None = None, field: str | None = None):
        where = source
        if row is not None:
            where += f": row {row}"
        if field is not None:
            where += f": field {field!r}"
        super().__init__(f"{where}: {message}")
        self.source, self.row, self.field, self.detail = source, row, field, message
