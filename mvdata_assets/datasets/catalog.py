"""The dataset catalog: which files make up each dataset, and how to verify them.

The catalog is data (``catalog.yaml``); this module turns it into typed, validated objects (each field's rules are
in catalog_schema.py; the rules across fields and files are here). Validation is strict on
purpose: a typo in a key, a truncated checksum or a path escaping the dataset folder would otherwise surface hours
into a download, or never. Every problem in a catalog is reported at once, one per line, naming the file, the
dataset and the field. Plain Python: nothing here imports Dagster.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import ValidationError
from pydantic_core import PydanticCustomError

from mvdata_assets.datasets.catalog_schema import (
    ARCHIVE_SUFFIXES,
    SHARD_SIZE,
    Access,
    Column,
    DatasetModel,
    FileModel,
    ListFormat,
    UrlListModel,
    check_relative_path,
    messages,
    url_list_problems,
)

__all__ = [
    "ARCHIVE_SUFFIXES",
    "BUNDLED_CATALOG",
    "CatalogError",
    "CatalogFile",
    "Column",
    "Dataset",
    "UrlList",
    "load_catalog",
]

BUNDLED_CATALOG: Path = Path(__file__).with_name("catalog.yaml")

# Dataset names become Dagster asset keys, which allow only identifier characters.
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
RESERVED_NAMES = frozenset({"download_summary"})  # asset keys of the project's own in the datasets group
# a URL-list dataset `x` fetched in parts (MVDATA_IMAGE_PART_SHARDS) adds the assets x_images and x_shards (parts.py)
IMAGES_SUFFIX, SHARDS_SUFFIX = "_images", "_shards"
_HF_HOST = "huggingface.co"


class CatalogError(ValueError):
    """A catalog that can't be read or doesn't validate; ``errors`` holds one line per problem."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


@dataclass(frozen=True)
class CatalogFile:
    """One file of a dataset: where to get it, where it goes, and how to check it."""

    url: str
    path: str  # relative to the dataset folder, POSIX separators; defaults to the URL's basename
    size: int | None = None  # bytes, where published
    sha256: str | None = None  # lowercase hex
    md5: str | None = None  # lowercase hex
    extract: bool = False


def shards_folder(list_path: str) -> PurePosixPath:
    """Where a list's image shards go, inside its dataset's folder: `shards/<list path without suffix>`."""
    return PurePosixPath("shards") / PurePosixPath(list_path).with_suffix("")


@dataclass(frozen=True)
class UrlList:
    """How to read a dataset's image URL lists (CC3M, CC12M, LAION-style parquet) and shard what they point to.

    The columns are explicit because the lists disagree: CC3M is caption<TAB>url, CC12M url<TAB>caption, both
    without a header, so a guessed column would take every caption for a URL. SBU's `sbu-captions-all.json` is
    `json`: an object of parallel arrays (`image_urls`, `captions`). `lines` is one URL per line, with the captions
    line by line in a parallel file (the layout of torchvision's SBU archive).
    """

    lists: tuple[str, ...]  # the list files, relative to the dataset folder (default: every file of the dataset)
    format: ListFormat
    url_column: Column | None = None  # tsv and parquet only
    caption_column: Column | None = None
    header: bool = False  # TSV only: the first line names the columns
    shard_size: int = SHARD_SIZE  # images per WebDataset tar shard
    captions: tuple[str, ...] = ()  # lines only: per list, the file holding its captions line by line
    decode: bool = False  # decode every image fully (Pillow): catches corruption inside, costs CPU per image


@dataclass(frozen=True)
class Dataset:
    """One catalog entry; becomes one Dagster asset named after ``name``."""

    name: str
    description: str
    access: Access
    files: tuple[CatalogFile, ...] = ()
    homepage: str | None = None
    license: str | None = None
    instructions: str | None = None
    url_list: UrlList | None = None

    @property
    def est_size_bytes(self) -> int | None:
        """Sum of the published sizes (a lower bound when some are unknown); None when none is known."""
        sizes = [f.size for f in self.files if f.size is not None]
        return sum(sizes) if sizes else None


