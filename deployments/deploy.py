"""``prefect --no-prompt deploy ARGS...`` with one fix for the pinned set of packages.

    python deployments/deploy.py --all --prefect-file deployments/prefect.yaml

After creating each deployment, Prefect 3.8.8 asks the server which workers of its pool are
online (only to print a hint) and sends ``"limit": null, "offset": null``; fastapi 0.154
(constraints.txt) rejects explicit nulls there with a 422, so plain ``prefect deploy --all``
stops with a traceback after the first deployment. Here that request sends numbers instead;
everything else is Prefect's own ``deploy`` command. Use plain ``prefect deploy`` with a
Prefect release whose client omits the nulls.
"""

from __future__ import annotations

import sys

from prefect.cli import app
from prefect.client.orchestration._work_pools.client import WorkPoolAsyncClient

_read_workers = WorkPoolAsyncClient.read_workers_for_work_pool


async def _read_workers_with_limit(self, work_pool_name, worker_filter=None, offset=None, limit=None):
    # The hint only needs to know whether one worker is online.
    return await _read_workers(self, work_pool_name, worker_filter=worker_filter,
                               offset=0 if offset is None else offset, limit=1 if limit is None else limit)


if __name__ == "__main__":
    WorkPoolAsyncClient.read_workers_for_work_pool = _read_workers_with_limit
    sys.argv = ["prefect", "--no-prompt", "deploy", *sys.argv[1:]]
    app()
