"""Downloads on loopback: the engine, and a dataset asset as users run it, against curl from one local nginx.

What it measures: a big file and many small files, served by nginx on 127.0.0.1 and fetched in the same run by
  - curl, the targets' baseline: `curl -s -o FILE URL` (big file), `curl -Z --parallel-max 16` (small files);
  - aria2c (`-x16 -s16`; `-j16`);
  - the engine's guarantees done plainly: for the big file `bare_c_stream.c` (one stream, sha256 from the same
    buffers, fsync and rename; built here, its row left out, saying why, when it can't be); for the small files curl,
    then `sha256sum -c`, then `sync -f`;
  - the engine alone: `Downloader(concurrency=16).fetch_all(tasks)` in this process (no interpreter start-up or
    imports in its time; its threads' CPU in its CPU seconds);
  - the asset as users run it: `dagster asset materialize -m mvdata_assets.definitions --select datasets/<name>` in a
    subprocess, MVDATA_CATALOG a catalog of the served files, a fresh MVDATA_HOME per run (the files land in its
    datasets/<name>/), MVDATA_WANDB_TRACKING=off, one DAGSTER_HOME for the script's run;
  - Dagster's fixed start-up: the same for a dataset of one 1-byte file in the same catalog. The asset's time is shown
    raw and, on rows of their own, minus this start-up (best minus best, median minus median): as the difference of
    the two commands' times, and as the difference of their steps' times as Dagster logged them in the same runs
    (STEP_START to STEP_SUCCESS in the run's event log), which leaves out the ~2 s of each process that cancel;
  - the big file's limits on this machine, each alone: its sha256 from the page cache on one core, and writing its
    bytes to the disk (`dd oflag=direct conv=fdatasync`). A download that verifies and makes durable cannot beat
    either; curl, which does neither, can;
  - the small files' floor: libcurl's multi interface (pycurl, 16 at once) fetching each body into memory and hashing
    it on the same thread, with no file, no per-file logic and nothing made durable: what a one-thread engine over
    libcurl that verifies inline pays before it does any of its own work.
The engine's and the asset's times include verifying sha256 and making the files durable (fsync or syncfs, renames
from .part, a folder fsync); curl's and aria2c's include neither.

Targets (judged on the engine, best of --repeat; the same ratios are printed for the asset minus its start-up, by
the commands' and by the steps' times):
  1. a 1 GiB file, sha256 verified: engine throughput >= 0.9x curl's;
  2. 2,000 x 64 KiB files: curl seconds / engine seconds >= 0.5.

Method: the test data (random bytes, and their sha256) is written once into bench/.data/www and reused. nginx runs
from a config in a temp dir on a free port and is stopped at the end, even on error; every served file is read
through it first, so that all tools meet the same warm page cache. Rounds are interleaved, each starting with the
next row. Before each run: a new output folder under bench/.data, `sync` (no run pays for the dirty pages of the one
before), and WARM_BYTES of memory touched and freed (a VM that hands freed memory back to its host would otherwise
make a run pay to fault it in, more or less after different predecessors). After each run, outside its time, its
files are checked (the big file's size and sha256, the small files' count and sizes, the engine's results): a broken
run stops the script. The big file's folders are deleted after their check, the small files' only at the end, as
creating files right after thousands of deletions is slower on some file systems (the "conditions" line gives what
creating one file cost before and after the runs, and the CPU steal time). Each row shows the best and the median of
--repeat runs, and the median CPU seconds (user + system; of the child processes for commands).

Usage: .venv/bin/python bench/downloads.py [--big-mib 1024] [--small 2000] [--small-kib 64] [--repeat 5]
Needs nginx, curl, aria2c and coreutils (dd, sha256sum, sync): on Debian `apt-get install -y nginx curl aria2`; the
bare C stream row also needs gcc, libcurl4-openssl-dev and libssl-dev. This script installs nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = HERE / ".data"
WWW = DATA / "www"
sys.path.insert(0, str(ROOT))

import pycurl  # noqa: E402

from mvdata_assets.datasets.fetch import Downloader, FileTask  # noqa: E402

TOOLS = {
    "nginx": "nginx",
    "curl": "curl",
    "aria2c": "aria2",
    "sha256sum": "coreutils",
    "sync": "coreutils",
    "dd": "coreutils",
}
DAGSTER = Path(sys.executable).with_name("dagster")  # the venv's CLI, as users run it
BIG_TARGET = 0.9  # engine throughput / curl throughput, big file
SMALL_TARGET = 0.5  # curl seconds / engine seconds, many small files
WARM_BYTES = 1536 * 1024 * 1024  # touched and freed before each run, so that every run finds warm memory
WRITE_CHUNK = 8 * 1024 * 1024
CURL_BIG = "curl"
CURL_SMALL = "curl -Z --parallel-max 16"
CURL_CHECKED = "curl -Z, sha256sum -c, sync -f"
C_STREAM = "bare C stream, same checks"
C_STREAM_SOURCE = HERE / "bare_c_stream.c"
HASH_ALONE = "limit: sha256 alone, one core"
DISK_ALONE = "limit: disk alone, dd direct+fsync"
FETCH_HASH_ALONE = "limit: libcurl + sha256, no files"
LIMITS = (HASH_ALONE, DISK_ALONE, FETCH_HASH_ALONE)  # rows listed last: what a verifying engine cannot beat
ENGINE = "engine"
ASSET = "asset: dagster asset materialize"
STARTUP = "dagster start-up (1-byte dataset)"
NET = "asset minus start-up"
NET_STEPS = "asset minus start-up, steps"
ARIA2_QUIET = ["-q", "--console-log-level=error", "--summary-interval=0", "--allow-overwrite=true",
               "--auto-file-renaming=false"]  # fmt: skip

Timing = tuple[float, float]  # (wall seconds, CPU seconds)
Tool = Callable[[Path], tuple[Timing, Path]]  # one run into a fresh folder: its timing, and where its files are


# ---- tools and test data ----


def require_tools() -> dict[str, str]:
    found = {name: shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin") for name in TOOLS}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        packages = " ".join(sorted({TOOLS[name] for name in missing}))
        raise SystemExit(f"missing: {', '.join(missing)}; on Debian: apt-get install -y -q {packages}")
    if not DAGSTER.exists():
        raise SystemExit(f"no {DAGSTER}: run this script with the project's venv (.venv/bin/python)")
    return {name: str(path) for name, path in found.items()}


def make_data(big_mib: int, small: int, small_kib: int) -> tuple[dict, list[dict], dict]:
    """The big file, the small files and the 1-byte file (rel path, size, sha256), written when missing or changed."""
    manifest_path = DATA / "www-manifest.json"
    manifest: dict[str, dict] = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    written: set[Path] = set()

    def ensure(rel: str, size: int) -> dict:
        path, entry = WWW / rel, manifest.get(rel)
        st = path.stat() if path.exists() else None
        if (
            entry
            and st
            and (entry["size"], entry["mtime_ns"]) == (size, st.st_mtime_ns) == (st.st_size, st.st_mtime_ns)
        ):
            return {"rel": rel, "size": size, "sha256": entry["sha256"]}
        if path.parent not in written:
            print(f"writing test data into {path.parent} (once; cached)", flush=True)
            written.add(path.parent)
        path.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with open(path, "wb") as out:
            for left in range(size, 0, -WRITE_CHUNK):
                block = os.urandom(min(WRITE_CHUNK, left))
                digest.update(block)
                out.write(block)
        manifest[rel] = {"size": size, "mtime_ns": path.stat().st_mtime_ns, "sha256": digest.hexdigest()}
        return {"rel": rel, "size": size, "sha256": digest.hexdigest()}

    big = ensure(f"big-{big_mib}MiB.bin", big_mib * 1024 * 1024)
    smalls = [ensure(f"small-{small_kib}KiB/f{i:05d}.bin", small_kib * 1024) for i in range(small)]
    tiny = ensure("tiny/one-byte.bin", 1)
    if written:
        manifest_path.write_text(json.dumps(manifest))
    return big, smalls, tiny


def build_c_stream() -> str | None:
    """bare_c_stream.c built into bench/.data (again when it changed); None, saying why, when it can't be."""
    binary = DATA / C_STREAM_SOURCE.stem
    if binary.exists() and binary.stat().st_mtime_ns >= C_STREAM_SOURCE.stat().st_mtime_ns:
        return str(binary)
    argv = ["gcc", "-O2", "-pthread", "-o", str(binary), str(C_STREAM_SOURCE), "-lcurl", "-lcrypto"]
    try:
        subprocess.run(argv, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        why = (getattr(exc, "stderr", None) or str(exc)).strip()[-500:]
        print(f"no {C_STREAM} row: building it needs gcc, libcurl4-openssl-dev and libssl-dev:\n{why}", file=sys.stderr)
        return None
    return str(binary)


# ---- nginx ----

NGINX_CONF = """\
daemon off; master_process on; worker_processes auto; {user}
pid {tmp}/nginx.pid; error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    types {{ }} default_type application/octet-stream; access_log off;
    sendfile on; tcp_nopush on; keepalive_requests 100000; keepalive_timeout 60s;
    client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy; fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
    server {{ listen 127.0.0.1:{port}; root {root}; location / {{ }} }}
}}
"""


@contextlib.contextmanager
def nginx(binary: str, root: Path) -> Iterator[str]:
    """A loopback nginx serving `root` on a free port; yields its base URL and always stops it."""
    with tempfile.TemporaryDirectory(prefix="bench-nginx-") as tmp:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        conf = Path(tmp) / "nginx.conf"
        user = "user root;" if os.geteuid() == 0 else ""
        conf.write_text(NGINX_CONF.format(user=user, tmp=tmp, port=port, root=root))
        argv = [binary, "-p", tmp, "-c", str(conf), "-e", f"{tmp}/error.log"]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(200):  # 10 s
                if proc.poll() is not None:
                    log = Path(tmp, "error.log")
                    errors = log.read_text() if log.exists() else ""
                    raise RuntimeError(f"nginx exited with {proc.returncode}: {errors}")
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
                time.sleep(0.05)
            else:
                raise RuntimeError(f"nginx did not listen on 127.0.0.1:{port} within 10 s")
            yield f"http://127.0.0.1:{port}"
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGQUIT)  # graceful: finish and exit
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def warm(base: str, files: list[dict]) -> None:
    """One read of every served file through nginx, so that all tools meet the same (warm) page cache."""
    for f in files:
        with urllib.request.urlopen(f"{base}/{f['rel']}") as response:
            while response.read(WRITE_CHUNK):
                pass