# --- loading ---------------------------------------------------------------------------------------------------


# libyaml's parser where PyYAML was built with it (its wheels are): the pure-Python one is several times slower, and
# every `dagster` command that loads the definitions pays it per catalog file entry
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _UniqueKeyLoader(_SafeLoader):
    """A safe loader that refuses duplicate keys: plain YAML silently keeps the last `coco:` of two."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:  # unhashable key: construct_mapping below reports it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _validate_dataset(name: str, raw: Any) -> tuple[Dataset | None, list[tuple[str, str]]]:
    """Validate one dataset entry; returns it (None if invalid) and every (field, message) problem found."""
    if not isinstance(raw, dict):
        return None, [("", "must be a mapping of dataset fields")]
    errors: list[tuple[str, str]] = []
    model: DatasetModel | None = None
    try:
        model = DatasetModel.model_validate(raw)
    except ValidationError as exc:
        errors.extend(messages(exc))

    # files are checked even when a dataset-level field is wrong, so one pass reports everything
    raw_files = raw.get("files")
    files: list[CatalogFile | None] = []
    if isinstance(raw_files, list):
        for i, raw_file in enumerate(raw_files):
            if not isinstance(raw_file, dict):
                errors.append((f"files[{i}]", "must be a mapping with at least a url"))
                files.append(None)
                continue
            try:
                fm = FileModel.model_validate(raw_file)
            except ValidationError as exc:
                errors.extend(messages(exc, prefix=f"files[{i}]"))
                files.append(None)
                continue
            assert fm.path is not None  # resolved from the URL by the validator
            files.append(
                CatalogFile(url=fm.url, path=fm.path, size=fm.size, sha256=fm.sha256, md5=fm.md5, extract=fm.extract)
            )

    first_index: dict[str, int] = {}
    for i, f in enumerate(files):
        if f is None:
            continue
        if f.path in first_index:
            errors.append((f"files[{i}].path", f"duplicates files[{first_index[f.path]}] ({f.path!r})"))
        else:
            first_index[f.path] = i

    access = raw.get("access")
    if access == "manual":
        instructions = raw.get("instructions")
        if instructions is None or (isinstance(instructions, str) and not instructions.strip()):
            errors.append(("instructions", "required for access: manual (say how to get the data by hand)"))
    elif access in ("public", "hf") and (raw_files is None or isinstance(raw_files, list)) and not raw_files:
        errors.append(("files", f"at least one file is required for access: {access}"))
    if access == "hf":
        for i, f in enumerate(files):
            if f is not None and (urlsplit(f.url).hostname != _HF_HOST or "/resolve/" not in urlsplit(f.url).path):
                errors.append(
                    (f"files[{i}].url", "access: hf needs https://huggingface.co/datasets/<repo>/resolve/<rev>/<file>")
                )

    url_list, url_list_errors = _validate_url_list(raw.get("url_list"), files)
    errors.extend(url_list_errors)

    if errors or model is None:
        return None, errors
    dataset = Dataset(
        name=name,
        description=model.description,
        access=model.access,
        files=tuple(f for f in files if f is not None),
        homepage=model.homepage,
        license=model.license,
        instructions=model.instructions.strip() if model.instructions else None,
        url_list=url_list,
    )
    return dataset, []


def _validate_url_list(raw: Any, files: list[CatalogFile | None]) -> tuple[UrlList | None, list[tuple[str, str]]]:
    """The `url_list` section: its own fields, then that each list is a file of the dataset (or inside an archive)."""
    if raw is None:
        return None, []
    if not isinstance(raw, dict):
        return None, [("url_list", "must be a mapping (format, url_column, ...)")]
    try:
        model = UrlListModel.model_validate(raw)
    except ValidationError as exc:
        return None, messages(exc, prefix="url_list")
    errors = [(f"url_list.{field}", message) for field, message in url_list_problems(model)]
    known = [f for f in files if f is not None]
    paths = [f.path for f in known]
    extracted = any(f.extract for f in known)
    named: dict[str, list[str]] = {"lists": [], "captions": []}
    for field, given_paths in (
        ("lists", model.lists if model.lists is not None else paths),
        ("captions", model.captions or []),
    ):
        for i, given in enumerate(given_paths):
            try:
                path = check_relative_path(given)
            except PydanticCustomError as exc:
                errors.append((f"url_list.{field}[{i}]", exc.message()))
                continue
            if path not in paths and not extracted:  # inside an archive it can't be checked before extraction
                errors.append((f"url_list.{field}[{i}]", f"{path!r} is not a file of this dataset"))
            named[field].append(path)
    folders: dict[str, int] = {}  # each list's images go to shards/<its path without suffix>
    for i, path in enumerate(named["lists"]):
        folder = str(shards_folder(path))
        if folder in folders:
            errors.append(
                (f"url_list.lists[{i}]", f"would share the shard folder {folder} with lists[{folders[folder]}]")
            )
        folders.setdefault(folder, i)
    if model.captions is not None and not errors and len(named["captions"]) != len(named["lists"]):
        wanted, given = len(named["lists"]), len(named["captions"])
        errors.append(("url_list.captions", f"needs one file per list ({wanted}), not {given}"))
    if errors:
        return None, errors
    url_list = UrlList(
        lists=tuple(named["lists"]),
        format=model.format,
        url_column=model.url_column,
        caption_column=model.caption_column,
        header=model.header,
        shard_size=model.shard_size,
        captions=tuple(named["captions"]),
        decode=model.decode,
    )
    return url_list, []


def _yaml_detail(exc: yaml.YAMLError) -> str:
    """' at line L, column C: problem' from a PyYAML error, without its multi-line source excerpt."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f" at line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"
    return f": {exc}"


