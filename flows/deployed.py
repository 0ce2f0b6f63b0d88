"""Entry flows of the deployments (deployments/prefect.yaml, ``segflow serve``).

A deployment's flow run is started from its entrypoint with the flow's own task runner, which
is fixed when the flow is defined; the pipeline and training flows take theirs from the spec
(``ExecutionSpec``: an existing Dask scheduler, or a local cluster of one worker per GPU),
which only the running flow knows. So each entry flow takes the same spec and starts the flow
as a subflow on the cluster its spec names, as ``segflow run`` and ``segflow train`` do.
"""

# No `from __future__ import annotations`: Prefect builds each flow's parameter model from the
# annotations, and a flow loaded by module path (``segflow serve``) cannot resolve them as strings.
from typing import Any

from prefect import flow

from flows.pipeline import run_flow, with_runner
from flows.train import train_flow
from segcore.config import RunSpec, TrainSpec


@flow(name="segflow-run-deployment")
def run_deployment_flow(spec: RunSpec) -> dict[str, Any]:
    """Ingest + segment + evaluate (the ``segflow-run`` flow) on the cluster of ``spec.segment.execution``."""
    return with_runner(run_flow, spec.segment.execution)(spec)


@flow(name="segflow-train-deployment")
def train_deployment_flow(spec: TrainSpec) -> dict[str, Any]:
    """Train a model (the ``segflow-train`` flow) on the cluster of ``spec.execution``."""
    return with_runner(train_flow, spec.execution)(spec)
