"""Sensors that notice new or changed W&B runs (offline run files, runs on the W&B API) and ask for a sync."""

import hashlib
import json

from dagster import (
    AssetSelection,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from mvdata_assets.resources import LOADED_SETTINGS, WandbResource
from mvdata_assets.runs.assets import GROUP
from mvdata_assets.runs.run_files import file_states
from mvdata_assets.runs.wandb_api import ApiSourceError, Client, poll_project, without_secrets


def _starts(source: object) -> DefaultSensorStatus:
    """Running by default where the sensors are on (MVDATA_WANDB_SENSOR) and this sensor's own source is set."""
    return DefaultSensorStatus.RUNNING if LOADED_SETTINGS.sensor_enabled and source else DefaultSensorStatus.STOPPED


@sensor(
    name="wandb_offline_runs",
    minimum_interval_seconds=LOADED_SETTINGS.sensor_interval_s,
    default_status=_starts(LOADED_SETTINGS.wandb_offline_dirs),
    asset_selection=AssetSelection.groups(GROUP),
    description="Polls MVDATA_WANDB_OFFLINE_DIRS (file sizes and mtimes only) and syncs when a run is new or grew.",
)
def wandb_offline_runs(context: SensorEvaluationContext, wandb: WandbResource) -> SensorResult | SkipReason:
    states = file_states(wandb.offline_paths)
    seen = json.loads(context.cursor) if context.cursor else {}
    changed = sorted(path for path, state in states.items() if seen.get(path) != state)
    if not changed:
        return SkipReason(f"{len(states)} run files, none new or changed since the last tick")
    # the key names this exact change: a retried tick never launches it twice, the next change launches again
    change = json.dumps([[path, *states[path]] for path in changed])
    run_key = hashlib.sha256(change.encode()).hexdigest()[:16]
    new = sum(1 for path in changed if path not in seen)
    context.log.info(f"{new} new and {len(changed) - new} changed run files")
    return SensorResult(
        run_requests=[
            RunRequest(
                run_key=run_key,
                tags={"mvdata/new_run_files": str(new), "mvdata/changed_run_files": str(len(changed) - new)},
            )
        ],
        cursor=json.dumps(states),
    )


@sensor(
    name="wandb_api_runs",
    minimum_interval_seconds=LOADED_SETTINGS.sensor_interval_s,
    default_status=_starts(LOADED_SETTINGS.wandb_projects),
    asset_selection=AssetSelection.groups(GROUP),
    description="Polls MVDATA_WANDB_PROJECTS (one light query a project: new runs, and the runs live now or at the "
    "last tick) and syncs when a run is new or changed.",
)
def wandb_api_runs(context: SensorEvaluationContext, wandb: WandbResource) -> SensorResult | SkipReason:
    if not wandb.projects:
        return SkipReason("MVDATA_WANDB_PROJECTS is not set")
    cursor = json.loads(context.cursor) if context.cursor else {}
    try:
        client = Client(timeout_s=wandb.api_timeout_s)
    except ApiSourceError as exc:  # the next tick tries again from the same cursor
        return SensorResult(skip_reason=str(exc), cursor=context.cursor)
    changed, new, failed = [], 0, []
    for path in wandb.projects:
        try:
            project_changed, project_new, cursor[path] = poll_project(client, path, cursor.get(path))
        except Exception as exc:  # noqa: BLE001 - one project's error never stops the others; its cursor stays
            failed.append(path)
            context.log.warning(f"{path}: {type(exc).__name__}: {without_secrets(str(exc))}")
            continue
        changed += project_changed
        new += project_new
    state = json.dumps(cursor, sort_keys=True)
    if not changed and not new:
        failures = f"; could not poll {', '.join(failed)} (see the tick's log)" if failed else ""
        return SensorResult(skip_reason=f"no run new or changed in {', '.join(wandb.projects)}{failures}",
                            cursor=state)  # fmt: skip
    run_key = hashlib.sha256(state.encode()).hexdigest()[:16]  # names this exact change: a retried tick is a no-op
    context.log.info(f"{new} new runs and {len(changed)} changed: {', '.join(changed[:10])}")
    return SensorResult(
        run_requests=[
            RunRequest(
                run_key=run_key, tags={"mvdata/new_api_runs": str(new), "mvdata/changed_api_runs": str(len(changed))}
            )
        ],
        cursor=state,
    )
