"""The `datasets` schema on a real DuckDB file: what a run's outcome leaves in it, and what the next run reads back."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from mvdata_assets.datasets import store
from mvdata_assets.datasets.files import FileResult, Known


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    connection = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    store.ensure_schema(connection)
    yield connection
    connection.close()


def downloaded(path: str, sha256: str = "a" * 64, size: int = 10, mtime_ns: int | None = 1) -> FileResult:
    return FileResult(f"http://127.0.0.1{path}", path, "downloaded", bytes=size, sha256=sha256, mtime_ns=mtime_ns)


def rows(conn: duckdb.DuckDBPyConnection, dataset: str) -> dict[str, tuple]:
    found = conn.execute(
        "SELECT path, status, sha256, error, attempts FROM datasets.files WHERE dataset = ? ORDER BY path", [dataset]
    ).fetchall()
    return {path: tuple(rest) for path, *rest in found}


def shard(index: int, seconds: float | None, in_place: int = 3, list_path: str = "list.tsv") -> store.Shard:
    return store.Shard(list_path, index, f"/d/shards/list/{index:05d}.tar", 4, in_place, 4 - in_place,
                       +Counter(http_404=4 - in_place), 300, 10240, "b" * 64, seconds)  # fmt: skip


def test_a_file_recorded_again_keeps_one_row_with_its_latest_outcome(conn: duckdb.DuckDBPyConnection) -> None:
    store.record_files(conn, "coco", [downloaded("/d/a.zip"), downloaded("/d/b.zip")])
    store.record_files(conn, "coco", [FileResult("u", "/d/a.zip", "failed", error="HTTP 404 for u", attempts=1)])
    store.record_files(conn, "vqav2", [downloaded("/d/a.zip", sha256="c" * 64)])  # same path, another dataset

    assert rows(conn, "coco") == {
        "/d/a.zip": ("failed", None, "HTTP 404 for u", 1),
        "/d/b.zip": ("downloaded", "a" * 64, None, 0),
    }
    assert rows(conn, "vqav2") == {"/d/a.zip": ("downloaded", "c" * 64, None, 0)}


def test_known_files_are_the_verified_ones_with_a_checksum_and_an_mtime(conn: duckdb.DuckDBPyConnection) -> None:
    store.record_files(
        conn,
        "coco",
        [
            downloaded("/d/a.zip", size=7, mtime_ns=123),
            FileResult("u", "/d/b.zip", "skipped", bytes=8, sha256="b" * 64, mtime_ns=456),
            FileResult("u", "/d/c.zip", "failed", error="timed out"),
            downloaded("/d/d.zip", mtime_ns=None),  # in place, but its mtime was never read: must be hashed again
        ],
    )

    assert store.known_files(conn, "coco") == {
        Path("/d/a.zip"): Known(7, 123, "a" * 64),
        Path("/d/b.zip"): Known(8, 456, "b" * 64),
    }
    assert store.known_files(conn, "vqav2") == {}


def test_a_batch_the_schema_refuses_changes_nothing_already_stored(conn: duckdb.DuckDBPyConnection) -> None:
    store.record_files(conn, "coco", [downloaded("/d/a.zip")])
    broken = FileResult("u", "/d/b.zip", None)  # type: ignore[arg-type]  # a status is required

    with pytest.raises(duckdb.ConstraintException, match="status"):
        store.record_files(conn, "coco", [downloaded("/d/a.zip", sha256="f" * 64), broken])

    assert rows(conn, "coco") == {"/d/a.zip": ("downloaded", "a" * 64, None, 0)}


def test_the_files_digest_changes_with_the_data_only(conn: duckdb.DuckDBPyConnection) -> None:
    store.record_files(conn, "coco", [downloaded("/d/a.zip"), downloaded("/d/b.zip", sha256="b" * 64)])
    first = store.files_digest(conn, "coco")

    # verified again by a later run, with other timings: the same data
    again = [FileResult("u", p, "skipped", bytes=10, sha256=s, seconds=9.0, attempts=3, mtime_ns=2)
             for p, s in (("/d/a.zip", "a" * 64), ("/d/b.zip", "b" * 64))]  # fmt: skip
    store.record_files(conn, "coco", again)
    assert store.files_digest(conn, "coco") == first
    store.record_files(conn, "vqav2", [downloaded("/d/x.zip")])  # another dataset
    assert store.files_digest(conn, "coco") == first

    store.record_files(conn, "coco", [downloaded("/d/b.zip", sha256="c" * 64)])  # the file changed upstream
    changed = store.files_digest(conn, "coco")
    assert changed != first
    store.record_files(conn, "coco", [FileResult("u", "/d/b.zip", "failed", error="HTTP 503")])
    assert store.files_digest(conn, "coco") not in (first, changed)
    store.record_shards(conn, "coco", "list.tsv", [shard(0, 1.0)])  # a URL list's shard is data too
    assert store.files_digest(conn, "coco") not in (first, changed)


def test_a_shard_found_finished_keeps_the_time_of_the_run_that_wrote_it(conn: duckdb.DuckDBPyConnection) -> None:
    store.record_shards(conn, "cc3m", "list.tsv", [shard(0, 2.5), shard(1, 3.5)])
    written = conn.execute("SELECT shard, updated_at FROM datasets.shards ORDER BY shard").fetchall()

    store.record_shards(conn, "cc3m", "list.tsv", [shard(0, None), shard(1, 1.5, in_place=4)])

    got = conn.execute("SELECT shard, seconds, in_place, error_kinds, updated_at FROM datasets.shards ORDER BY shard")
    (s0, seconds0, in_place0, kinds0, at0), (s1, seconds1, in_place1, kinds1, at1) = got.fetchall()
    assert (s0, seconds0, in_place0, kinds0, at0) == (0, 2.5, 3, '{"http_404": 1}', written[0][1])
    assert (s1, seconds1, in_place1, kinds1) == (1, 1.5, 4, "{}")
    assert at1 >= written[1][1]


def test_shards_a_changed_list_no_longer_makes_are_dropped_from_that_list_only(
    conn: duckdb.DuckDBPyConnection,
) -> None:
    store.record_shards(conn, "cc3m", "train.tsv", [shard(i, 1.0, list_path="train.tsv") for i in range(3)])
    store.record_shards(conn, "cc3m", "val.tsv", [shard(i, 1.0, list_path="val.tsv") for i in range(2)])

    store.record_shards(conn, "cc3m", "train.tsv", [shard(0, None, list_path="train.tsv")])  # the list got shorter

    left = conn.execute("SELECT list, shard FROM datasets.shards ORDER BY list, shard").fetchall()
    assert left == [("train.tsv", 0), ("val.tsv", 0), ("val.tsv", 1)]


def test_forgetting_files_under_a_folder_spares_the_kept_ones_and_its_neighbours(
    conn: duckdb.DuckDBPyConnection,
) -> None:
    # /d/shards/a/extra/: the shards of list a/extra.tsv, inside list a.tsv's shards folder
    paths = ["/d/shards/a/0.tar", "/d/shards/a/1.tar", "/d/shards/ab/0.tar", "/d/shards/a/extra/0.tar", "/d/list.tsv"]
    store.record_files(conn, "cc3m", [downloaded(p) for p in paths])

    store.forget_files_under(conn, "cc3m", Path("/d/shards/a"), keep=["/d/shards/a/0.tar"])

    assert list(rows(conn, "cc3m")) == ["/d/list.tsv", "/d/shards/a/0.tar", "/d/shards/a/extra/0.tar",
                                        "/d/shards/ab/0.tar"]  # fmt: skip


@pytest.mark.parametrize(
    ("statuses", "manual", "status"),
    [
        (["downloaded", "skipped"], False, "complete"),
        (["downloaded", "failed"], False, "partial"),
        (["failed", "failed"], False, "failed"),
        ([], True, "manual"),
    ],
)
def test_summary_status(statuses: list[str], manual: bool, status: str) -> None:
    results = [FileResult("u", f"/d/{i}", s, bytes=0 if s == "failed" else 100) for i, s in enumerate(statuses)]

    summary = store.summarize("coco", results, 10**9, 1.0, manual=manual)

    counts = Counter(statuses)
    assert summary.status == status
    assert (summary.downloaded, summary.failed, summary.skipped) == (counts["downloaded"], counts["failed"],
                                                                     counts["skipped"])  # fmt: skip
    assert summary.bytes_on_disk == 100 * (len(statuses) - statuses.count("failed"))


def test_a_url_list_summary_with_no_image_in_place_has_failed() -> None:
    images = Counter(downloaded=0, failed=40, skipped=0, bytes=0)

    summary = store.summarize("cc3m", [downloaded("/d/list.tsv", size=40)], None, 2.0, images=images)

    assert (summary.status, summary.downloaded, summary.failed, summary.total) == ("failed", 1, 40, 41)
    assert store.summarize("cc3m", [downloaded("/d/list.tsv", size=40)], None, 2.0, images=Counter()).status == (
        "complete"  # an empty list: nothing listed, nothing failed
    )


def test_a_url_list_summary_counts_its_images(conn: duckdb.DuckDBPyConnection) -> None:
    images = Counter(downloaded=90, failed=8, skipped=2, bytes=5000)

    summary = store.summarize("cc3m", [downloaded("/d/list.tsv", size=40)], None, 2.0, images=images)
    store.record_summary(conn, summary)

    assert (summary.status, summary.downloaded, summary.failed, summary.skipped, summary.total) == (
        "partial", 91, 8, 2, 101)  # fmt: skip
    assert summary.success_rate == pytest.approx(93 / 101)
    assert summary.report_row() == ("cc3m", "partial", 91, 8, 2, 101, "92.1%", "-")
    stored = conn.execute("SELECT status, success_rate, bytes_on_disk FROM datasets.download_summary").fetchall()
    assert stored == [("partial", pytest.approx(93 / 101), 5040)]


def test_the_summary_digest_ignores_timings(conn: duckdb.DuckDBPyConnection) -> None:
    store.record_summary(conn, store.summarize("coco", [downloaded("/d/a.zip")], None, 3.0))
    first = store.summary_digest(conn)

    store.record_summary(conn, store.summarize("coco", [downloaded("/d/a.zip")], None, 9.0))
    assert store.summary_digest(conn) == first
    store.record_summary(conn, store.summarize("coco", [FileResult("u", "/d/a.zip", "failed")], None, 9.0))
    assert store.summary_digest(conn) != first