# ---- one run ----

_runs = itertools.count()


def fresh_dir(name: str) -> Path:
    """A new, empty folder for one run (all are deleted at the end), after a `sync`."""
    path = DATA / f"out-{name.replace(' ', '_')}-{next(_runs)}"
    path.mkdir(parents=True)
    os.sync()  # no run pays for the dirty pages of the one before (the page cache itself is left alone)
    return path


def cpu_now(children: bool) -> float:
    """CPU seconds (user + system) used so far by this process, or by its finished children."""
    t = os.times()
    return t.children_user + t.children_system if children else t.user + t.system


def timed(argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> Timing:
    cpu, started = cpu_now(children=True), time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        output = (done.stdout + done.stderr).decode(errors="replace")[-3000:]
        raise RuntimeError(f"{Path(argv[0]).name} exited with {done.returncode}:\n{output}")
    return seconds, cpu_now(children=True) - cpu


def check(folder: Path, files: list[dict], tool: str, sha256: bool) -> None:
    """The run left exactly the expected files in `folder`, each of its size (and sha256, if asked)."""
    expected = {Path(f["rel"]).name: f for f in files}
    names = set(os.listdir(folder)) if folder.is_dir() else set()
    if names != set(expected):
        missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
        raise RuntimeError(f"{tool}: {folder}: missing {len(missing)} {missing[:3]}, extra {len(extra)} {extra[:3]}")
    for name, f in expected.items():
        size = os.stat(folder / name).st_size
        if size != f["size"]:
            raise RuntimeError(f"{tool}: {folder / name} has {size} bytes, not {f['size']}")
        if sha256:
            with open(folder / name, "rb") as data:
                digest = hashlib.file_digest(data, "sha256").hexdigest()
            if digest != f["sha256"]:
                raise RuntimeError(f"{tool}: {folder / name} has sha256 {digest}, not {f['sha256']}")


def verified(label: str, tool: Tool, files: list[dict], *, sha256: bool, delete: bool) -> Callable[[], Timing]:
    """`tool` run into a fresh folder, then checked; the folder deleted at once if `delete`."""

    def run() -> Timing:
        out = fresh_dir(label)
        timing, folder = tool(out)
        check(folder, files, label, sha256)
        if delete:
            shutil.rmtree(out)
        return timing

    return run


def engine(base: str, files: list[dict]) -> Tool:
    def run(out: Path) -> tuple[Timing, Path]:
        tasks = [FileTask(f"{base}/{f['rel']}", out / Path(f["rel"]).name, f["size"], f["sha256"]) for f in files]
        cpu, started = cpu_now(children=False), time.perf_counter()
        results = Downloader(concurrency=16).fetch_all(tasks)
        timing = time.perf_counter() - started, cpu_now(children=False) - cpu
        bad = [r for r in results if r.status != "downloaded"]
        if bad:
            raise RuntimeError(f"engine: {len(bad)} of {len(results)} files not downloaded, e.g. {bad[0]}")
        return timing, out

    return run


def write_catalog(path: Path, base: str, datasets: dict[str, list[dict]]) -> Path:
    """A catalog (the format of mvdata_assets/datasets/catalog.yaml) of public datasets served from `base`."""
    doc = {"datasets": {
        name: {"description": f"bench/downloads.py test data ({len(files)} files)", "access": "public", "files": [
            {"url": f"{base}/{f['rel']}", "path": Path(f["rel"]).name, "size": f["size"], "sha256": f["sha256"]}
            for f in files
        ]}
        for name, files in datasets.items()
    }}  # fmt: skip
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def asset(catalog: Path, name: str, dagster_home: Path, steps: list[float]) -> Tool:
    """`dagster asset materialize` of the dataset `name`, its MVDATA_HOME the run's fresh folder; each run's step
    time, as Dagster logged it, is appended to `steps`."""

    def run(home: Path) -> tuple[Timing, Path]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MVDATA_")}  # none of the user's settings
        env |= {"MVDATA_CATALOG": str(catalog), "MVDATA_HOME": str(home), "MVDATA_WANDB_TRACKING": "off",
                "DAGSTER_HOME": str(dagster_home)}  # fmt: skip
        argv = [str(DAGSTER), "asset", "materialize", "-m", "mvdata_assets.definitions", "--select", f"datasets/{name}"]
        timing = timed(argv, cwd=ROOT, env=env)
        steps.append(step_seconds(dagster_home))
        return timing, home / "datasets" / name

    return run


def step_seconds(dagster_home: Path) -> float:
    """Wall seconds of the newest run's one step, from its STEP_START to its STEP_SUCCESS event."""
    from dagster import DagsterEventType, DagsterInstance  # here: only the asset rows need Dagster

    with DagsterInstance.from_config(str(dagster_home)) as instance:
        (run,) = instance.get_runs(limit=1)
        kinds = {DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS}
        stamps = {e.dagster_event.event_type: e.timestamp for e in instance.all_logs(run.run_id, of_type=kinds)}
    if set(stamps) != kinds:
        raise RuntimeError(f"run {run.run_id} logged no successful step: {sorted(stamps)}")
    return stamps[DagsterEventType.STEP_SUCCESS] - stamps[DagsterEventType.STEP_START]


# ---- the two workloads: {row: run} ----


def dagster_rows(
    base: str, dataset: str, files: list[dict], tiny: dict, home: Path, steps: dict[str, list[float]]
) -> dict[str, tuple[Tool, list]]:
    """The asset and Dagster's start-up (the 1-byte `bench_startup`), from one catalog of both datasets; their step
    times into `steps[ASSET]` and `steps[STARTUP]`."""
    catalog = write_catalog(DATA / f"catalog-{dataset}.yaml", base, {dataset: files, "bench_startup": [tiny]})
    return {ASSET: (asset(catalog, dataset, home, steps.setdefault(ASSET, [])), files),
            STARTUP: (asset(catalog, "bench_startup", home, steps.setdefault(STARTUP, [])), [tiny])}  # fmt: skip


def big_runs(tools: dict[str, str], base: str, big: dict, c_stream: str | None, dagster: dict) -> dict:
    url, name = f"{base}/{big['rel']}", Path(big["rel"]).name

    def command(argv: Callable[[Path], list[str]]) -> Tool:
        return lambda out: (timed(argv(out)), out)

    rows: dict[str, Tool] = {
        CURL_BIG: command(lambda out: [tools["curl"], "-s", "-o", str(out / name), url]),
        "aria2c -x16 -s16": command(
            lambda out: [tools["aria2c"], "-x16", "-s16", *ARIA2_QUIET, "-d", str(out), "-o", name, url]
        ),
    }
    if c_stream:
        rows[C_STREAM] = command(lambda out: [c_stream, url, str(out / name), str(big["size"]), big["sha256"]])
    runs = {label: (tool, [big]) for label, tool in rows.items()} | {ENGINE: (engine(base, [big]), [big])} | dagster
    checked = {label: verified(label, tool, files, sha256=True, delete=True) for label, (tool, files) in runs.items()}
    return checked | limits(tools, big)


def limits(tools: dict[str, str], big: dict) -> dict[str, Callable[[], Timing]]:
    """What a verified, durable download of the big file cannot beat on this machine, each alone: hashing its bytes
    (from the page cache, on one core) and writing them to the disk (dd from the page cache, O_DIRECT, fdatasync)."""

    def hash_alone() -> Timing:
        cpu, started = cpu_now(children=False), time.perf_counter()
        with open(WWW / big["rel"], "rb") as data:
            digest = hashlib.file_digest(data, "sha256").hexdigest()
        timing = time.perf_counter() - started, cpu_now(children=False) - cpu
        if digest != big["sha256"]:
            raise RuntimeError(f"{WWW / big['rel']} has sha256 {digest}, not {big['sha256']}")
        return timing

    def disk_alone() -> Timing:
        out = fresh_dir("dd")
        blocks = -(-big["size"] // WRITE_CHUNK)
        argv = [tools["dd"], f"if={WWW / big['rel']}", f"of={out / 'copy'}", f"bs={WRITE_CHUNK}", f"count={blocks}",
                "oflag=direct", "conv=fdatasync", "status=none"]  # fmt: skip
        timing = timed(argv)
        shutil.rmtree(out)
        return timing

    return {HASH_ALONE: hash_alone, DISK_ALONE: disk_alone}


def small_runs(tools: dict[str, str], base: str, smalls: list[dict], dagster: dict) -> dict:
    lists = DATA / "lists"
    lists.mkdir(parents=True, exist_ok=True)
    curl_config, url_list, sums = lists / "curl.config", lists / "urls.txt", lists / "sha256sums.txt"
    curl_config.write_text("".join(f'url = "{base}/{s["rel"]}"\n' for s in smalls))
    url_list.write_text("".join(f"{base}/{s['rel']}\n" for s in smalls))
    sums.write_text("".join(f"{s['sha256']}  {Path(s['rel']).name}\n" for s in smalls))  # run in the output folder
    curl_z = [tools["curl"], "-s", "-Z", "--parallel-max", "16", "--remote-name-all", "-K", str(curl_config)]

    def curl(checked: bool) -> Tool:
        def run(out: Path) -> tuple[Timing, Path]:
            seconds, cpu = timed([*curl_z, "--output-dir", str(out)])
            if checked:
                for argv, cwd in (([tools["sha256sum"], "--quiet", "--strict", "-c", str(sums)], out),
                                  ([tools["sync"], "-f", str(out)], None)):  # fmt: skip
                    more_seconds, more_cpu = timed(argv, cwd=cwd)
                    seconds, cpu = seconds + more_seconds, cpu + more_cpu
            return (seconds, cpu), out

        return run

    def aria2(out: Path) -> tuple[Timing, Path]:
        return timed([tools["aria2c"], "-j16", *ARIA2_QUIET, "-d", str(out), "-i", str(url_list)]), out

    rows: dict[str, Tool] = {CURL_SMALL: curl(False), CURL_CHECKED: curl(True), "aria2c -j16": aria2}
    runs = {label: (tool, smalls) for label, tool in rows.items()} | {ENGINE: (engine(base, smalls), smalls)} | dagster
    checked = {label: verified(label, tool, files, sha256=False, delete=False) for label, (tool, files) in runs.items()}
    return checked | {FETCH_HASH_ALONE: lambda: fetch_and_hash(base, smalls)}


def fetch_and_hash(base: str, files: list[dict], at_once: int = 16) -> Timing:
    """Every file's body fetched into memory over one libcurl multi handle and hashed as it completes, on this thread;
    each digest is checked after the run, outside its time."""
    multi, idle, running = pycurl.CurlMulti(), [], {}
    queue, digests = iter(files), {}

    def start() -> None:
        file = next(queue, None)
        if file is None:
            return
        handle = idle.pop() if idle else pycurl.Curl()
        body: list[bytes] = []
        handle.setopt(pycurl.URL, f"{base}/{file['rel']}")
        handle.setopt(pycurl.WRITEFUNCTION, body.append)
        multi.add_handle(handle)
        running[handle] = (file, body)

    cpu, started = cpu_now(children=False), time.perf_counter()
    for _ in range(at_once):
        start()
    while running:
        multi.perform()
        left = 1
        while left:
            left, done, failed = multi.info_read()
            if failed:
                raise RuntimeError(f"{FETCH_HASH_ALONE}: {failed[0][2]}")
            for handle in done:
                multi.remove_handle(handle)
                idle.append(handle)
                file, body = running.pop(handle)
                digests[file["rel"]] = hashlib.sha256(b"".join(body)).hexdigest()
                start()
        if running:
            multi.select(1.0)
    timing = time.perf_counter() - started, cpu_now(children=False) - cpu
    for handle in idle:
        handle.close()
    multi.close()
    wrong = [f["rel"] for f in files if digests.get(f["rel"]) != f["sha256"]]
    if wrong:
        raise RuntimeError(f"{FETCH_HASH_ALONE}: {len(wrong)} bodies with the wrong sha256, e.g. {wrong[0]}")
    return timing


# ---- measuring ----


def measure(runs: dict[str, Callable[[], Timing]], repeat: int, label: str) -> dict[str, list[Timing]]:
    """--repeat rounds, each starting with the next tool (A B C, B C A, ...)."""
    times: dict[str, list[Timing]] = {name: [] for name in runs}
    names = list(runs)
    for rep in range(repeat):
        turn = rep % len(names)
        for name in names[turn:] + names[:turn]:
            touched = bytearray(b"\x01") * WARM_BYTES  # touched and freed: the run gets pages the host kept
            del touched
            times[name].append(runs[name]())
        rounds = ", ".join(f"{n} {t[-1][0]:.3f}s" for n, t in times.items())
        print(f"  {label} round {rep + 1}/{repeat}: {rounds}", flush=True)
    return times


def conditions(count: int = 300) -> tuple[int, int, float]:
    """CPU steal and total jiffies so far (Linux's /proc/stat), and the microseconds it takes now to create one empty
    file in a fresh folder under bench/.data."""
    jiffies = [int(x) for x in Path("/proc/stat").read_text().split()[1:9]]  # user ... steal, of all CPUs
    out = fresh_dir("probe")
    started = time.perf_counter()
    for i in range(count):
        os.close(os.open(out / f"f{i:05d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    return jiffies[7], sum(jiffies), (time.perf_counter() - started) / count * 1e6


# ---- report ----


def summary(times: dict[str, list[Timing]], steps: dict[str, list[float]]) -> dict[str, tuple[float, float, float]]:
    """(best s, median s, median CPU s) per row, with the asset minus the start-up (by the commands' times, and by the
    steps' times, whose CPU is not logged) added after the asset, and the limits last."""
    rows = {n: (min(w for w, _ in t), statistics.median(w for w, _ in t), statistics.median(c for _, c in t))
            for n, t in times.items()}  # fmt: skip
    asset_row, start = rows[ASSET], rows[STARTUP]
    net = (asset_row[0] - start[0], asset_row[1] - start[1], asset_row[2] - start[2])
    asset_steps, start_steps = steps[ASSET], steps[STARTUP]
    by_steps = (min(asset_steps) - min(start_steps), statistics.median(asset_steps) - statistics.median(start_steps),
                float("nan"))  # fmt: skip
    tools = {n: r for n, r in rows.items() if n != STARTUP and n not in LIMITS}
    return {**tools, NET: net, NET_STEPS: by_steps, STARTUP: start, **{n: r for n, r in rows.items() if n in LIMITS}}


def table(rows: dict[str, tuple[float, float, float]], baseline: str, amount: float, unit: str) -> None:
    """One line per row; `vs`: the baseline's seconds / the row's (its throughput / the baseline's), best and median."""
    print(f"  {'':<34}{'best s':>8}{'median s':>10}{'best ' + unit:>14}{'median CPU s':>14}{'vs best':>9}{'median':>8}")
    for name, (best, med, cpu) in rows.items():
        rate = f"{amount / best:.0f}" if best > 0 else "n/a"
        vs_best, vs_med = ratio(rows, baseline, name)
        cpu_text = "n/a" if cpu != cpu else f"{cpu:.2f}"  # nan: not measured (the step's CPU is not logged)
        print(f"  {name:<34}{best:>8.3f}{med:>10.3f}{rate:>14}{cpu_text:>14}{vs_best:>9.2f}{vs_med:>8.2f}")


def ratio(rows: dict, baseline: str, row: str) -> tuple[float, float]:
    """baseline seconds / row seconds, of the best runs and of the medians (nan where the row is not above 0 s)."""
    best, med = (rows[baseline][i] / rows[row][i] if rows[row][i] > 0 else float("nan") for i in (0, 1))
    return best, med


def verdicts(rows: dict, baseline: str, target: float, what: str, repeat: int) -> None:
    for name in (ENGINE, NET, NET_STEPS):
        got = ratio(rows, baseline, name)[0]
        word = "PASS" if got >= target else "MISS"
        print(f"{word} {what} ({name}): {got:.3f} (target >= {target}, best of {repeat})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big-mib", type=int, default=1024, help="size of the big file in MiB (default 1024)")
    parser.add_argument("--small", type=int, default=2000, help="number of small files (default 2000)")
    parser.add_argument("--small-kib", type=int, default=64, help="size of each small file in KiB (default 64)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per row and workload (default 5)")
    args = parser.parse_args()

    tools = require_tools()
    big, smalls, tiny = make_data(args.big_mib, args.small, args.small_kib)
    c_stream = build_c_stream()
    try:
        with nginx(tools["nginx"], WWW) as base:
            home = fresh_dir("dagster-home")  # one DAGSTER_HOME for all the runs, as a user has
            (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
            big_steps: dict[str, list[float]] = {}
            small_steps: dict[str, list[float]] = {}
            big_work = big_runs(tools, base, big, c_stream,
                                dagster_rows(base, "bench_big", [big], tiny, home, big_steps))  # fmt: skip
            small_work = small_runs(tools, base, smalls,
                                    dagster_rows(base, "bench_small", smalls, tiny, home, small_steps))  # fmt: skip
            print(f"nginx on {base}, serving {WWW}; {os.cpu_count()} CPUs; best and median of {args.repeat} runs")
            warm(base, [big, tiny])
            big_work[STARTUP]()  # untimed: Dagster's first start reads its files into the page cache
            big_steps[STARTUP].clear()
            steal0, total0, create_before = conditions()
            big_times = measure(big_work, args.repeat, f"{args.big_mib} MiB")
            warm(base, smalls)  # again just before their rounds, in case the big file's pushed them out
            small_times = measure(small_work, args.repeat, f"{args.small} x {args.small_kib} KiB")
            steal1, total1, create_after = conditions()
    finally:
        for out in DATA.glob("out-*"):  # only now: see the module docstring
            shutil.rmtree(out, ignore_errors=True)

    steal = (steal1 - steal0) / (total1 - total0) if total1 > total0 else 0.0
    print(f"\nconditions: CPU steal {steal:.0%} during the runs; creating a file under {DATA} took "
          f"{create_before:.0f} us before and {create_after:.0f} us after them")  # fmt: skip
    big_rows, small_rows = summary(big_times, big_steps), summary(small_times, small_steps)
    print(f"\n{args.big_mib} MiB file ({big['size']:,} bytes; MB = 10^6 bytes); vs: {CURL_BIG}'s seconds / the row's")
    table(big_rows, CURL_BIG, big["size"] / 1e6, "MB/s")
    print(f"\n{args.small} x {args.small_kib} KiB files; vs: {CURL_SMALL}'s seconds / the row's")
    table(small_rows, CURL_SMALL, args.small, "files/s")
    print()
    verdicts(big_rows, CURL_BIG, BIG_TARGET, f"big file, throughput / {CURL_BIG}'s", args.repeat)
    verdicts(small_rows, CURL_SMALL, SMALL_TARGET, f"small files, {CURL_SMALL} s / its s", args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
