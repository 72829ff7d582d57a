"""Query parameters shared by routes, each with a length limit (a 20,000-character value is refused, not parsed).

The limit is declared on the Optional as a whole: `Annotated[str | None, Parameter(max_length=...)]`. Inside a
union (`Annotated[str, Parameter(...)] | None`) Litestar drops it silently.
"""

from __future__ import annotations

from typing import Annotated

from litestar.params import QueryParameter

from app.timeparams import MAX_TEXT

From = Annotated[str | None, QueryParameter(name="from", max_length=MAX_TEXT)]
To = Annotated[str | None, QueryParameter(max_length=MAX_TEXT)]
Zone = Annotated[str | None, QueryParameter(max_length=MAX_TEXT)]
Cursor = Annotated[str | None, QueryParameter(max_length=200)]  # a time and an id, or an id
# search text reaches the database: a NUL is refused there (PostgreSQL text cannot hold it), other controls mean nothing
Search = Annotated[str | None, QueryParameter(max_length=100, pattern=r"^[^\x00-\x1f\x7f]*$")]
