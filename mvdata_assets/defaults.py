"""The defaults of the MVDATA_* settings that the engines take as arguments, in one place: settings.py falls back to
them when a variable is unset, and the engines' keyword arguments default to them, so an engine called on its own
(a test, a benchmark, a notebook) behaves as the assets do. Plain Python, imported by both sides.
"""

DOWNLOAD_CONCURRENCY = 16  # catalog files in flight at once
IMAGE_CONCURRENCY = 64  # URL-list images in flight at once ...
IMAGE_HOST_CONNECTIONS = 16  # ... of which at most this many to one host
IMAGE_TIMEOUT_S = 10.0  # an image transfer receiving nothing for this long fails as `timeout`
EXTRACT_MAX_RATIO = 100  # text compresses ~10x; a zip bomb expands 1,000x and more
LOCK_TIMEOUT_S = 600.0  # a writer (of the warehouse, of a dataset's files) waits this long for another one
RUNNING_WINDOW_S = 300.0  # a run with no exit record is running while its file changed this recently
API_CONCURRENCY = 8  # W&B API runs fetched at once
API_TIMEOUT_S = 60.0  # one W&B GraphQL request, retries included
