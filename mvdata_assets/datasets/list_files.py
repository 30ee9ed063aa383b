"""Reading image URL lists (TSV, parquet, JSON, line files) as a stream of (url, caption) rows.

A list is read as its catalog entry says (`url_list:` in the catalog: format, columns, header); before anything is
fetched its first rows are checked, so a list read the wrong way round (CC3M is caption<TAB>url, CC12M url<TAB>caption)
fails with `UrlListError` saying so, instead of passing for link rot. Plain Python.
"""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq

from mvdata_assets.datasets.catalog import Column, UrlList

CHECK_ROWS = 100  # rows whose URL column is checked before anything is fetched
Row = tuple[str, str | None]  # (url, caption)


class UrlListError(ValueError):
    """A list that can't be read as its catalog entry says (a missing column, a URL column holding no URLs)."""


def is_url(value: str | None) -> bool:
    """An http(s) URL as lists hold them: anything else in a URL column fails as `invalid_url`, never fetched."""
    return bool(value) and value.startswith(("http://", "https://")) and " " not in value.strip()


def _describe(column: Column) -> str:
    return f"column {column}" if isinstance(column, int) else f"column {column!r}"


def _tsv_rows(path: Path, spec: UrlList) -> Iterator[Row]:
    csv.field_size_limit(1 << 24)
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        url_at, caption_at = spec.url_column, spec.caption_column
        if spec.header:
            names = next(reader, None)
            if names is None:
                raise UrlListError(f"{path}: empty, but its catalog entry says its first row is a header")
            for column in (url_at, caption_at):
                if isinstance(column, str) and column not in names:
                    raise UrlListError(f"{path}: no column {column!r} in the header ({', '.join(names)})")
            url_at = names.index(url_at) if isinstance(url_at, str) else url_at
            caption_at = names.index(caption_at) if isinstance(caption_at, str) else caption_at
        for fields in reader:
            url = fields[url_at].strip() if url_at < len(fields) else ""
            caption = fields[caption_at] if caption_at is not None and caption_at < len(fields) else None
            yield url, caption


def _parquet_rows(path: Path, spec: UrlList) -> Iterator[Row]:
    parquet = pq.ParquetFile(path)
    columns = [c for c in (spec.url_column, spec.caption_column) if c is not None]
    for column in columns:
        if column not in parquet.schema_arrow.names:
            raise UrlListError(f"{path}: no column {column!r} (it has {', '.join(parquet.schema_arrow.names)})")
    for batch in parquet.iter_batches(columns=columns):
        urls = batch.column(str(spec.url_column)).to_pylist()
        captions = batch.column(str(spec.caption_column)).to_pylist() if spec.caption_column is not None else None
        for i, url in enumerate(urls):
            yield (url or "").strip(), captions[i] if captions is not None else None


def _json_rows(path: Path, spec: UrlList) -> Iterator[Row]:
    """A JSON object of parallel arrays (SBU: `{"image_urls": [...], "captions": [...]}`) or an array of records.

    Read whole (the stdlib has no streaming JSON reader, and a JSON list is one value): fine for SBU's 1 M pairs; a
    list of hundreds of millions belongs in parquet or TSV, which are streamed.
    """
    try:
        doc = json.loads(path.read_bytes())
    except ValueError as exc:
        raise UrlListError(f"{path}: not JSON: {exc}") from None
    names = [c for c in (spec.url_column, spec.caption_column) if c is not None]
    if isinstance(doc, list):  # records
        first = doc[0] if doc else {}
        if not isinstance(first, dict):
            raise UrlListError(f"{path}: expected an array of records (objects), but its first item is a "
                               f"{type(first).__name__}")  # fmt: skip
        for name in names:
            if doc and name not in first:
                raise UrlListError(f"{path}: no key {name!r} in its records (the first has {', '.join(first)})")
        for record in doc:
            url = record.get(spec.url_column) if isinstance(record, dict) else None
            caption = record.get(spec.caption_column) if isinstance(record, dict) and spec.caption_column else None
            yield _json_url(url), caption
        return
    if not isinstance(doc, dict):
        raise UrlListError(f"{path}: expected an object of arrays or an array of records, not {type(doc).__name__}")
    for name in names:
        if name not in doc:
            raise UrlListError(f"{path}: no key {name!r} (it has {', '.join(doc)})")
        if not isinstance(doc[name], list):
            raise UrlListError(f"{path}: {name!r} is a {type(doc[name]).__name__}, not an array")
    urls = doc[spec.url_column]
    captions = doc[spec.caption_column] if spec.caption_column is not None else None
    if captions is not None and len(captions) != len(urls):
        raise UrlListError(f"{path}: {len(urls)} {spec.url_column!r} but {len(captions)} {spec.caption_column!r}")
    for i, url in enumerate(urls):
        yield _json_url(url), captions[i] if captions is not None else None


def _json_url(value: object) -> str:
    """A JSON value where a URL should be: anything but a string (null, a number) counts as no URL."""
    return value.strip() if isinstance(value, str) else ""


def _count_lines(path: Path) -> int:
    count, last = 0, b"\n"
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")  # a last line without its newline


def _line_rows(path: Path, captions: Path | None) -> Iterator[Row]:
    """SBU's layout: a URL per line, and line i of the captions file is the caption of URL i."""
    if captions is not None and (urls := _count_lines(path)) != (texts := _count_lines(captions)):
        raise UrlListError(
            f"{path} has {urls} lines but its captions file {captions} has {texts}: they can't be paired"
        )
    with path.open(encoding="utf-8") as url_lines:
        if captions is None:
            for line in url_lines:
                yield line.strip(), None
            return
        with captions.open(encoding="utf-8") as caption_lines:
            for line, caption in zip(url_lines, caption_lines, strict=True):
                yield line.strip(), caption.rstrip("\r\n")


def read_list(path: Path, spec: UrlList, captions: Path | None = None) -> Iterator[Row]:
    """(url, caption) per row, after checking that the URL column of the first rows holds http(s) URLs.

    The check is what stops a swapped-column mistake (CC3M read as url<TAB>caption) before millions of "URLs" are
    requested and their failures reported as link rot. `captions` is the paired captions file of a `lines` list.
    """
    if spec.format == "lines":
        rows = _line_rows(path, captions)
    elif spec.format == "json":
        rows = _json_rows(path, spec)
    else:
        rows = _tsv_rows(path, spec) if spec.format == "tsv" else _parquet_rows(path, spec)
    head = list(itertools.islice(rows, CHECK_ROWS))
    if head and sum(is_url(url) for url, _ in head) * 2 < len(head):
        row, bad = next((i, url) for i, (url, _) in enumerate(head, 1) if not is_url(url))
        holds_urls = sum(is_url(caption) for _, caption in head) * 2 >= len(head)
        if spec.format == "lines":
            problem = "its lines do not hold http(s) URLs"
            hint = f"; the captions file {captions} holds the URLs: are the two swapped?" if holds_urls else ""
        else:
            problem = f"url_column ({_describe(spec.url_column)}) does not hold http(s) URLs"
            hint = ""
            if holds_urls:
                hint = f"; {_describe(spec.caption_column)} (caption_column) holds the URLs: are the two swapped?"
        value = repr(bad[:80]) if bad else "empty or missing"
        raise UrlListError(f"{path}: {problem} (row {row}: {value}){hint}")
    return itertools.chain(head, rows)
