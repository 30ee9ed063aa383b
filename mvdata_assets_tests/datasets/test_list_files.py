"""A list whose columns are not the ones its catalog entry names is refused by `read_list`, naming the list, the
column it lacks and what it has instead, before a row of it is fetched."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mvdata_assets.datasets.catalog import UrlList
from mvdata_assets.datasets.list_files import UrlListError, read_list

HEADED = "URL\tTEXT\nhttp://x.org/a.jpg\ta cat\n"
SBU = dict(format="json", url_column="image_urls", caption_column="captions")  # its JSON's keys

# (file name, its text, how the catalog entry reads it, the error after "<path>: ")
REFUSED = [
    ("list.tsv", HEADED, dict(format="tsv", url_column="url", caption_column="TEXT", header=True),
     "no column 'url' in the header (URL, TEXT)"),
    ("list.tsv", HEADED, dict(format="tsv", url_column="URL", caption_column="caption", header=True),
     "no column 'caption' in the header (URL, TEXT)"),
    ("list.tsv", "", dict(format="tsv", url_column="url", caption_column="caption", header=True),
     "empty, but its catalog entry says its first row is a header"),
    # a one-column list read with CC3M's layout (url_column=1) has no URL in any row
    ("list.tsv", "a cat\na dog\n", dict(format="tsv", url_column=1, caption_column=0),
     "url_column (column 1) does not hold http(s) URLs (row 1: empty or missing)"),
    # the captions hold no URLs either: nothing to call swapped
    ("list.tsv", "id-1\ta cat\nid-2\ta dog\n", dict(format="tsv", url_column=0, caption_column=1),
     "url_column (column 0) does not hold http(s) URLs (row 1: 'id-1')"),
    ("SBU_urls.txt", "http://x.org/a.jpg\na cat\na dog\n", dict(format="lines"),
     "its lines do not hold http(s) URLs (row 2: 'a cat')"),
    ("sbu.json", json.dumps([{"captions": "a cat"}]), SBU,
     "no key 'image_urls' in its records (the first has captions)"),
    ("sbu.json", json.dumps([{"image_urls": "http://x.org/a.jpg"}]), SBU,
     "no key 'captions' in its records (the first has image_urls)"),
    ("sbu.json", json.dumps(["http://x.org/a.jpg"]), dict(format="json", url_column="image_urls"),
     "expected an array of records (objects), but its first item is a str"),
    ("sbu.json", json.dumps({"image_urls": "http://x.org/a.jpg", "captions": ["a cat"]}), SBU,
     "'image_urls' is a str, not an array"),
    *((("sbu.json", json.dumps(document), SBU,
        f"expected an object of arrays or an array of records, not {kind}"))
      for document, kind in (("http://x.org/a.jpg", "str"), (42, "int"), (None, "NoneType"))),
]  # fmt: skip


@pytest.mark.parametrize(("name", "text", "reading", "error"), REFUSED)
def test_a_list_that_is_not_as_its_catalog_entry_says_is_refused(
    tmp_path: Path, name: str, text: str, reading: dict, error: str
) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UrlListError) as refused:
        read_list(path, UrlList((name,), **reading))
    assert str(refused.value) == f"{path}: {error}"


def test_a_parquet_list_without_the_caption_column_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "laion.parquet"
    pq.write_table(pa.table({"url": ["https://x.org/a.jpg"], "text": ["a cat"]}), path)
    with pytest.raises(UrlListError) as refused:
        read_list(path, UrlList(("laion.parquet",), "parquet", url_column="url", caption_column="caption"))
    assert str(refused.value) == f"{path}: no column 'caption' (it has url, text)"
