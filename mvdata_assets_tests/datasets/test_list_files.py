"""A list whose columns are not the ones its catalog entry names is refused by `read_list`, naming the list, the
column it lacks and what it has instead, before a row of it is fetched."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mvdata_assets.datasets.catalog import UrlList
from mvdata_assets.datasets.list_files import UrlListError, read_list


def test_a_tsv_header_without_the_url_column_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.tsv"
    path.write_text("URL\tTEXT\nhttp://x.org/a.jpg\ta cat\n", encoding="utf-8")
    spec = UrlList(("list.tsv",), "tsv", url_column="url", caption_column="TEXT", header=True)
    with pytest.raises(UrlListError, match=f"^{re.escape(str(path))}: no column 'url' in the header \\(URL, TEXT\\)$"):
        read_list(path, spec)


def test_a_tsv_header_without_the_caption_column_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.tsv"
    path.write_text("URL\tTEXT\nhttp://x.org/a.jpg\ta cat\n", encoding="utf-8")
    spec = UrlList(("list.tsv",), "tsv", url_column="URL", caption_column="caption", header=True)
    with pytest.raises(UrlListError, match=r"list\.tsv: no column 'caption' in the header \(URL, TEXT\)"):
        read_list(path, spec)


def test_an_empty_tsv_with_a_header_is_refused_as_empty(tmp_path: Path) -> None:
    path = tmp_path / "list.tsv"
    path.write_text("", encoding="utf-8")
    spec = UrlList(("list.tsv",), "tsv", url_column="url", caption_column="caption", header=True)
    with pytest.raises(UrlListError, match=f"^{re.escape(str(path))}: empty, but its catalog entry says its first row"):
        read_list(path, spec)


def test_a_tsv_row_shorter_than_the_url_column_is_refused(tmp_path: Path) -> None:
    """A one-column list read with url_column=1 (CC3M's layout) has no URL in any row."""
    path = tmp_path / "list.tsv"
    path.write_text("a cat\na dog\n", encoding="utf-8")
    spec = UrlList(("list.tsv",), "tsv", url_column=1, caption_column=0)
    with pytest.raises(
        UrlListError,
        match=r"list\.tsv: url_column \(column 1\) does not hold http\(s\) URLs \(row 1: empty or missing\)$",
    ):
        read_list(path, spec)


def test_a_url_column_of_no_urls_is_refused_without_a_swap_hint_when_no_column_holds_urls(tmp_path: Path) -> None:
    path = tmp_path / "list.tsv"
    path.write_text("id-1\ta cat\nid-2\ta dog\n", encoding="utf-8")
    spec = UrlList(("list.tsv",), "tsv", url_column=0, caption_column=1)
    with pytest.raises(
        UrlListError, match=r"url_column \(column 0\) does not hold http\(s\) URLs \(row 1: 'id-1'\)"
    ) as e:
        read_list(path, spec)
    assert "swapped" not in str(e.value)  # the captions hold no URLs either: nothing to swap


def test_a_parquet_list_without_the_caption_column_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "laion.parquet"
    pq.write_table(pa.table({"url": ["https://x.org/a.jpg"], "text": ["a cat"]}), path)
    spec = UrlList(("laion.parquet",), "parquet", url_column="url", caption_column="caption")
    with pytest.raises(UrlListError, match=r"laion\.parquet: no column 'caption' \(it has url, text\)"):
        read_list(path, spec)


@pytest.mark.parametrize("missing", ["image_urls", "captions"])
def test_json_records_without_a_named_key_are_refused(tmp_path: Path, missing: str) -> None:
    path = tmp_path / "records.json"
    record = {"image_urls": "http://x.org/a.jpg", "captions": "a cat"}
    del record[missing]
    path.write_text(json.dumps([record]), encoding="utf-8")
    spec = UrlList(("records.json",), "json", url_column="image_urls", caption_column="captions")
    has = ", ".join(record)
    with pytest.raises(
        UrlListError, match=rf"records\.json: no key '{missing}' in its records \(the first has {has}\)"
    ):
        read_list(path, spec)


@pytest.mark.parametrize(("document", "kind"), [("http://x.org/a.jpg", "str"), (42, "int"), (None, "NoneType")])
def test_json_that_is_neither_arrays_nor_records_is_refused(tmp_path: Path, document: object, kind: str) -> None:
    path = tmp_path / "sbu.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    spec = UrlList(("sbu.json",), "json", url_column="image_urls", caption_column="captions")
    with pytest.raises(
        UrlListError, match=rf"sbu\.json: expected an object of arrays or an array of records, not {kind}$"
    ):
        read_list(path, spec)


def test_a_lines_list_of_no_urls_is_refused_naming_the_first_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "SBU_urls.txt"
    path.write_text("http://x.org/a.jpg\na cat\na dog\n", encoding="utf-8")
    with pytest.raises(UrlListError, match=r"SBU_urls\.txt: its lines do not hold http\(s\) URLs \(row 2: 'a cat'\)$"):
        read_list(path, UrlList(("SBU_urls.txt",), "lines"))


def test_a_json_array_of_urls_instead_of_records_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "urls.json"
    path.write_text(json.dumps(["http://x.org/a.jpg"]), encoding="utf-8")
    spec = UrlList(("urls.json",), "json", url_column="url")
    with pytest.raises(
        UrlListError, match=r"urls\.json: expected an array of records \(objects\), but its first item is a str$"
    ):
        read_list(path, spec)


def test_json_arrays_whose_url_key_is_not_an_array_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "sbu.json"
    path.write_text(json.dumps({"image_urls": "http://x.org/a.jpg", "captions": ["a cat"]}), encoding="utf-8")
    spec = UrlList(("sbu.json",), "json", url_column="image_urls", caption_column="captions")
    with pytest.raises(UrlListError, match=r"sbu\.json: 'image_urls' is a str, not an array$"):
        read_list(path, spec)
