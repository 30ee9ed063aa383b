"""README as a user follows it: the how-to's commands on the demo's data, its catalog entries, its code, and the
configuration table.

Everything is read from README.md itself, so a how-to that stops working fails here, as does a setting the tables
(README's and docs/cluster.md's) leave out. The cluster's commands start Postgres, Redis and workers on several
machines: test_cluster.py runs that setup.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import duckdb
import yaml

from mvdata_assets.datasets.catalog import load_catalog
from mvdata_assets_tests.dagster_cli import BIN, REPO, materialize, run_demo

HOW_TO = "How to"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def how_to_blocks() -> list[tuple[str, str, str]]:
    """(subsection title, language, code) of each fenced block in README's "How to", in order ('' before the first
    subsection)."""
    text = (REPO / "README.md").read_text()
    section = text.split(f"\n## {HOW_TO}\n", 1)[1].split("\n## ", 1)[0]
    head, *subsections = re.split(r"^### ", section, flags=re.MULTILINE)
    titled = [("", head)] + [(title, body) for title, _, body in (part.partition("\n") for part in subsections)]
    return [(title, language, code) for title, body in titled for language, code in FENCE.findall(body)]


def clean_environment(home: Path) -> dict[str, str]:
    """This process's environment without the project's, Dagster's or W&B's settings: only what README sets."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MVDATA_", "DAGSTER_", "WANDB_"))}
    return env | {"MVDATA_HOME": str(home), "WANDB_SILENT": "true"}  # as `make demo` exports MVDATA_HOME


def after_make_demo(home: Path) -> dict[str, str]:
    """`make demo` into `home`: the environment it leaves."""
    env = clean_environment(home)
    run_demo(env)
    return env


def as_run_here(code: str, home: Path) -> str:
    """README's paths, for a demo made in `home` and this test's venv."""
    return code.replace("$PWD/.mvdata", str(home)).replace(".venv/bin/", f"{BIN}/")


def test_the_how_to_runs_as_written_on_the_demos_data(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = after_make_demo(home)

    bash = [(title, code) for title, language, code in how_to_blocks() if language == "bash"]
    (first, settings), *commands = bash
    assert first == "" and "export MVDATA_HOME=$PWD/.mvdata" in settings, "README's how-to starts with its settings"
    ran = []
    for title, code in commands:
        script = as_run_here(settings + code, home)
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=600)  # fmt: skip
        assert done.returncode == 0, f"README, {title}:\n{code}\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
        if "asset materialize" in code:
            assert "RUN_SUCCESS" in done.stderr, f"README, {title}: {done.stderr[-2000:]}"
        if "mvdata status" in code:
            assert re.search(r"^demo_coco\s+complete\s", done.stdout, re.MULTILINE), done.stdout
        ran.append(title)
    assert ran == ["See what is there, verify, retry", "Force a refresh", "Build your own assets on the project's"]


def python_block(title: str) -> str:
    return next(code for t, language, code in how_to_blocks() if t == title and language == "python")


def test_the_users_module_of_the_how_to_builds_on_the_demo(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = after_make_demo(home)
    module = tmp_path / "code" / "readme_project.py"
    module.parent.mkdir()
    module.write_text(python_block("Build your own assets on the project's"))
    env |= {"PYTHONPATH": str(module.parent), "DAGSTER_HOME": str(home / "dagster"), "WANDB_MODE": "offline",
            "MVDATA_CATALOG": str(home / "demo" / "catalog.yaml"),
            "MVDATA_WANDB_OFFLINE_DIRS": str(home / "demo" / "wandb-runs")}  # fmt: skip

    done = materialize("readme_project", "group:analysis", env, cwd=tmp_path)

    assert done.returncode == 0 and "RUN_SUCCESS" in done.stderr, done.stderr[-3000:]
    # what the selection names, nothing more: a selection that matches no asset runs every asset of the module
    assert set(re.findall(r'STEP_SUCCESS - Finished execution of step "(\w+)"', done.stderr)) == {
        "analysis__best_loss", "analysis__coco_files"}  # fmt: skip
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as conn:
        best = conn.execute("SELECT count(*) FROM analysis.best_loss").fetchone()
        files = conn.execute("SELECT count(*) FROM analysis.coco_files WHERE sha256 IS NOT NULL").fetchone()
        demo_files = conn.execute("SELECT count(*) FROM datasets.files WHERE dataset = 'demo_coco'").fetchone()
    assert best == (4,)  # the demo's four training runs log a loss
    assert files == demo_files and files[0] > 0


def test_the_executor_of_the_how_to_is_the_one_every_job_gets(tmp_path: Path) -> None:
    code = python_block("Download several datasets at once")
    check = 'print(sorted({defs.resolve_job_def(j).executor_def.name for j in ("mvdata_main", "wandb_sync")}))'
    done = subprocess.run([str(BIN / "python"), "-W", "ignore", "-c", f"{code}\n{check}"],
                          env=clean_environment(tmp_path / "home"), cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "['multiprocess']"


def settings_table(document: str, section: str) -> set[str]:
    """The MVDATA_* variables a document's settings table names in its first column."""
    table = (REPO / document).read_text().split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    return {name for row in rows for name in re.findall(r"`(MVDATA_[A-Z0-9_]+)`", row.split(" | ")[0])}


def test_the_settings_tables_name_every_setting_the_project_reads() -> None:
    """Every MVDATA_* variable the package or the cluster's Dagster instance reads has its row, in README's table or
    (a cluster's own) in docs/cluster.md's; no row names one that nothing reads, and none is in both."""
    sources = [*(REPO / "mvdata_assets").rglob("*.py"), *(REPO / "cluster").glob("*.yaml")]
    read = {name for path in sources for name in re.findall(r"MVDATA_[A-Z0-9_]*[A-Z0-9]", path.read_text())}
    readme, cluster = settings_table("README.md", "Configuration"), settings_table("docs/cluster.md", "Settings")

    assert read - (readme | cluster) == set(), "read but in neither settings table"
    assert (readme | cluster) - read == set(), "in a settings table but read nowhere"
    assert readme & cluster == set(), "in both settings tables"
    assert {"MVDATA_CELERY_BROKER", "MVDATA_POSTGRES_HOST", "MVDATA_MAX_RUNS"} <= cluster


def test_the_catalog_entries_of_the_how_to_load(tmp_path: Path) -> None:
    entries = [code for title, language, code in how_to_blocks() if language == "yaml"]
    assert len(entries) == 2, "README shows a dataset and a URL-list dataset"
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text("\n".join(entries))  # the second is written to go under the first's `datasets:`

    datasets = load_catalog(catalog)

    described = yaml.safe_load(catalog.read_text())["datasets"]
    assert set(datasets) == set(described) == {"my_vqa", "my_captions"}
    vqa, captions = datasets["my_vqa"], datasets["my_captions"]
    assert [(f.size, f.sha256, f.extract) for f in vqa.files] == [
        (described["my_vqa"]["files"][0]["size"], described["my_vqa"]["files"][0]["sha256"], True)
    ]
    assert captions.url_list is not None
    assert (captions.url_list.format, captions.url_list.url_column, captions.url_list.shard_size) == ("tsv", 1, 10000)
