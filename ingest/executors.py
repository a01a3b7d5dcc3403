"""Where a job's units run: in this process (`local`) or as Ray tasks on a cluster (`ray`).

An executor maps a picklable function over picklable units and yields each outcome as it arrives
(the result, or the exception that ended the unit), so that the driver can record every unit in the
ledger the moment it is done. The driver alone touches the database; workers read the models, the
token rows and the shard directory, and write only their unit's state file there.

Ray is an optional extra (`pip install 'neuron-atlas[ray]'`), imported only when `--executor ray` is
asked for. A task whose worker dies (SIGKILL, a lost node) is retried by Ray up to `max_retries`
times; an error raised by the unit's own code is not retried (it would fail the same way again).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, Protocol, Sequence

from atlas.errors import AtlasError, first_line

log = logging.getLogger(__name__)

Outcome = tuple[int, Any]  # (index of the unit, its result or the exception that ended it)


class Executor(Protocol):
    name: str

    def map(self, function: Callable[[Any], Any], units: Sequence[Any]) -> Iterator[Outcome]: ...

    def call(self, function: Callable[[Any], Any], unit: Any, gpus: float | None = None) -> Any: ...


class LocalExecutor:
    """Every unit in this process, one after the other (the default)."""

    name = "local"

    def map(self, function: Callable[[Any], Any], units: Sequence[Any]) -> Iterator[Outcome]:
        for index, unit in enumerate(units):
            try:
                result = function(unit)
            except Exception as error:  # noqa: BLE001 - reported per unit; KeyboardInterrupt stops the run
                yield index, error
            else:
                yield index, result

    def call(self, function: Callable[[Any], Any], unit: Any, gpus: float | None = None) -> Any:
        return function(unit)


class RayExecutor:
    """Each unit a Ray task with its resources; outcomes in completion order."""

    name = "ray"

    def __init__(self, address: str | None = None, gpus_per_task: float | None = None, cpus_per_task: float = 1.0,
                 max_retries: int = 3) -> None:
        try:
            import ray
        except ImportError:
            raise AtlasError("--executor ray needs Ray, which is not installed: pip install 'neuron-atlas[ray]'") from None
        self.ray = ray
        if not ray.is_initialized():
            try:  # address None starts a Ray instance on this machine; 'auto' or HOST:PORT joins a cluster
                ray.init(address=address, log_to_driver=log.isEnabledFor(logging.DEBUG))
            except (ConnectionError, RuntimeError, ValueError) as error:
                raise AtlasError(f"cannot reach the Ray cluster at {address!r} ({first_line(error)}): start one with "
                                 "`ray start --head`, or leave out --ray-address to run Ray on this machine") from None
        cluster_gpus = float(ray.cluster_resources().get("GPU", 0.0))
        self.gpus_per_task = (1.0 if cluster_gpus else 0.0) if gpus_per_task is None else float(gpus_per_task)
        if self.gpus_per_task > cluster_gpus:
            raise AtlasError(f"--gpus-per-task {self.gpus_per_task:g} exceeds the cluster's {cluster_gpus:g} GPUs: "
                             "lower it or add GPU workers")
        if cpus_per_task <= 0:
            raise AtlasError(f"--cpus-per-task must be positive, got {cpus_per_task}")
        self.cpus_per_task, self.max_retries = float(cpus_per_task), max_retries
        log.info(f"ray: {ray.cluster_resources().get('CPU', 0):g} CPUs, {cluster_gpus:g} GPUs; "
                 f"{self.cpus_per_task:g} CPU and {self.gpus_per_task:g} GPU per task")

    def _remote(self, function: Callable[[Any], Any], gpus: float | None = None):
        return self.ray.remote(function).options(num_cpus=self.cpus_per_task,
                                                 num_gpus=self.gpus_per_task if gpus is None else gpus,
                                                 max_retries=self.max_retries, retry_exceptions=False)

    def map(self, function: Callable[[Any], Any], units: Sequence[Any], gpus: float | None = None) -> Iterator[Outcome]:
        remote = self._remote(function, gpus)
        pending = {remote.remote(unit): index for index, unit in enumerate(units)}
        try:
            while pending:
                ready, _ = self.ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    index = pending.pop(ref)
                    yield index, self._outcome(ref)
        finally:  # the driver stopped (an error, Ctrl-C): the rest must not keep running
            for ref in pending:
                self.ray.cancel(ref, force=True)

    def _outcome(self, ref: Any) -> Any:
        from ray.exceptions import RayError, RayTaskError

        try:
            return self.ray.get(ref)
        except RayTaskError as error:  # the unit's own exception, raised in the worker
            cause = error.cause if isinstance(getattr(error, "cause", None), BaseException) else None
            return cause or AtlasError(first_line(error))
        except RayError as error:  # the worker or its node died more often than the retries allow
            return AtlasError(f"the Ray task failed {self.max_retries + 1} times ({type(error).__name__}: "
                              f"{first_line(error)}): rerun the job, which skips the units already done")

    def call(self, function: Callable[[Any], Any], unit: Any, gpus: float | None = None) -> Any:
        """One task, waited for; gpus overrides --gpus-per-task (0: a CPU slot, which never queues behind
        the GPU units still waiting)."""
        ((_, outcome),) = list(self.map(function, [unit], gpus))
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def make_executor(name: str, ray_address: str | None = None, gpus_per_task: float | None = None,
                  cpus_per_task: float = 1.0) -> Executor:
    if name == "local":
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(ray_address, gpus_per_task, cpus_per_task)
    raise AtlasError(f"--executor {name!r} is not one of local, ray")
