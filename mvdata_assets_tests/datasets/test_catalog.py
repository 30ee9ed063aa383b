"""The bundled catalog is valid and complete, and every validation rule catches the mistake it exists for."""

from __future__ import annotations

import importlib.util
import re
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from mvdata_assets.datasets import catalog
from mvdata_assets.datasets.catalog import BUNDLED_CATALOG, CatalogError, CatalogFile, Dataset, UrlList, load_catalog

EXPECTED_DATASETS = {
    "coco",
    "coco2014",
    "vqav2",
    "okvqa",
    "aokvqa",
    "gqa",
    "textvqa",
    "visual_genome",
    "llava_instruct",
    "llava_pretrain",
    "refcoco",
    "refcoco_plus",
    "refcocog",
    "scienceqa",
    "cc3m",
    "cc12m",
    "sbu",
    "flickr30k",
    "ocr_vqa",
}

# A valid file entry the bad-catalog cases start from.
GOOD_FILE = {"url": "https://example.org/data/a.zip", "size": 10, "extract": True}


@pytest.fixture(scope="module")
def bundled() -> dict[str, Dataset]:
    return load_catalog()


def _file_by_name(dataset: Dataset, name: str) -> CatalogFile:
    matches = [f for f in dataset.files if f.path.rsplit("/", 1)[-1] == name]
    assert len(matches) == 1, f"{dataset.name} has {len(matches)} files named {name}"
    return matches[0]


