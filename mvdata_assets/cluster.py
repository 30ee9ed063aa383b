"""The project on a cluster: the same assets, each step a Celery task (dagster-celery; Redis as broker and result
backend), the Dagster instance on Postgres (cluster/dagster.yaml). docs/cluster.md says how to start it.

Two kinds of Celery worker take the steps, each started as `celery -A mvdata_assets.cluster worker`:
- one beside the warehouse, on queue `dagster`, one task at a time: every step that writes DuckDB, so the file has
  one writer and never leaves its machine;
- any number elsewhere, on queue `images`: the partitions of URL-list images (`datasets/<name>_images`, see
  datasets/parts.py), which write only shards under the shared MVDATA_HOME.

A task is acknowledged only once it ends (`task_acks_late`), so a worker killed mid-step leaves its step to another
worker once the broker's visibility timeout (MVDATA_CELERY_VISIBILITY_S) has passed; a partition started again
redoes only its unfinished shards. The timeout should outlast the longest step: a step still running past it is
started a second time elsewhere, which costs work but no data (a shard has one writer at a time, see url_lists.py).

Why Celery and not dagster-dask: dagster-dask names a step's Dask task after the job and the step alone
(dagster-io/dagster#21418), so the concurrent runs of a backfill, which share both, would be merged into one.
"""

import os

from dagster_celery import celery_executor
from dagster_celery.executor import CeleryExecutor
from dagster_celery.make_app import make_app
from dagster_celery.tasks import create_task

from mvdata_assets.definitions import project_definitions

BROKER = os.environ.get("MVDATA_CELERY_BROKER", "redis://localhost:6379/0")
BACKEND = os.environ.get("MVDATA_CELERY_BACKEND", "redis://localhost:6379/1")
VISIBILITY_S = int(os.environ.get("MVDATA_CELERY_VISIBILITY_S", "3600"))
CELERY = {
    "task_acks_late": True,  # a step's task stays in the broker until it ends, so a lost worker's step runs again
    "task_reject_on_worker_lost": True,
    "broker_transport_options": {
        "visibility_timeout": VISIBILITY_S,
        # the broker looks for lost tasks every tenth of the timeout (kombu's default sweep is every ~100 s)
        "unacked_restore_interval": max(1, VISIBILITY_S // 10),
        "unacked_restore_throttle": 1,
    },
}

defs = project_definitions(celery_executor.configured({"broker": BROKER, "backend": BACKEND, "config_source": CELERY}))

# what `celery -A mvdata_assets.cluster worker` runs: dagster-celery's step task, on an app configured as above
app = make_app(CeleryExecutor.for_cli(broker=BROKER, backend=BACKEND, config_source=CELERY).app_args())
execute_plan = create_task(app)
