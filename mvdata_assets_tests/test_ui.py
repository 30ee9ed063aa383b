"""The UI end to end: a real `dagster dev`, its sensor daemon ingesting a new SDK-written run, and a headless browser.

One `dagster dev` serves the module (starting it costs ~15-40 s): its own DAGSTER_HOME and MVDATA_HOME under tmp,
a watched offline folder, the demo catalog served on loopback. Everything stays on 127.0.0.1: Dagster's telemetry
and its community pop-up (an iframe from the internet) are off, and the browser resolves no other host.
`dagster dev` ignores SIGTERM here, so it runs in its own session and the whole tree is SIGKILLed by PID at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import duckdb
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from mvdata_assets.demo import proc_table, serve_directory, wait_for_exit, write_demo_catalog, write_demo_files
from mvdata_assets_tests.runs.conftest import WRITER, writer_env

REPO = Path(__file__).resolve().parents[1]
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM = Path("/usr/bin/chromium")
DEMO_DATASETS = {"demo_coco": "complete", "demo_vqav2": "complete", "demo_cc3m": "complete", "demo_flickr30k": "manual"}
WANDB_EXPORTS = {"runs_history", "runs_metadata", "runs_metadata_config", "runs_metadata_summary"}
SERVER_START_S = 150  # `dagster dev` starts four processes; on a busy 2-core machine that takes a while
INGEST_S = 120
RUN_S = 120
RUNS_BY_TAGS = "query($t: [ExecutionTag!]) { runsOrError(filter: {tags: $t}) { ... on Runs { results { status } } } }"
T = TypeVar("T")


@dataclass(frozen=True)
class DagsterDev:
    url: str
    home: Path  # MVDATA_HOME
    runs_dir: Path  # the folder in MVDATA_WANDB_OFFLINE_DIRS
    artifacts: Path
    log: Path

    @property
    def warehouse(self) -> Path:
        return self.home / "warehouse.duckdb"

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else "(no log)"


# ---- helpers -----------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(what: str, timeout_s: float, probe: Callable[[], T | None], interval_s: float = 0.5) -> T:
    """Polls `probe` until it returns something truthy; fails naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def graphql(url: str, query: str, variables: dict | None = None) -> dict:
    request = urllib.request.Request(
        f"{url}/graphql",
        data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = json.load(response)
    assert "errors" not in answer, answer["errors"]
    return answer["data"]


def query_warehouse(path: Path, sql: str, params: list | None = None) -> list[tuple] | None:
    """Rows of `sql`, or None while the file or table isn't there yet or a writer holds the lock (one process only)."""
    try:
        conn = duckdb.connect(str(path), read_only=True)
    except duckdb.IOException:
        return None
    try:
        return conn.execute(sql, params or []).fetchall()
    except duckdb.CatalogException:
        return None
    finally:
        conn.close()


def _tree(root: int) -> set[int]:
    """`root`, its descendants and every process of its session (which stays even when a parent is gone)."""
    table = proc_table()
    found = {root} | {pid for pid, (_, sid, _) in table.items() if sid == root}
    grew = True
    while grew:
        children = {pid for pid, (ppid, _, _) in table.items() if ppid in found} - found
        found |= children
        grew = bool(children)
    return found


def _alive(pids: set[int]) -> set[int]:
    table = proc_table()
    return {pid for pid in pids if pid in table and table[pid][2] not in ("Z", "X")}


def _pids_mentioning(text: str) -> set[int]:
    """Processes whose command line contains `text`."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if text.encode() in (entry / "cmdline").read_bytes():
                    pids.add(int(entry.name))
    return pids


def stop_process_tree(proc: subprocess.Popen) -> None:
    """SIGKILLs `proc`'s session and every descendant (SIGTERM is ignored here); fails if any survives."""
    pids = _tree(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while (left := _alive(pids | _tree(proc.pid) - {proc.pid})) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes of dagster dev still running after SIGKILL: {sorted(left)}"


# ---- the server ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots and the server log go: $UI_TEST_ARTIFACTS (CI can keep it) or a tmp folder.

    Not an MVDATA_ variable: the suite's conftest drops those so a developer's shell can't change the tests.
    """
    chosen = os.environ.get("UI_TEST_ARTIFACTS")
    folder = Path(chosen) if chosen else tmp_path_factory.mktemp("ui-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def dagster_dev(tmp_path_factory: pytest.TempPathFactory, artifacts: Path) -> Iterator[DagsterDev]:
    base = tmp_path_factory.mktemp("dagster-dev")
    dagster_home, home, runs_dir, www = base / "dagster", base / "mvdata", base / "wandb-runs", base / "www"
    for folder in (dagster_home, runs_dir, www):
        folder.mkdir()
    # no telemetry upload or UI telemetry script, no community pop-up loading an iframe from the internet
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\nnux:\n  enabled: false\n")
    port = _free_port()
    log = artifacts / "dagster-dev.log"
    with serve_directory(www) as base_url:
        files = write_demo_files(www, base_url)
        catalog = write_demo_catalog(base / "catalog.yaml", base_url, files)
        env = {
            **os.environ,
            "DAGSTER_HOME": str(dagster_home),
            "MVDATA_HOME": str(home),
            "MVDATA_WANDB_OFFLINE_DIRS": str(runs_dir),
            "MVDATA_WANDB_SENSOR": "on",
            "MVDATA_WANDB_SENSOR_INTERVAL_S": "2",
            "MVDATA_WANDB_TRACKING": "off",
            "MVDATA_CATALOG": str(catalog),
        }
        command = [str(Path(sys.executable).parent / "dagster"), "dev", "-w", "workspace.yaml"]
        command += ["-h", "127.0.0.1", "-p", str(port)]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        server = DagsterDev(f"http://127.0.0.1:{port}", home, runs_dir, artifacts, log)
        try:
            _wait_for_server(server, proc)
            yield server
        finally:
            stop_process_tree(proc)


def _wait_for_server(server: DagsterDev, proc: subprocess.Popen) -> None:
    """Up means /server_info answers and the code location has loaded both asset groups."""

    def groups() -> set[str] | None:
        if proc.poll() is not None:
            raise AssertionError(f"dagster dev exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(f"{server.url}/server_info", timeout=5) as response:
                json.load(response)
            data = graphql(server.url, "{ assetNodes { groupName } }")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None
        return {node["groupName"] for node in data["assetNodes"]} >= {"datasets", "wandb"} or None

    try:
        _wait_for("dagster dev to serve both asset groups", SERVER_START_S, groups, interval_s=1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{server.log_tail()}") from None


# ---- the sensor daemon ---------------------------------------------------------------------------------------------


def test_sensor_daemon_ingests_a_new_offline_run(dagster_dev: DagsterDev) -> None:
    """A run written while `dagster dev` runs lands in the warehouse through the default-on sensor, untouched by us."""
    assert query_warehouse(dagster_dev.warehouse, "SELECT count(*) FROM wandb.runs") in (None, [(0,)])
    writer = subprocess.run(
        [sys.executable, str(WRITER), str(dagster_dev.runs_dir), "long", "21"],
        env=writer_env(),
        cwd=dagster_dev.runs_dir,
        capture_output=True,
        timeout=180,
    )
    assert writer.returncode == 0, writer.stderr.decode(errors="replace")[-3000:]
    truth = json.loads((dagster_dev.runs_dir / "truth-long.json").read_text(encoding="utf-8"))
    wait_for_exit(truth["sidecar_pids"])
    expected_rows = sum(len(metrics) for _, metrics in truth["steps"])

    def ingested() -> list[tuple] | None:
        rows = query_warehouse(
            dagster_dev.warehouse,
            """SELECT r.project, r.state, r.history_rows,
                      (SELECT count(*) FROM wandb.history h WHERE h.run_id = r.run_id)
               FROM wandb.runs r WHERE r.run_id = ?""",
            [truth["run_id"]],
        )
        # the sensor may first catch the file half-written: wait for the finished run, all of it
        return rows if rows and rows[0][1] == "finished" and rows[0][3] == expected_rows else None

    started = time.monotonic()
    try:
        rows = _wait_for(f"run {truth['run_id']} fully in the warehouse", INGEST_S, ingested)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{dagster_dev.log_tail()}") from None
    print(f"sensor ingest: {time.monotonic() - started:.1f} s after the writer finished")
    assert rows == [("long-proj", "finished", expected_rows, expected_rows)]

    def sensor_runs_done() -> list[str] | None:
        data = graphql(
            dagster_dev.url,
            RUNS_BY_TAGS,
            {"t": [{"key": "dagster/sensor_name", "value": "wandb_offline_runs"}]},
        )
        statuses = [run["status"] for run in data["runsOrError"]["results"]]
        return statuses if statuses and set(statuses) <= {"SUCCESS", "FAILURE", "CANCELED"} else None

    # the rows can land before the run that wrote them has finished its exports
    statuses = _wait_for("the sensor's runs to finish", RUN_S, sensor_runs_done)
    assert set(statuses) == {"SUCCESS"}, statuses


# ---- the browser ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    """Headless Debian chromium via the system chromedriver; never Selenium Manager, never a host but loopback."""
    if not (CHROMEDRIVER.exists() and CHROMIUM.exists()):
        pytest.skip("chromium / chromedriver not installed: apt-get install -y chromium chromium-driver")
    profile = tmp_path_factory.mktemp("chromium-profile")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in a container
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1600,1200",
        f"--user-data-dir={profile}",
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--no-default-browser-check",
    ):
        options.add_argument(arg)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SE_OFFLINE", "true")  # Selenium Manager (skipped anyway: the driver is given) must not download
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        # chromedriver's tree, and chromium's processes naming the profile folder (renderers, zygotes, GPU)
        pids = _tree(driver.service.process.pid) | _pids_mentioning(str(profile))
        driver.quit()
        _wait_for("chromedriver and chromium to exit", 30, lambda: not _alive(pids | _pids_mentioning(str(profile))))


_GRAPH_JS = """
// a group's graph, or one asset's lineage
const svg = document.querySelector(
  'svg[class*="AssetGraphExplorer_svgContainer"], svg[class*="AssetNodeLineageGraph_sVGContainer"]');
if (!svg) return null;
const viewport = document.querySelector('[data-svg-viewport]').getBoundingClientRect();
const nodes = [...svg.querySelectorAll('foreignObject')].map(fo => {
  // a full node names itself in a tooltip; a minimal one (a zoomed-out lineage) in its text
  const full = fo.querySelector('[class*="AssetNode_assetName"] [data-tooltip]');
  const minimal = fo.querySelector('[class*="AssetNode_minimalName"]');
  const name = full ? full.getAttribute('data-tooltip') : minimal && minimal.textContent.trim();
  return name && {name, x: +fo.getAttribute('x'), y: +fo.getAttribute('y'),
                  w: +fo.getAttribute('width'), h: +fo.getAttribute('height'),
                  materialized: [...fo.querySelectorAll('span')].some(s => s.textContent.trim() === 'Materialized'),
                  loading: fo.textContent.includes('Loading...')};
}).filter(Boolean);
const groups = [...svg.querySelectorAll('foreignObject.group [data-tooltip]')].map(e => e.getAttribute('data-tooltip'));
const edges = [...svg.querySelectorAll('path[marker-end]')].map(p => p.getAttribute('d'));
return {nodes, groups, edges, top: viewport.top, height: +svg.getAttribute('height'),
        chrome: window.outerHeight - window.innerHeight};
"""


@dataclass
class Graph:
    nodes: set[str]
    edges: set[tuple[str, str]]  # (upstream, downstream) display names
    groups: list[str]
    materialized: set[str]  # nodes whose status row says "Materialized"
    loading: set[str]  # nodes still waiting for their live data (status, checks)


def _read_graph(driver: webdriver.Chrome) -> Graph | None:
    raw = driver.execute_script(_GRAPH_JS)
    if raw is None:
        return None
    boxes = raw["nodes"]

    def node_at(x: float, y: float, side: str) -> str | None:
        for box in boxes:
            edge_x = box["x"] + box["w"] if side == "right" else box["x"]
            if abs(x - edge_x) <= 12 and box["y"] <= y <= box["y"] + box["h"]:
                return box["name"]
        return None

    edges = set()
    for d in raw["edges"]:
        numbers = [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?", d)]
        # an edge leaves the right side of its upstream node and ends (arrow head) at the left side of the downstream
        source, target = node_at(numbers[0], numbers[1], "right"), node_at(numbers[-2], numbers[-1], "left")
        if source and target:
            edges.add((source, target))
    names = {box["name"] for box in boxes}
    materialized = {box["name"] for box in boxes if box["materialized"]}
    return Graph(names, edges, raw["groups"], materialized, {box["name"] for box in boxes if box["loading"]})


def open_graph(driver: webdriver.Chrome, url: str, nodes: set[str], edges: set[tuple[str, str]]) -> Graph:
    """Opens an asset graph, tall enough that no node is culled; waits for `nodes`, `edges` and the live data."""
    driver.set_window_size(1600, 1200)
    driver.get(url)
    raw = _wait_for(f"the asset graph at {url}", 60, lambda: driver.execute_script(_GRAPH_JS))
    # nodes outside the viewport aren't drawn: make it taller than the graph at its initial zoom (1)
    needed = int(raw["chrome"] + raw["top"] + raw["height"] + 150)
    if needed > 1200:
        driver.set_window_size(1600, min(needed, 8000))
        driver.refresh()

    def drawn() -> Graph | None:
        graph = _read_graph(driver)
        return graph if graph and graph.nodes >= nodes and graph.edges >= edges and not graph.loading else None

    try:
        return _wait_for(f"nodes {sorted(nodes)} and edges {sorted(edges)} at {url}", 60, drawn)
    except AssertionError as exc:
        graph = _read_graph(driver)
        seen = (sorted(graph.nodes), sorted(graph.edges)) if graph else None
        raise AssertionError(f"{exc}; drawn: {seen}") from None


def location_path(url: str) -> str:
    """The UI's path segment for our code location (`name@location`, or just the location for `__repository__`)."""
    data = graphql(url, "{ repositoriesOrError { ... on RepositoryConnection { nodes { name location { name } } } } }")
    [repo] = data["repositoriesOrError"]["nodes"]
    location = repo["location"]["name"]
    return location if repo["name"] == "__repository__" else f"{repo['name']}@{location}"


def test_browser_draws_the_asset_graph_and_materialises_the_datasets(
    browser: webdriver.Chrome, dagster_dev: DagsterDev
) -> None:
    """What a user sees: both groups, their nodes and edges; "Materialize all" runs and the graph says so.

    `browser` comes first so that a skip (no chromium) costs no server start.
    """
    shots = dagster_dev.artifacts
    started = time.monotonic()
    try:
        _check_graph_and_materialise(dagster_dev, browser, shots)
    except BaseException:
        browser.save_screenshot(str(shots / "failure.png"))
        raise
    print(f"browser test: {time.monotonic() - started:.1f} s; screenshots in {shots}")


def _check_graph_and_materialise(server: DagsterDev, driver: webdriver.Chrome, shots: Path) -> None:
    # the global lineage draws each group as one box
    driver.get(f"{server.url}/asset-groups")
    both = {"datasets", "wandb"}
    _wait_for("both groups on the global lineage", 60, lambda: (g := _read_graph(driver)) and both <= set(g.groups))
    driver.save_screenshot(str(shots / "global-lineage.png"))

    location = location_path(server.url)
    datasets_url = f"{server.url}/locations/{location}/asset-groups/datasets"
    nodes = {*DEMO_DATASETS, "download_summary"}
    edges = {(name, "download_summary") for name in DEMO_DATASETS}
    datasets = open_graph(driver, datasets_url, nodes, edges)
    driver.save_screenshot(str(shots / "datasets-graph.png"))
    assert not datasets.materialized, datasets.materialized  # nothing has run yet
    assert not {(down, up) for up, down in edges} & datasets.edges, datasets.edges

    tables = {"runs", "history", "config", "summary", "metadata", "system_metrics"}
    wandb_edges = {("runs", "runs_history"), ("history", "runs_history"), ("runs", "runs_metadata")}
    wandb_url = f"{server.url}/locations/{location}/asset-groups/wandb"
    wandb = open_graph(driver, wandb_url, {*WANDB_EXPORTS, *tables}, wandb_edges)
    driver.save_screenshot(str(shots / "wandb-graph.png"))
    # the direction is read from the drawing, not assumed: no export feeds a table
    assert not {(down, up) for up, down in wandb_edges} & wandb.edges, wandb.edges

    # the two halves joined: the datasets feed wandb/run_datasets, with the runs' config
    joined_edges = {*((name, "run_datasets") for name in DEMO_DATASETS), ("config", "run_datasets")}
    lineage_url = f"{server.url}/assets/wandb/run_datasets?view=lineage&lineageScope=upstream&lineageDepth=1"
    joined = open_graph(driver, lineage_url, {*DEMO_DATASETS, "config", "run_datasets"}, joined_edges)
    driver.save_screenshot(str(shots / "run-datasets-lineage.png"))
    assert not {(down, up) for up, down in joined_edges} & joined.edges, joined.edges

    # materialise the datasets group from its page: the button launches a run and a toast links to it
    open_graph(driver, datasets_url, nodes, edges)
    [button] = driver.find_elements(By.XPATH, "//button[normalize-space(.)='Materialize all']")
    button.click()
    link = WebDriverWait(driver, 60).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "[data-sonner-toast] a[href*='/runs/']")
    )[0]
    run_id = link.get_attribute("href").rsplit("/runs/", 1)[1]
    driver.save_screenshot(str(shots / "launched.png"))
    link.click()
    title = WebDriverWait(driver, RUN_S, poll_frequency=1).until(
        lambda d: d.title if re.search(r"\[(SUCCESS|FAILURE|CANCELED)\]", d.title) else None
    )
    driver.save_screenshot(str(shots / "run.png"))
    assert title.endswith("[SUCCESS]"), title

    data = graphql(
        server.url,
        "query($id: ID!) { runOrError(runId: $id) { ... on Run { status tags { key value } } } }",
        {"id": run_id},
    )
    run = data["runOrError"]
    assert run["status"] == "SUCCESS"
    assert {"key": "dagster/from_ui", "value": "true"} in run["tags"]
    states = _wait_for(
        "datasets.download_summary",
        60,
        lambda: query_warehouse(server.warehouse, "SELECT dataset, status FROM datasets.download_summary"),
    )
    assert dict(states) == DEMO_DATASETS

    # the graph now shows the materialisations
    open_graph(driver, datasets_url, nodes, edges)
    _wait_for("every dataset node to say Materialized", 30, lambda: nodes <= _read_graph(driver).materialized)
    driver.save_screenshot(str(shots / "datasets-materialised.png"))
