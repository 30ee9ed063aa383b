"""URL-list images in parts (MVDATA_IMAGE_PART_SHARDS > 0), for lists that outgrow one machine.

For each URL-list dataset `X` three assets then stand in for one:
- `datasets/X` downloads the list files and plans them (stale shards removed, shards counted), and adds one
  partition of `datasets/X_images` per MVDATA_IMAGE_PART_SHARDS shards of each list;
- `datasets/X_images`, partitioned: each partition fetches its shards, wherever the executor runs it, and writes
  only shard tars and their parquet under the data root (storage every machine shares);
- `datasets/X_shards` records every finished shard in the warehouse, with the dataset's summary: the one writer, so
  DuckDB never has two.

Dagster wiring only: the work is in download.py and url_lists.py.
"""

from pathlib import Path

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    Config,
    DataVersion,
    DynamicPartitionsDefinition,
    MaterializeResult,
    MetadataValue,
    asset,
)

from mvdata_assets.datasets import store
from mvdata_assets.datasets.catalog import IMAGES_SUFFIX, SHARDS_SUFFIX, Dataset
from mvdata_assets.datasets.download import fetch_image_part, record_image_parts
from mvdata_assets.datasets.metadata import dataset_metadata, images_fetched_check, images_metadata
from mvdata_assets.datasets.url_lists import ListPlan
from mvdata_assets.resources import DatasetsResource
from mvdata_assets.warehouse import DATASETS_GROUP as GROUP
from mvdata_assets.warehouse import WarehouseResource

# a partition key is `<list path>@<plan version>@<first shard>-<last shard>`: a list that changes (or is read
# otherwise) gets new keys, so Dagster shows its partitions as not materialised yet
SPAN = "@"
CELERY_QUEUE, IMAGES_QUEUE = "dagster-celery/queue", "images"  # the tag dagster-celery routes a step by, and where


def images_key(name: str) -> AssetKey:
    return AssetKey([GROUP, name + IMAGES_SUFFIX])


def shards_key(name: str) -> AssetKey:
    return AssetKey([GROUP, name + SHARDS_SUFFIX])


def image_partitions(name: str) -> DynamicPartitionsDefinition:
    return DynamicPartitionsDefinition(name=f"{name}_images")


def part_keys(plans: dict[str, ListPlan], per_part: int) -> list[str]:
    """The partition keys of planned lists: one per `per_part` shards of each list, in list and shard order."""
    return [
        f"{listed}{SPAN}{plan.version}{SPAN}{first:05d}-{min(first + per_part, plan.shards) - 1:05d}"
        for listed, plan in plans.items()
        for first in range(0, plan.shards, per_part)
    ]


def shards_of(key: str) -> tuple[str, str, range]:
    """The list, the plan version and the shard indexes of a partition key."""
    rest, _, span = key.rpartition(SPAN)
    listed, _, version = rest.rpartition(SPAN)
    first, _, last = span.partition("-")
    return listed, version, range(int(first), int(last) + 1)


def register_parts(context: AssetExecutionContext, name: str, plans: dict[str, ListPlan], per_part: int) -> dict:
    """Adds the partitions of the planned lists and deletes the ones an earlier plan of those lists made (a list
    that changed makes other shards); a list not planned this time (its file failed) keeps its partitions."""
    partitions = image_partitions(name).name
    wanted = part_keys(plans, per_part)
    existing = set(context.instance.get_dynamic_partitions(partitions))
    stale = sorted(key for key in existing - set(wanted) if shards_of(key)[0] in plans)
    for key in stale:
        context.instance.delete_dynamic_partition(partitions, key)
    added = [key for key in wanted if key not in existing]
    if added:
        context.instance.add_dynamic_partitions(partitions, added)
    context.log.info(f"{name}: {len(wanted)} image partitions ({len(added)} new, {len(stale)} removed): backfill "
                     f"datasets/{name}_images, then materialise datasets/{name}_shards")  # fmt: skip
    return {
        "image_partitions": len(wanted),
        "image_partitions_added": len(added),
        "image_partitions_removed": len(stale),
        "list_rows": MetadataValue.json({listed: plan.rows for listed, plan in plans.items()}),
    }


class ImagesConfig(Config):
    retry_failed: bool = False
    """Fetch the images that failed in this part's finished shards again, and rewrite those shards."""


def build_images_asset(dataset: Dataset) -> AssetsDefinition:
    @asset(
        key=images_key(dataset.name),
        group_name=GROUP,
        kinds={"download"},
        deps=[AssetKey([GROUP, dataset.name])],
        partitions_def=image_partitions(dataset.name),
        # on a cluster (cluster.py) the partitions go to the Celery queue of the image workers; every other step
        # stays on the one worker beside the warehouse
        op_tags={CELERY_QUEUE: IMAGES_QUEUE},
        description=f"The images of {dataset.name}'s URL lists, a range of shards per partition: tars and their "
        f"parquet under the data root, recorded in the warehouse by datasets/{dataset.name}_shards.",
    )
    def _images(context: AssetExecutionContext, config: ImagesConfig, datasets: DatasetsResource) -> MaterializeResult:
        listed, version, shards = shards_of(context.partition_key)
        run = fetch_image_part(dataset, Path(datasets.data_root), listed, version, shards,
                               datasets.image_options(config.retry_failed))  # fmt: skip
        context.log.info(f"{dataset.name}: {listed} shards {shards.start}-{shards.stop - 1}: {run.downloaded} "
                         f"images downloaded, {run.skipped} already in shards, {run.failed} failed")  # fmt: skip
        return MaterializeResult(
            metadata={
                "images_downloaded": run.downloaded,
                "images_failed": run.failed,
                "images_skipped": run.skipped,
                "images_per_second": MetadataValue.float(round(run.images_per_second, 1)),
                "shards": MetadataValue.json({f"{s.index:05d}": s.state for s in run.shards}),
                # another run of this partition (a step the broker started again) was writing them
                "shards_left_to_another_run": MetadataValue.json(run.busy),
            }
        )

    return _images


def build_shards_asset(dataset: Dataset) -> AssetsDefinition:
    key = shards_key(dataset.name)

    @asset(
        key=key,
        group_name=GROUP,
        kinds={"duckdb"},
        deps=[images_key(dataset.name)],
        description=f"{dataset.name}'s finished image shards in datasets.files and datasets.shards, and its summary: "
        "the one warehouse writer of the parts.",
        check_specs=[
            AssetCheckSpec("all_parts_finished", asset=key, description="Every planned shard is finished."),
            AssetCheckSpec("images_fetched", asset=key, description="Every image of the URL lists is in a shard."),
        ],
    )
    def _shards(context: AssetExecutionContext, warehouse: WarehouseResource, datasets: DatasetsResource):
        run = record_image_parts(dataset, Path(datasets.data_root), warehouse.get_connection, warehouse.lock_timeout_s)
        planned = sum(plan.shards for plan in run.plans.values())
        finished = sum(len(listed.run.shards) for listed in run.lists)
        with warehouse.get_connection() as conn:
            version = DataVersion(store.files_digest(conn, dataset.name))
        yield MaterializeResult(
            metadata=dataset_metadata(run) | images_metadata(run) | {"shards_planned": planned},
            data_version=version,
        )
        yield AssetCheckResult(
            check_name="all_parts_finished",
            passed=finished == planned,
            severity=AssetCheckSeverity.ERROR,
            metadata={"finished": finished, "planned": planned},
        )
        yield images_fetched_check(run)

    return _shards
