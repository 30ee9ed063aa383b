"""Talking to W&B: the GraphQL documents the project sends, the client that sends them through the SDK, and the
run listings (pages, heavy fields by name, the sensors' poll).

Through the wandb SDK: `wandb.Api` does the login (WANDB_API_KEY, WANDB_BASE_URL, netrc) and its wandb-core sidecar
makes every request, GraphQL and file downloads alike, with its retries, Retry-After and the API key (sent only to
the W&B host). The queries are written out because the SDK's run objects ask one more request per run; each is
valid against W&B's schema (the tests check every document against it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from mvdata_assets import defaults
from mvdata_assets.runs.store import RunKey
from mvdata_assets.runs.values import parse_json

PAGE_RUNS = 500  # runs per listing page (light fields only)
DOWNLOAD_TIMEOUT_S = 600.0  # one export or run file, through wandb-core
LIVE_STATES = ("running", "pending", "preempting")


# what the SDK's listing asks for (wandb/apis/public/runs.py, LightweightRunFragment), less what never changes
LIGHT_FIELDS = """name displayName state createdAt heartbeatAt tags group jobType sweepName commit description notes
    historyLineCount user { username }"""


HEAVY_FIELDS = "name config summaryMetrics systemMetrics historyKeys"
POLL_FIELDS = "name state heartbeatAt historyLineCount"


RUNS_QUERY = """query Runs($project: String!, $entity: String!, $cursor: String, $perPage: Int, $order: String,
        $filters: JSONString) {
    project(name: $project, entityName: $entity) {
        runs(filters: $filters, after: $cursor, first: $perPage, order: $order) {
            edges { node { FIELDS } cursor }
            pageInfo { endCursor hasNextPage }
        }
    }
}"""


# a sensor tick: the run count and the newest run (new runs), and the runs live now or at the last tick
POLL_QUERY = """query RunsPoll($project: String!, $entity: String!, $cursor: String, $perPage: Int,
        $filters: JSONString) {
    project(name: $project, entityName: $entity) {
        runCount
        newest: runs(order: "-created_at", first: 1) { edges { node { name } } }
        runs(filters: $filters, after: $cursor, first: $perPage) {
            edges { node { FIELDS } cursor }
            pageInfo { endCursor hasNextPage }
        }
    }
}""".replace("FIELDS", POLL_FIELDS)


PARQUET_QUERY = """query RunParquetHistory($project: String!, $entity: String!, $run: String!, $liveKeys: [String!]!) {
    project(name: $project, entityName: $entity) {
        run(name: $run) { parquetHistory(liveKeys: $liveKeys) { parquetUrls liveData } }
    }
}"""


HISTORY_QUERY = """query HistoryPage($project: String!, $entity: String!, $run: String!, $minStep: Int64!,
        $maxStep: Int64!, $pageSize: Int!) {
    project(name: $project, entityName: $entity) {
        run(name: $run) { history(minStep: $minStep, maxStep: $maxStep, samples: $pageSize) }
    }
}"""


FILES_QUERY = """query RunFiles($project: String!, $entity: String!, $run: String!, $names: [String]) {
    project(name: $project, entityName: $entity) {
        run(name: $run) { files(names: $names) { edges { node { name url sizeBytes } } } }
    }
}"""


SWEEP_QUERY = """query Sweep($project: String!, $entity: String!, $name: String!) {
    project(name: $project, entityName: $entity) {
        sweep(sweepName: $name) { name displayName state config }
    }
}"""


DOCUMENTS = (RUNS_QUERY.replace("FIELDS", LIGHT_FIELDS), RUNS_QUERY.replace("FIELDS", HEAVY_FIELDS), POLL_QUERY,
             PARQUET_QUERY, HISTORY_QUERY, FILES_QUERY, SWEEP_QUERY)  # fmt: skip


class ApiSourceError(RuntimeError):
    """A whole source can't be read (a bad API key, an unknown project): one clear message, no secret in it."""


class RunVanished(RuntimeError):
    """A listed run that W&B no longer has (deleted during the sync): the next listing marks it deleted."""


class Client:
    """GraphQL and file downloads through the SDK's wandb-core sidecar: a GraphQL request is bounded to `timeout_s`,
    a download (a parquet export, a run file: maybe large) to DOWNLOAD_TIMEOUT_S."""

    def __init__(self, timeout_s: float = defaults.API_TIMEOUT_S) -> None:
        import wandb  # imported only when an API source is configured: the SDK is slow to import

        self.timeout_s = timeout_s
        try:
            self.api = wandb.Api(timeout=max(1, round(timeout_s)))
        except Exception as exc:  # noqa: BLE001 - the SDK raises several types for a refused login
            base = os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url
            raise ApiSourceError(f"W&B login at {base} failed: {without_secrets(str(exc))}") from None
        self.service = self.api._service_api  # noqa: SLF001 - the SDK's own transport; no public raw GraphQL in 0.31

    def graphql(self, query: str, variables: dict) -> dict:
        return self.service.execute_graphql(query, variables, timeout=self.timeout_s)

    def download(self, url: str, dest: Path, size: int = 0) -> None:
        """As the SDK's `File.download`: wandb-core fetches the URL, with the API key when it is W&B's own host."""
        from wandb.proto import wandb_api_pb2 as apb

        request = apb.DownloadFileRequest(path=str(dest), url=url, size=size)
        self.service.send_api_request(apb.ApiRequest(download_file_request=request), timeout=DOWNLOAD_TIMEOUT_S)

    def run_url(self, key: RunKey) -> str:
        """The run's page, built as the SDK's `Run.url` from the SDK's app URL (wandb.ai, its default server, or a
        self-hosted one: `WANDB_APP_URL` overrides)."""
        entity, project, run_id = (quote(part, safe="") for part in key)
        return f"{self.service.app_url}{entity}/{project}/runs/{run_id}"


