"""The project's definitions under Dagster's multiprocess executor: every step in a process of its own, datasets
downloaded side by side, as a user's module for a workstation would have them.

    dagster asset materialize -m mvdata_assets_tests.multiprocess_project --select '*'
"""

from dagster import multiprocess_executor

from mvdata_assets.definitions import project_definitions

defs = project_definitions(multiprocess_executor.configured({"max_concurrent": 3}))