def write_catalog(tmp_path: Path, datasets: object, name: str = "catalog.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"datasets": datasets}, sort_keys=False), encoding="utf-8")
    return path


def catalog_errors(path: Path) -> list[str]:
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    assert str(info.value) == "\n".join(info.value.errors)
    return info.value.errors


# --- the bundled catalog ---------------------------------------------------------------------------------------


def test_bundled_catalog_has_every_dataset(bundled: dict[str, Dataset]) -> None:
    assert BUNDLED_CATALOG.name == "catalog.yaml" and BUNDLED_CATALOG.is_file()
    assert set(bundled) == EXPECTED_DATASETS
    assert load_catalog(BUNDLED_CATALOG) == bundled  # explicit path and default agree


def test_coco_val2017_published_size_and_checksum(bundled: dict[str, Dataset]) -> None:
    val = _file_by_name(bundled["coco"], "val2017.zip")
    assert val.url == "http://images.cocodataset.org/zips/val2017.zip"
    assert val.size == 815585330
    assert val.sha256 == "4f7e2ccb2866ec5041993c9cf2a952bbed69647b115d0f74da7ce8f4bef82f05"
    assert val.extract is True


def test_coco2014_holds_the_images_vqa_and_refcoco_refer_to(bundled: dict[str, Dataset]) -> None:
    paths = {f.path for f in bundled["coco2014"].files}
    assert {"train2014.zip", "val2014.zip", "annotations_trainval2014.zip"} <= paths
    assert not any("2014" in f.path for f in bundled["coco"].files)


def test_every_checksum_is_well_formed(bundled: dict[str, Dataset]) -> None:
    sha256s = [f.sha256 for d in bundled.values() for f in d.files if f.sha256 is not None]
    assert len(sha256s) == 15  # COCO 2017 3 + 2014 3, TextVQA 3, Visual Genome 2, CC3M 2, CC12M 1, SBU 1
    assert all(re.fullmatch(r"[0-9a-f]{64}", s) for s in sha256s)
    assert len(set(sha256s)) == len(sha256s)  # a copy-paste slip would repeat one
    md5s = [f.md5 for d in bundled.values() for f in d.files if f.md5 is not None]
    assert all(re.fullmatch(r"[0-9a-f]{32}", m) for m in md5s)


def test_manual_datasets_need_instructions_not_files(bundled: dict[str, Dataset]) -> None:
    manual = {name for name, d in bundled.items() if d.access == "manual"}
    assert manual == {"flickr30k", "ocr_vqa"}
    for name in manual:
        assert bundled[name].instructions and bundled[name].files == ()
        assert bundled[name].est_size_bytes is None
    assert "hsankesara/flickr-image-dataset" in (bundled["flickr30k"].instructions or "")


def test_downloadable_datasets_have_files(bundled: dict[str, Dataset]) -> None:
    for dataset in bundled.values():
        if dataset.access != "manual":
            assert dataset.files, dataset.name
            assert all(f.url.startswith(("http://", "https://")) for f in dataset.files)


def test_cc3m_list_files_and_their_format(bundled: dict[str, Dataset]) -> None:
    cc3m = bundled["cc3m"]
    train = _file_by_name(cc3m, "GCC-training.tsv")
    assert train.url == "https://storage.googleapis.com/gcc-data/Train/GCC-training.tsv"
    assert train.size == 564607502 and train.extract is False
    assert _file_by_name(cc3m, "GCC-1.1.0-Validation.tsv").size == 2603670
    assert "caption<TAB>url" in cc3m.description and "no header" in cc3m.description.lower()


def test_hf_datasets_use_resolve_urls(bundled: dict[str, Dataset]) -> None:
    hf = {name for name, d in bundled.items() if d.access == "hf"}
    assert hf == {"llava_instruct", "llava_pretrain"}
    for name in hf:
        for f in bundled[name].files:
            assert re.fullmatch(r"https://huggingface\.co/datasets/[^/]+/[^/]+/resolve/main/.+", f.url), f.url


def test_refcoco_variants_use_archive_mirrors(bundled: dict[str, Dataset]) -> None:
    for name, file_name in [("refcoco", "refcoco.zip"), ("refcoco_plus", "refcoco+.zip"), ("refcocog", "refcocog.zip")]:
        (f,) = bundled[name].files
        assert f.url.startswith("https://web.archive.org/web/")
        assert f.url.endswith(f"bvisionweb1.cs.unc.edu/licheng/referit/data/{file_name}")
        assert f.path == file_name and f.extract


def test_est_size_bytes_sums_published_sizes(bundled: dict[str, Dataset]) -> None:
    assert bundled["coco"].est_size_bytes == 19336861798 + 815585330 + 252907541
    assert bundled["vqav2"].est_size_bytes is None  # no published sizes


def test_extract_only_on_archives(bundled: dict[str, Dataset]) -> None:
    for dataset in bundled.values():
        for f in dataset.files:
            if f.extract:
                assert f.path.endswith((".zip", ".tar", ".tar.gz", ".tgz")), f.path


# --- custom catalogs -------------------------------------------------------------------------------------------


def test_custom_catalog_loads_in_order_with_resolved_paths(tmp_path: Path) -> None:
    path = write_catalog(
        tmp_path,
        {
            "zeta": {
                "description": "last alphabetically, first in the file",
                "access": "public",
                "files": [
                    {"url": "https://example.org/dl/Images%20Part1.tar.gz?token=1", "size": 5, "extract": True},
                    {
                        "url": "https://example.org/x.json",
                        "path": "./meta//x.json",
                        "md5": "D41D8CD98F00B204E9800998ECF8427E",
                    },
                ],
            },
            "alpha": {"description": "manual one", "access": "manual", "instructions": "  ask Bob  "},
            "mid_1": {
                "description": "hf",
                "homepage": "https://huggingface.co/datasets/org/repo",
                "license": "CC BY 4.0",
                "access": "hf",
                "files": [{"url": "https://huggingface.co/datasets/org/repo/resolve/main/data/train.json", "size": 7}],
            },
        },
    )
    catalog = load_catalog(path)
    assert list(catalog) == ["zeta", "alpha", "mid_1"]
    first, second = catalog["zeta"].files
    assert first == CatalogFile(
        url="https://example.org/dl/Images%20Part1.tar.gz?token=1", path="Images Part1.tar.gz", size=5, extract=True
    )
    assert second.path == "meta/x.json"
    assert second.md5 == "d41d8cd98f00b204e9800998ecf8427e"  # lowercased
    assert catalog["zeta"].est_size_bytes == 5  # unknown sizes don't count
    assert catalog["alpha"].files == () and catalog["alpha"].instructions == "ask Bob"
    assert catalog["mid_1"].files[0].path == "train.json" and catalog["mid_1"].license == "CC BY 4.0"


def test_string_path_and_empty_datasets_mapping(tmp_path: Path) -> None:
    path = write_catalog(tmp_path, {})
    assert load_catalog(str(path)) == {}


# Each case: (dataset name, dataset body, expected "field: message" fragment after "dataset '<name>', ").
D = {"description": "d"}
BAD_DATASETS = [
    pytest.param("Bad-Name", {**D, "access": "manual", "instructions": "i"}, "name: must match", id="name"),
    pytest.param("refcoco+", {**D, "access": "manual", "instructions": "i"}, "name: must match", id="name-plus"),
    pytest.param(
        "download_summary", {**D, "access": "manual", "instructions": "i"}, "is the project's own asset", id="reserved"
    ),
    pytest.param("ds", {**D, "access": "torrent", "files": [GOOD_FILE]}, "access: must be one of", id="access"),
    pytest.param("ds", {"access": "public", "files": [GOOD_FILE]}, "description: required", id="no-description"),
    pytest.param("ds", {**D, "files": [GOOD_FILE]}, "access: required", id="no-access"),
    pytest.param("ds", {**D, "access": "manual"}, "instructions: required", id="manual-no-instructions"),
    pytest.param("ds", {**D, "access": "manual", "instructions": "  "}, "instructions: required", id="manual-blank"),
    pytest.param("ds", {**D, "access": "public"}, "files: at least one file", id="public-no-files"),
    pytest.param("ds", {**D, "access": "hf", "files": []}, "files: at least one file", id="hf-no-files"),
    pytest.param("ds", {**D, "access": "public", "files": "a.zip"}, "files: must be a list", id="files-not-list"),
    pytest.param(
        "ds", {**D, "access": "public", "files": ["https://x.org/a"]}, "files[0]: must be a mapping", id="file-str"
    ),
    pytest.param(
        "ds", {**D, "access": "public", "files": [GOOD_FILE], "licence": "MIT"}, "licence: unknown key", id="key"
    ),
    pytest.param(
        "ds", {**D, "access": "public", "homepage": "x.org", "files": [GOOD_FILE]}, "homepage: must be", id="home"
    ),
    pytest.param("ds", {**D, "access": "hf", "files": [GOOD_FILE]}, "files[0].url: access: hf needs", id="hf-url"),
    pytest.param("ds", "just a string", "must be a mapping of dataset fields", id="dataset-not-mapping"),
]


@pytest.mark.parametrize(("name", "body", "expected"), BAD_DATASETS)
def test_bad_dataset_is_rejected(tmp_path: Path, name: str, body: object, expected: str) -> None:
    path = write_catalog(tmp_path, {name: body})
    errors = catalog_errors(path)
    assert any(e.startswith(f"{path}: dataset {name!r}") and expected in e for e in errors), errors


# Each case: (file entry, expected "<field>: message" fragment for files[0]); the dataset around it is valid.
BAD_FILES = [
    pytest.param({"size": 1}, "url: required", id="url-missing"),
    pytest.param({"url": "ftp://x.org/a.zip"}, "url: must be an http(s) URL", id="url-scheme"),
    pytest.param({"url": "https:///a.zip"}, "url: must be an http(s) URL with a host", id="url-host"),
    pytest.param({"url": "x.org/a.zip"}, "url: must be an http(s) URL", id="url-relative"),
    pytest.param({"url": "https://x.org/"}, "path: required: the URL has no file name", id="url-no-basename"),
    pytest.param({**GOOD_FILE, "sha256": "4f7e2ccb2f05"}, "sha256: must be 64 hex digits", id="sha256-short"),
    pytest.param({**GOOD_FILE, "sha256": "g" * 64}, "sha256: must be 64 hex digits", id="sha256-nonhex"),
    pytest.param({**GOOD_FILE, "sha256": 1234}, "sha256: must be 64 hex digits", id="sha256-number"),
    pytest.param({**GOOD_FILE, "md5": "a" * 31}, "md5: must be 32 hex digits", id="md5-short"),
    pytest.param({**GOOD_FILE, "md5": "a" * 64}, "md5: must be 32 hex digits", id="md5-is-sha256"),
    pytest.param({**GOOD_FILE, "size": 0}, "size: must be a positive", id="size-zero"),
    pytest.param({**GOOD_FILE, "size": -5}, "size: must be a positive", id="size-negative"),
    pytest.param({**GOOD_FILE, "size": "815585330"}, "size: must be a whole number", id="size-string"),
    pytest.param({**GOOD_FILE, "size": 1.5}, "size: must be a whole number", id="size-float"),
    pytest.param({**GOOD_FILE, "size": True}, "size: must be a whole number", id="size-bool"),
    pytest.param({**GOOD_FILE, "path": "/etc/passwd"}, "path: must be relative", id="path-absolute"),
    pytest.param({**GOOD_FILE, "path": "C:/data/a.zip"}, "path: must be relative", id="path-drive"),
    pytest.param({**GOOD_FILE, "path": "../a.zip"}, "path: must not contain '..'", id="path-dotdot"),
    pytest.param({**GOOD_FILE, "path": "x/../../a.zip"}, "path: must not contain '..'", id="path-inner-dotdot"),
    pytest.param({**GOOD_FILE, "path": "sub\\a.zip"}, "path: must use / separators", id="path-backslash"),
    pytest.param({**GOOD_FILE, "path": ""}, "path: must not be empty", id="path-empty"),
    pytest.param({**GOOD_FILE, "path": "images/"}, "path: must name a file", id="path-folder"),
    pytest.param({"url": "https://x.org/a.json", "extract": True}, "extract: only .zip", id="extract-json"),
    pytest.param({"url": "https://x.org/a.tar.bz2", "extract": True}, "extract: only .zip", id="extract-bz2"),
    pytest.param({**GOOD_FILE, "path": "a.json"}, "extract: only .zip", id="extract-uses-path"),
    pytest.param({**GOOD_FILE, "extract": "yes please"}, "extract: must be true or false", id="extract-string"),
    pytest.param({**GOOD_FILE, "sha": "a" * 64}, "sha: unknown key", id="unknown-file-key"),
]


@pytest.mark.parametrize(("entry", "expected"), BAD_FILES)
def test_bad_file_is_rejected(tmp_path: Path, entry: dict[str, object], expected: str) -> None:
    path = write_catalog(tmp_path, {"coco": {"description": "d", "access": "public", "files": [entry]}})
    errors = catalog_errors(path)
    assert any(e.startswith(f"{path}: dataset 'coco', files[0].{expected}") for e in errors), errors


@pytest.mark.parametrize("archive", ["a.zip", "a.tar", "a.tar.gz", "a.tgz", "A.ZIP"])
def test_extract_accepts_archives(tmp_path: Path, archive: str) -> None:
    path = write_catalog(
        tmp_path,
        {
            "ds": {
                "description": "d",
                "access": "public",
                "files": [{"url": f"https://x.org/{archive}", "extract": True}],
            }
        },
    )
    assert load_catalog(path)["ds"].files[0].extract is True


def test_duplicate_paths_within_a_dataset(tmp_path: Path) -> None:
    files = [
        {"url": "https://a.org/v1/images.zip"},
        {"url": "https://b.org/v2/images.zip"},  # same default basename
        {"url": "https://c.org/x.json", "path": "./images.zip"},  # same after normalising
    ]
    other = {"description": "d", "access": "public", "files": [{"url": "https://a.org/v1/images.zip"}]}
    path = write_catalog(tmp_path, {"gqa": {"description": "d", "access": "public", "files": files}, "vg": other})
    errors = catalog_errors(path)
    assert errors == [
        f"{path}: dataset 'gqa', files[1].path: duplicates files[0] ('images.zip')",
        f"{path}: dataset 'gqa', files[2].path: duplicates files[0] ('images.zip')",
    ]  # the same path in another dataset is fine


def test_all_errors_reported_together(tmp_path: Path) -> None:
    path = write_catalog(
        tmp_path,
        {
            "coco": {
                "description": "d",
                "access": "public",
                "files": [
                    {"url": "https://example.org/a.zip", "sha256": "abc"},
                    {"url": "https://example.org/b.json", "size": -1, "extract": True},
                ],
            },
            "refcoco+": {"description": "d", "access": "manual"},
            "good": {"description": "d", "access": "manual", "instructions": "x"},
            "gqa": {"description": "d", "access": "nope", "typo": 1},
        },
    )
    errors = catalog_errors(path)
    expected = [
        "dataset 'coco', files[0].sha256: must be 64 hex digits",
        "dataset 'coco', files[1].size: must be a positive",
        "dataset 'coco', files[1].extract: only",
        "dataset 'refcoco+', name: must match",
        "dataset 'refcoco+', instructions: required",
        "dataset 'gqa', access: must be one of",
        "dataset 'gqa', typo: unknown key",
    ]
    assert len(errors) == len(expected)
    for fragment, line in zip(expected, errors, strict=True):
        assert line.startswith(f"{path}: ") and fragment in line, (fragment, line)


# --- whole-file problems -----------------------------------------------------------------------------------------


def test_missing_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "catalog.yaml"
    errors = catalog_errors(missing)
    assert errors == [f"{missing}: catalog file not found"]


def test_a_catalog_path_that_is_a_folder_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "catalog.yaml"
    folder.mkdir()
    (error,) = catalog_errors(folder)
    assert error.startswith(f"{folder}: cannot read catalog: ") and "Is a directory" in error


def test_a_catalog_not_in_utf8_is_named(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("datasets: {}\n# caf\u00e9\n".encode("latin-1"))
    (error,) = catalog_errors(path)
    assert error.startswith(f"{path}: cannot read catalog: ") and "'utf-8' codec can't decode" in error


def test_broken_yaml_is_named_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("datasets:\n  coco:\n    files: [\n", encoding="utf-8")
    (error,) = catalog_errors(path)
    assert error.startswith(f"{path}: invalid YAML at line 4")


def test_duplicate_keys_are_not_silently_merged(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            datasets:
              coco: {description: first, access: manual, instructions: a}
              coco: {description: second, access: manual, instructions: b}
            """
        ),
        encoding="utf-8",
    )
    (error,) = catalog_errors(path)
    assert error.startswith(f"{path}: invalid YAML at line 3") and "duplicate key 'coco'" in error


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("", "top level must be a mapping with a 'datasets' mapping", id="empty"),
        pytest.param("- coco\n", "top level must be a mapping with a 'datasets' mapping", id="list"),
        pytest.param("dataset: {}\n", "top level must be a mapping with a 'datasets' mapping", id="typo"),
        pytest.param("datasets: [coco]\n", "'datasets' must be a mapping", id="datasets-list"),
        pytest.param("datasets: {}\nversion: 2\n", "top level: unknown key 'version'", id="unknown-top-key"),
    ],
)
def test_bad_top_level(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "top.yaml"
    path.write_text(text, encoding="utf-8")
    errors = catalog_errors(path)
    assert any(e.startswith(f"{path}: ") and expected in e for e in errors), errors


def test_yaml_tags_cannot_build_objects(tmp_path: Path) -> None:
    path = tmp_path / "evil.yaml"
    path.write_text("datasets: !!python/object/apply:os.system ['echo pwned']\n", encoding="utf-8")
    (error,) = catalog_errors(path)
    assert "invalid YAML" in error


def test_url_list_layouts_of_the_bundled_lists(bundled: dict[str, Dataset]) -> None:
    """CC3M is caption<TAB>url and CC12M url<TAB>caption, both headerless: the columns must say so."""
    cc3m, cc12m = bundled["cc3m"].url_list, bundled["cc12m"].url_list
    assert cc3m == UrlList(
        lists=("GCC-training.tsv", "GCC-1.1.0-Validation.tsv"),
        format="tsv",
        url_column=1,
        caption_column=0,
        header=False,
        shard_size=10_000,
    )
    assert cc12m is not None and (cc12m.url_column, cc12m.caption_column, cc12m.header) == (0, 1, False)
    sbu = bundled["sbu"].url_list  # parallel arrays in a JSON object inside the extracted archive
    assert sbu is not None and (sbu.format, sbu.lists, sbu.url_column, sbu.caption_column) == (
        "json",
        ("sbu-captions-all.json",),
        "image_urls",
        "captions",
    )
    assert all(d.url_list is None for name, d in bundled.items() if name not in ("cc3m", "cc12m", "sbu"))


URL_LIST_DATASET = {"description": "d", "access": "public", "files": [{"url": "https://x.org/list.tsv"}]}
BAD_URL_LISTS = [
    pytest.param({"url_column": 1}, "url_list.format: required", id="no-format"),
    pytest.param({"format": "csv", "url_column": 1}, "url_list.format: must be one of tsv, parquet", id="format"),
    pytest.param({"format": "tsv"}, "url_list.url_column: required", id="no-url-column"),
    pytest.param({"format": "tsv", "url_column": "url"}, "url_list.url_column: a TSV without header", id="tsv-name"),
    pytest.param({"format": "parquet", "url_column": 0}, "url_list.url_column: parquet columns are named", id="pq"),
    pytest.param({"format": "tsv", "url_column": -1}, "url_list.url_column: must be a 0-based", id="negative"),
    pytest.param({"format": "tsv", "url_column": True}, "url_list.url_column: must be a 0-based", id="bool"),
    pytest.param({"format": "tsv", "url_column": 1, "caption_column": 1}, "caption_column: is the same", id="same"),
    pytest.param({"format": "parquet", "url_column": "u", "header": True}, "url_list.header: only applies", id="hdr"),
    pytest.param({"format": "tsv", "url_column": 0, "shard_size": 0}, "url_list.shard_size: must be a pos", id="n"),
    pytest.param({"format": "tsv", "url_column": 0, "lists": ["other.tsv"]}, "lists[0]: 'other.tsv' is not", id="f"),
    pytest.param({"format": "tsv", "url_column": 0, "lists": ["../a.tsv"]}, "lists[0]: must not contain", id="up"),
    pytest.param({"format": "tsv", "url_column": 0, "columns": 2}, "url_list.columns: unknown key", id="key"),
    pytest.param("tsv", "url_list: must be a mapping", id="not-mapping"),
    pytest.param({"format": "json", "url_column": 0}, "url_list.url_column: json columns are named", id="json-index"),
    pytest.param(
        {"format": "tsv", "url_column": 0, "lists": ["list.tsv", "list.tsv"]},
        "url_list.lists[1]: would share the shard folder shards/list with lists[0]",
        id="same-folder",
    ),
    pytest.param({"format": "tsv", "url_column": 0, "decode": "yes"}, "url_list.decode: must be true or", id="dec"),
    pytest.param(
        {"format": "lines", "url_column": 0}, "url_list.url_column: does not apply to format: lines", id="lines-column"
    ),
    pytest.param(
        {"format": "lines", "captions": ["list.tsv", "list.tsv"]},
        "url_list.captions: needs one file per list (1), not 2",
        id="lines-captions",
    ),
    pytest.param({"format": "lines", "captions": ["c.txt"]}, "url_list.captions[0]: 'c.txt' is not a file", id="cf"),
    pytest.param(
        {"format": "tsv", "url_column": 0, "captions": ["list.tsv"]},
        "url_list.captions: only applies",
        id="tsv-captions",
    ),
]


@pytest.mark.parametrize("suffix", ["_images", "_shards"])
def test_a_name_taken_by_a_url_lists_images_in_parts_is_refused(tmp_path: Path, suffix: str) -> None:
    """cc_images would be the images asset of `cc` fetched in parts: Dagster would find two assets of one key."""
    cc = {**URL_LIST_DATASET, "url_list": {"format": "tsv", "url_column": 0}}
    path = write_catalog(tmp_path, {"cc": cc, f"cc{suffix}": {**D, "access": "manual", "instructions": "i"}})
    errors = catalog_errors(path)
    assert errors == [
        f"{path}: dataset 'cc{suffix}', name: is the asset datasets/cc{suffix} of URL-list dataset 'cc' when its "
        "images are fetched in parts; rename it"
    ]
    # beside a dataset that is not a URL list, the name is free
    plain = write_catalog(tmp_path, {"cc": {**D, "access": "manual", "instructions": "i"}, f"cc{suffix}": cc})
    assert set(load_catalog(plain)) == {"cc", f"cc{suffix}"}


@pytest.mark.parametrize(("url_list", "expected"), BAD_URL_LISTS)
def test_bad_url_list_is_rejected(tmp_path: Path, url_list: object, expected: str) -> None:
    path = write_catalog(tmp_path, {"cc": {**URL_LIST_DATASET, "url_list": url_list}})
    errors = catalog_errors(path)
    assert any(e.startswith(f"{path}: dataset 'cc', ") and expected in e for e in errors), errors


def test_url_list_columns_by_name_with_a_header(tmp_path: Path) -> None:
    spec = {"format": "tsv", "header": True, "url_column": "url", "caption_column": "caption", "shard_size": 5,
            "decode": True}  # fmt: skip
    url_list = load_catalog(write_catalog(tmp_path, {"cc": {**URL_LIST_DATASET, "url_list": spec}}))["cc"].url_list
    assert url_list == UrlList(("list.tsv",), "tsv", "url", "caption", header=True, shard_size=5, decode=True)


# --- where PyYAML has no libyaml ---------------------------------------------------------------------------------


@pytest.fixture
def catalog_without_libyaml(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """A second copy of catalog.py, imported as where PyYAML was built without libyaml (no CSafeLoader)."""
    monkeypatch.delattr(yaml, "CSafeLoader", raising=False)
    spec = importlib.util.spec_from_file_location("catalog_without_libyaml", catalog.__file__)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_without_libyaml_the_catalog_reads_the_same(catalog_without_libyaml: ModuleType, tmp_path: Path) -> None:
    pure = catalog_without_libyaml
    assert pure._UniqueKeyLoader.__bases__ == (yaml.SafeLoader,)  # the pure-Python parser
    assert [asdict(d) for d in pure.load_catalog().values()] == [asdict(d) for d in load_catalog().values()]
    duplicate = tmp_path / "dup.yaml"
    duplicate.write_text("datasets:\n  coco: {access: manual}\n  coco: {access: manual}\n", encoding="utf-8")
    with pytest.raises(pure.CatalogError) as info:
        pure.load_catalog(duplicate)
    assert info.value.errors == catalog_errors(duplicate)  # the refusal is the project's own: the same words
    broken = tmp_path / "broken.yaml"
    broken.write_text("datasets:\n  coco:\n    files: [\n", encoding="utf-8")
    with pytest.raises(pure.CatalogError) as info:
        pure.load_catalog(broken)
    # the two parsers word a syntax error differently; both name the file and the place
    (pure_error,), (error,) = info.value.errors, catalog_errors(broken)
    assert (
        pure_error.split(": ", 2)[:2] == error.split(": ", 2)[:2] == [str(broken), "invalid YAML at line 4, column 1"]
    )