def load_catalog(path: Path | str | None = None) -> dict[str, Dataset]:
    """Read and validate a catalog (the bundled one by default); datasets keep their YAML order.

    Raises CatalogError listing every problem, one per line, each starting with the catalog file's path.
    """
    source = Path(path) if path is not None else BUNDLED_CATALOG
    where = str(source)
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CatalogError([f"{where}: catalog file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CatalogError([f"{where}: cannot read catalog: {exc}"]) from exc
    try:
        doc = yaml.load(text, Loader=_UniqueKeyLoader)  # a safe loader: no arbitrary objects
    except yaml.YAMLError as exc:
        raise CatalogError([f"{where}: invalid YAML{_yaml_detail(exc)}"]) from exc

    if not isinstance(doc, dict) or "datasets" not in doc:
        raise CatalogError([f"{where}: top level must be a mapping with a 'datasets' mapping"])
    errors = [
        f"{where}: top level: unknown key {key!r} (only 'datasets' is allowed)" for key in doc if key != "datasets"
    ]
    raw_datasets = doc["datasets"]
    if not isinstance(raw_datasets, dict):
        raise CatalogError([*errors, f"{where}: 'datasets' must be a mapping of name -> dataset"])

    catalog: dict[str, Dataset] = {}
    for name, raw in raw_datasets.items():
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            errors.append(
                f"{where}: dataset {name!r}, name: must match {_NAME_RE.pattern} (it becomes a Dagster asset key)"
            )
        elif name in RESERVED_NAMES:
            errors.append(f"{where}: dataset {name!r}, name: is the project's own asset datasets/{name}; rename it")
        dataset, problems = _validate_dataset(str(name), raw)
        for field, message in problems:
            errors.append(
                f"{where}: dataset {name!r}, {field}: {message}" if field else f"{where}: dataset {name!r}: {message}"
            )
        if dataset is not None:
            catalog[name] = dataset
    part_assets = {o + suffix: o for o, d in catalog.items() if d.url_list for suffix in (IMAGES_SUFFIX, SHARDS_SUFFIX)}
    for name in sorted(catalog.keys() & part_assets.keys()):
        errors.append(f"{where}: dataset {name!r}, name: is the asset datasets/{name} of URL-list dataset "
                      f"{part_assets[name]!r} when its images are fetched in parts; rename it")  # fmt: skip
    if errors:
        raise CatalogError(errors)
    return catalog
