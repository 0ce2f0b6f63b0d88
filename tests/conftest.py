"""Session-wide fixtures: an isolated Prefect (temporary server and home), offline settings."""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

# Keep Hypothesis' example database out of the working tree.
from hypothesis import configuration  # noqa: E402

configuration.set_hypothesis_home_dir(tempfile.mkdtemp(prefix="segflow-hypothesis-"))


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """A temporary Prefect server and database for the whole session (only for tests that run flows)."""
    home = tmp_path_factory.mktemp("prefect-home")
    os.environ["PREFECT_HOME"] = str(home)
    from prefect.testing.utilities import prefect_test_harness

    from prefect.settings import PREFECT_API_URL

    with prefect_test_harness(server_startup_timeout=120):
        # Dask worker processes inherit the environment, not Prefect's settings context.
        os.environ["PREFECT_API_URL"] = PREFECT_API_URL.value()
        yield
        del os.environ["PREFECT_API_URL"]