def without_secrets(text: str) -> str:
    key = os.environ.get("WANDB_API_KEY")
    return text.replace(key, "***") if key else text


def _pages(client: Client, query: str, variables: dict, per_page: int) -> Iterator[dict]:
    """The `project` of each page of a runs listing, paged with the last edge's cursor as the SDK pages."""
    entity, project = variables["entity"], variables["project"]
    cursor = None
    while True:
        data = client.graphql(query, {**variables, "cursor": cursor, "perPage": per_page})
        found = data.get("project")
        if not found:
            raise ApiSourceError(f"W&B project {entity}/{project} was not found (or this API key can't see it)")
        yield found
        runs = found.get("runs") or {}
        edges = runs.get("edges") or []
        following = (edges[-1] or {}).get("cursor") if edges else None
        if not (runs.get("pageInfo") or {}).get("hasNextPage") or not following or following == cursor:
            return  # the last page, or a page W&B says is not the last but gives nothing to go on from
        cursor = following


def _nodes(runs: dict | None) -> Iterator[dict]:
    for edge in (runs or {}).get("edges") or []:
        if edge and edge.get("node"):
            yield edge["node"]


def list_runs(
    client: Client, entity: str, project: str, filters: dict, fields: str = LIGHT_FIELDS, per_page: int | None = None
) -> Iterator[dict]:
    variables = {"entity": entity, "project": project, "order": "+created_at", "filters": json.dumps(filters)}
    for page in _pages(client, RUNS_QUERY.replace("FIELDS", fields), variables, per_page or PAGE_RUNS):
        yield from _nodes(page.get("runs"))


def run_details(client: Client, entity: str, project: str, names: Sequence[str]) -> dict[str, dict]:
    """The heavy fields of the named runs, by name (a run deleted meanwhile is missing)."""
    nodes = list_runs(client, entity, project, {"name": {"$in": list(names)}}, HEAVY_FIELDS, per_page=len(names))
    return {node["name"]: node for node in nodes}


def split_project(path: str) -> tuple[str, str]:
    """(entity, project) of an MVDATA_WANDB_PROJECTS entry; ValueError naming it when it is not `entity/project`."""
    entity, _, project = path.partition("/")
    if not entity or not project or "/" in project:
        raise ValueError(f"MVDATA_WANDB_PROJECTS: {path!r} is not entity/project")
    return entity, project


def poll_project(client: Client, path: str, last: dict | None) -> tuple[list[str], int, dict]:
    """What changed in one project since the last sensor tick: (runs changed, runs new, the project's new cursor).

    One light request: the run count and the newest run tell new runs; the runs live now or live at the last tick
    tell live runs moving on (history, heartbeat) and ending (their state). Filters use only keys the SDK documents
    for `Api.runs` (`state`, `name`), so the cursor never holds a value a server could refuse.
    """
    entity, project = split_project(path)
    was_live = sorted((last or {}).get("live", {}))
    live_filter: dict = {"state": {"$in": list(LIVE_STATES)}}
    filters = {"$or": [live_filter, {"name": {"$in": was_live}}]} if was_live else live_filter
    variables = {"entity": entity, "project": project, "filters": json.dumps(filters)}
    count, newest, seen = 0, None, {}
    for i, page in enumerate(_pages(client, POLL_QUERY, variables, PAGE_RUNS)):
        if i == 0:
            count = page.get("runCount") or 0
            newest = next((node["name"] for node in _nodes(page.get("newest"))), None)
        for node in _nodes(page.get("runs")):
            seen[node["name"]] = [node.get("state"), node.get("heartbeatAt"), node.get("historyLineCount")]
    cursor = {"count": count, "newest": newest, "live": {n: s for n, s in seen.items() if s[0] in LIVE_STATES}}
    if last is None:
        return [], count, cursor
    before = last.get("live", {})
    changed = [f"{path}/{name}" for name, now in seen.items() if name in before and before[name] != now]
    changed += [f"{path}/{name}" for name in before if name not in seen]  # deleted while live
    changed += [
        f"{path}/{name}"
        for name, now in seen.items()
        if name not in before and now[0] in LIVE_STATES and name != newest
    ]  # fmt: skip - resumed, or new behind the newest
    new = max(count - last.get("count", 0), int(newest != last.get("newest")))
    return sorted(set(changed)), new, cursor


def field_json(value: Any) -> Any:
    """W&B sends config, summary, system metrics and history keys as JSON strings (NaN written bare), or null."""
    loaded = parse_json(value) if isinstance(value, str) else value
    return loaded if isinstance(loaded, dict) else {}


def last_step(node: dict) -> int:
    """W&B's last logged step: `historyKeys.lastStep`, else the summary's `_step`; -1 for none."""
    step = field_json(node.get("historyKeys")).get("lastStep")
    if not isinstance(step, int | float):
        step = field_json(node.get("summaryMetrics")).get("_step")
    return int(step) if isinstance(step, int | float) else -1
