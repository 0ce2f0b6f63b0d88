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



class S3Server:
    """A local S3-compatible server (moto) for the session; ``bucket()`` makes a fresh, empty bucket."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._count = 0

    def bucket(self) -> str:
        """``"s3://<new bucket>"``: a bucket created for the caller alone."""
        import uuid

        import s3fs

        self._count += 1
        name = f"segflow-test-{self._count}-{uuid.uuid4().hex[:8]}"
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir(name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 with the ``AWS_*`` environment pointing at it (restored afterwards).

    Worker processes started during the session inherit the endpoint and the dummy credentials.
    """
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield S3Server(endpoint)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
