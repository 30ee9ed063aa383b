"""The catalog's YAML schema: each field's rules (pydantic models), and their errors worded for catalog authors.

Private to catalog.py, which checks the rules across fields and files and builds the objects callers get. Plain
Python: nothing here imports Dagster.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import PurePosixPath
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

Access = Literal["public", "hf", "manual"]
ListFormat = Literal["tsv", "parquet", "json", "lines"]
Column = int | str  # a 0-based index (headerless TSV) or a column name (parquet, TSV with a header)

# Only these are unpacked (suffix -> its reader): anything else marked `extract` is a catalog mistake, not a format to
# guess at
ARCHIVE_KINDS: dict[str, Literal["zip", "tar"]] = {".zip": "zip", ".tar": "tar", ".tar.gz": "tar", ".tgz": "tar"}
ARCHIVE_SUFFIXES: tuple[str, ...] = tuple(ARCHIVE_KINDS)
SHARD_SIZE = 10_000  # a URL list's images per WebDataset tar shard, unless its entry says

_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_MD5_RE = re.compile(r"^[0-9a-fA-F]{32}$")


def fail(message: str) -> PydanticCustomError:
    return PydanticCustomError("catalog", message)


def _check_http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise fail("must be an http(s) URL with a host")
    if any(c.isspace() for c in value):
        raise fail("must not contain whitespace (percent-encode it)")
    return value


def _check_hex(value: Any, pattern: re.Pattern[str], digits: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        # e.g. an all-digit md5 that YAML read as a number
        raise fail(f"must be {digits} hex digits as a string (quote it in YAML)")
    if not pattern.fullmatch(value):
        raise fail(f"must be {digits} hex digits")
    return value.lower()


def check_relative_path(value: str) -> str:
    """Refuse anything that could land outside the dataset folder once joined to it."""
    if not value:
        raise fail("must not be empty")
    if "\\" in value:
        raise fail("must use / separators, not backslashes")
    if value.startswith("/") or re.match(r"^[A-Za-z]:", value):
        raise fail("must be relative to the dataset folder, not absolute")
    pure = PurePosixPath(value)
    if ".." in pure.parts:
        raise fail("must not contain '..'")
    if value.endswith("/") or pure.as_posix() == ".":
        raise fail("must name a file, not a folder")
    return pure.as_posix()  # drops "./" and doubled slashes so equal paths compare equal


class FileModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    # field order matters: later validators read earlier, already-validated fields from `info.data`
    url: str
    path: str | None = Field(default=None, validate_default=True)
    size: int | None = None
    sha256: str | None = None
    md5: str | None = None
    extract: bool = False

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _check_http_url(value)

    @field_validator("path")
    @classmethod
    def _path(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            return check_relative_path(value)
        url = info.data.get("url")
        if url is None:  # the url error is already reported
            return None
        basename = posixpath.basename(unquote(urlsplit(url).path))
        if not basename:
            raise fail("required: the URL has no file name to default to")
        return check_relative_path(basename)

    @field_validator("size")
    @classmethod
    def _size(cls, value: int | None) -> int | None:
        if value is not None and value <= 0:
            raise fail("must be a positive number of bytes")
        return value

    @field_validator("sha256", mode="before")
    @classmethod
    def _sha256(cls, value: Any) -> str | None:
        return _check_hex(value, _SHA256_RE, 64)

    @field_validator("md5", mode="before")
    @classmethod
    def _md5(cls, value: Any) -> str | None:
        return _check_hex(value, _MD5_RE, 32)

    @field_validator("extract")
    @classmethod
    def _extract(cls, value: bool, info: ValidationInfo) -> bool:
        path = info.data.get("path")
        if value and path is not None and not path.lower().endswith(ARCHIVE_SUFFIXES):
            raise fail(f"only {', '.join(ARCHIVE_SUFFIXES)} archives can be extracted, not {path!r}")
        return value


def _check_column(value: Any) -> Column | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise fail("must be a 0-based column index or a column name")
    if isinstance(value, int) and value < 0:
        raise fail("must be a 0-based column index (0 or more)")
    if isinstance(value, str) and not value.strip():
        raise fail("must not be empty")
    return value


class UrlListModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    lists: list[str] | None = None
    format: ListFormat
    url_column: Any = None
    caption_column: Any = None
    header: bool = False
    shard_size: int = SHARD_SIZE
    captions: list[str] | None = None
    decode: bool = False

    @field_validator("lists", "captions")
    @classmethod
    def _lists(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise fail("must name at least one list file (or be left out for every file of the dataset)")
        return value

    @field_validator("url_column", "caption_column", mode="before")
    @classmethod
    def _column(cls, value: Any) -> Column | None:
        return _check_column(value)

    @field_validator("shard_size")
    @classmethod
    def _shard_size(cls, value: int) -> int:
        if value <= 0:
            raise fail("must be a positive number of images")
        return value


def url_list_problems(model: UrlListModel) -> list[tuple[str, str]]:
    """Rules across fields: how the columns can be named depends on the format and the header."""
    if model.format == "lines":  # no columns: a URL per line, captions in a parallel file
        problems = [
            (field, "does not apply to format: lines (one URL per line; captions come from `captions` files)")
            for field, given in (("url_column", model.url_column), ("caption_column", model.caption_column))
            if given is not None
        ]
        if model.header:
            problems.append(("header", "only applies to format: tsv"))
        return problems
    problems = [] if model.url_column is not None else [("url_column", "required")]
    if model.captions is not None:
        problems.append(("captions", "only applies to format: lines (the other formats name a caption_column)"))
    for field in ("url_column", "caption_column"):
        column = getattr(model, field)
        if model.format in ("parquet", "json") and isinstance(column, int):
            problems.append((field, f"{model.format} columns are named: give the column name, not an index"))
        elif model.format == "tsv" and not model.header and isinstance(column, str):
            problems.append((field, "a TSV without header has no column names: give a 0-based index"))
    if model.url_column is not None and model.url_column == model.caption_column:
        problems.append(("caption_column", f"is the same column as url_column ({model.url_column!r})"))
    if model.header and model.format != "tsv":
        problems.append(("header", "only applies to format: tsv"))
    return problems


class DatasetModel(BaseModel):
    """Dataset-level fields; files are validated one by one so each error can name its index."""

    model_config = ConfigDict(extra="forbid", strict=True)

    description: str
    homepage: str | None = None
    license: str | None = None
    access: Access
    instructions: str | None = None
    files: list[Any] = Field(default_factory=list)
    url_list: Any = None  # validated on its own, after the files it refers to

    @field_validator("description")
    @classmethod
    def _description(cls, value: str) -> str:
        if not value.strip():
            raise fail("must not be empty")
        return value.strip()

    @field_validator("homepage")
    @classmethod
    def _homepage(cls, value: str | None) -> str | None:
        return None if value is None else _check_http_url(value)


def _loc(loc: tuple[int | str, ...]) -> str:
    """('files', 0, 'sha256') -> 'files[0].sha256'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_TYPE_MESSAGES = {
    "string_type": "must be a string",
    "int_type": "must be a whole number",
    "bool_type": "must be true or false",
    "list_type": "must be a list",
}


def messages(exc: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    """Turn pydantic's errors into (field path, message) pairs worded for catalog authors."""
    out = []
    for err in exc.errors():
        field = _loc(tuple(err["loc"]))
        if prefix:
            field = f"{prefix}.{field}" if field else prefix
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        elif err["type"] == "missing":
            message = "required"
        elif err["type"] == "literal_error":
            expected = err["ctx"]["expected"].replace("'", "").replace(" or ", ", ")
            message = f"must be one of {expected}, not {err['input']!r}"
        else:
            message = _TYPE_MESSAGES.get(err["type"], err["msg"])
        out.append((field, message))
    return out
