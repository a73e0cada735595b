"""Multi-process data parallelism for ``manualgrad train`` on JAX's own multi-controller runtime.

One process per host runs the same program (``jax.distributed``); CPU collectives go through
gloo. The mesh of :func:`manualgrad.train.loop.mesh` then spans every process's devices,
process-major (:func:`devices`), so ``batch_size`` stays the *global* batch ``B`` and process
``p`` of ``P`` feeds its rows ``[p·B/P, (p+1)·B/P)`` of it (:func:`global_batch`, through
``jax.make_array_from_process_local_data``). Every process computes the same epoch order, so
the global batch is the one-process batch and the step is the one-process program: XLA's
all-reduce over the mesh sums the per-device partial gradients (``Σ_d Oᵀ_d G_d``) whether the
devices sit in one process or in several. Parameters, optimizer state and model state are
replicated (``P()``).

Process 0 alone writes (:func:`is_writer`): the run folder, metrics, plots and checkpoints;
``out``/``resume`` must therefore name a folder every process sees at the same path (a
shared file system; one host trivially). On ``resume`` every process reads the newest
checkpoint itself, and :func:`agree` makes all of them stop with an error unless they hold the
same arguments and the same step. Ctrl-C stops every process at the same step
(:func:`stop_requested`).

Starting: ``coordinator`` (``HOST:PORT``), ``num_processes`` and ``process_id`` name everything, or
``distributed="auto"`` lets ``jax.distributed.initialize()`` detect it (SLURM, Open MPI, Cloud
TPU, Kubernetes with ``jax[k8s]``; ``"mpi4py"`` for other MPIs); the fields given explicitly
override what is detected. A process that dies stops the others: JAX's coordination service
misses its heartbeat for ``process_timeout`` seconds and terminates every other process with
``Terminating process because the JAX distributed service detected fatal errors`` (SIGABRT);
the same timeout bounds the wait for all processes to join at start and to meet at exit.

:func:`launch` (``manualgrad launch --processes N -- train ARGS``) starts N such processes on
this machine with the coordinator on a free localhost port.
"""

from __future__ import annotations

import hashlib
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import IO, Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from manualgrad.text import first_line
from manualgrad.train.errors import FieldMessage

DETECTIONS: dict[str, str | None] = {"auto": None, "mpi4py": "mpi4py"}  # distributed -> jax's detection method
DEFAULT_TIMEOUT = 60  # seconds: process_timeout
WRITER = 0  # the process that writes the run's files
COLLECTIVES = "jax_cpu_collectives_implementation"  # the config option naming CPU collectives (jax 0.10)
STOP_EVERY = 10  # steps between two comparisons of the processes' Ctrl-C flags
LAUNCHED = ("--coordinator", "--num-processes", "--process-id", "--distributed")  # what launch sets itself
_ADDRESS = re.compile(r"(?P<host>\[[0-9a-fA-F:.]+\]|[^\s:\[\]]+):(?P<port>\d{1,5})")


class DistributedError(FieldMessage, ValueError):
    """Settings of a multi-process run that cannot work, or processes that do not agree, naming the
    :class:`~manualgrad.train.config.Config` fields at fault (:class:`~manualgrad.train.errors.FieldMessage`)."""


def requested(config: Any) -> bool:
    """Whether ``config`` (a :class:`~manualgrad.train.config.Config`) asks for ``jax.distributed``."""
    return config.distributed is not None or any(
        value is not None for value in (config.coordinator, config.num_processes, config.process_id)
    )


def validate(config: Any) -> None:
    """Raises :class:`DistributedError` naming the first distributed flag that cannot work."""
    explicit = {
        "coordinator": config.coordinator,
        "num_processes": config.num_processes,
        "process_id": config.process_id,
    }
    if config.distributed is not None and config.distributed not in DETECTIONS:
        raise DistributedError(
            "{distributed} must be " + " or ".join(DETECTIONS) + ", got {got!r}", got=config.distributed
        )
    missing = [f"{{{field}}}" for field, value in explicit.items() if value is None]
    if config.distributed is None and 0 < len(missing) < len(explicit):
        given = ", ".join(f"{{{field}}}" for field, value in explicit.items() if value is not None)
        raise DistributedError(
            f"{given} also needs {' and '.join(missing)} "
            "(or {distributed} auto to detect them under SLURM, Open MPI or Kubernetes)"
        )
    _validate_numbers(config)


def _validate_numbers(config: Any) -> None:
    """``coordinator`` (``HOST:PORT``), ``num_processes``, ``process_id`` and ``process_timeout`` in range."""
    if config.coordinator is not None and not _valid_address(config.coordinator):
        raise DistributedError(
            "{coordinator} must be HOST:PORT with a port from 1 to 65535, got {got!r}", got=config.coordinator
        )
    if config.num_processes is not None and config.num_processes < 1:
        raise DistributedError("{num_processes} must be ≥ 1, got {got}", got=config.num_processes)
    if config.process_id is not None and not 0 <= config.process_id < (config.num_processes or sys.maxsize):
        last = "" if config.num_processes is None else f" to {config.num_processes - 1}"
        raise DistributedError(
            "{process_id} must be from 0{last} (one less than {num_processes}), got {got}",
            last=last,
            got=config.process_id,
        )
    if not config.process_timeout > 0:
        raise DistributedError("{process_timeout} must be > 0 seconds, got {got:g}", got=config.process_timeout)


def _valid_address(address: str) -> bool:
    match = _ADDRESS.fullmatch(address)
    return match is not None and 1 <= int(match["port"]) <= 65535


def initialize(config: Any) -> None:
    """Joins the run's processes through ``jax.distributed.initialize`` with gloo CPU collectives;
    nothing without distributed flags, or when this process has joined already.

    Must run before the process's first JAX computation.
    """
    if not requested(config) or jax.distributed.is_initialized():
        return
    # gloo is jax 0.10's default too; set it against a site default saying otherwise, where the option exists.
    if COLLECTIVES in jax.config.values:
        jax.config.update(COLLECTIVES, "gloo")
    timeout = int(config.process_timeout)
    try:
        jax.distributed.initialize(
            config.coordinator,
            config.num_processes,
            config.process_id,
            cluster_detection_method=DETECTIONS[config.distributed or "auto"],
            initialization_timeout=timeout,
            heartbeat_timeout_seconds=timeout,
            shutdown_timeout_seconds=timeout,
        )
    except ValueError as error:  # what jax's detection could not fill in
        raise DistributedError(
            "{distributed} {how} found no cluster to join ({error}): run under SLURM, Open MPI or Kubernetes, "
            "or give {coordinator:HOST:PORT} {num_processes:N} {process_id:I}",
            how=config.distributed or "auto",
            error=error,
        ) from error
    except RuntimeError as error:  # jaxlib's XlaRuntimeError: the others did not join in time, or the port is taken
        raise DistributedError(
            "could not join the other processes through the coordinator {address} within {process_timeout} "
            "{timeout} s: {error}",
            address=config.coordinator or "(detected)",
            timeout=timeout,
            error=first_line(error),
        ) from error


def is_writer() -> bool:
    """Whether this process writes the run's files (process 0, or the only one)."""
    return jax.process_index() == WRITER


def devices(per_process: int) -> list[jax.Device]:
    """The first ``per_process`` devices of every process, process 0's first: the mesh's order, so that
    each process's rows of a batch sharded along it are one contiguous block."""
    by_process: dict[int, list[jax.Device]] = {}
    for device in sorted(jax.devices(), key=lambda d: (d.process_index, d.id)):
        by_process.setdefault(device.process_index, []).append(device)
    return [device for _, own in sorted(by_process.items()) for device in own[:per_process]]


def global_batch(rows: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """The global batch ``rows`` (the same on every process) as one array sharded by ``sharding``, built
    from this process's block of rows only (``jax.make_array_from_process_local_data``)."""
    blocks = [index[0] for index in sharding.addressable_devices_indices_map(rows.shape).values()]
    start = min(block.start or 0 for block in blocks)
    stop = max(len(rows) if block.stop is None else block.stop for block in blocks)
    return jax.make_array_from_process_local_data(sharding, rows[start:stop], rows.shape)


def stop_requested(pressed: bool, step: int) -> bool:
    """Whether Ctrl-C has reached any process, asked by every process before step ``step``: the processes
    compare their flags every :data:`STOP_EVERY` steps (a gather across the processes, too dear for every step),
    so all of them stop at the same step, at most ``STOP_EVERY - 1`` steps after the first press."""
    if jax.process_count() == 1:
        return pressed
    if step % STOP_EVERY:
        return False
    return bool(np.any(multihost_utils.process_allgather(np.array(pressed))))


def agree(description: str) -> None:
    """Raises :class:`DistributedError` on every process unless all hold the same ``description`` (their
    run-defining arguments and step); every process must call it at the same point."""
    if jax.process_count() == 1:
        return
    digest = np.frombuffer(hashlib.sha256(description.encode()).digest(), np.uint8)
    gathered = multihost_utils.process_allgather(digest)
    others = [p for p in range(len(gathered)) if not np.array_equal(gathered[p], gathered[WRITER])]
    if others:
        raise DistributedError(
            "process(es) {others} hold other arguments or another checkpoint than process {writer} (this one: "
            + description
            + "); start every process with the same arguments and an {out}/{resume} folder they all see",
            others=", ".join(map(str, others)),
            writer=WRITER,
        )


def free_port() -> int:
    """A TCP port that no socket on this machine holds now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def exit_status(returncode: int) -> int:
    """A child's return code as a shell reports it: ``128 + N`` for a process killed by signal ``N``."""
    return 128 - returncode if returncode < 0 else returncode


def launch(processes: int, arguments: Sequence[str], host: str = "localhost") -> int:
    """Runs ``manualgrad ARGUMENTS`` (``train …``) as ``processes`` processes of one distributed run on this
    machine; returns the worst exit status (the largest, a signal's as ``128 + N``).

    The coordinator listens on a free port of ``host``. Each process runs in a session of its own,
    so that a terminal's Ctrl-C reaches this launcher alone, which forwards SIGINT (and SIGTERM)
    to every process once per signal it receives: the first stops them all at one step with a
    checkpoint, a second stops them at once. The processes' output reaches this launcher's stdout
    and stderr a whole line at a time (:func:`_relay`), without gloo's connection notices.
    """
    _validate_launch(processes, arguments)
    address = f"{host}:{free_port()}"
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "manualgrad", *arguments]
            + ["--coordinator", address, "--num-processes", str(processes), "--process-id", str(i)],
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )
        for i in range(processes)
    ]
    lock = threading.Lock()
    relays = [
        threading.Thread(target=_relay, args=(pipe, sink, lock), daemon=True)
        for child in children
        for pipe, sink in ((child.stdout, sys.stdout), (child.stderr, sys.stderr))
    ]
    for relay in relays:
        relay.start()

    def forward(signum: int, frame: Any) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        statuses = [exit_status(child.wait()) for child in children]
        for relay in relays:
            relay.join()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    for i, status in enumerate(statuses):
        if status:
            print(f"manualgrad launch: process {i} of {processes} exited with status {status}", file=sys.stderr)
    return max(statuses)


def _validate_launch(processes: int, arguments: Sequence[str]) -> None:
    """Raises :class:`DistributedError` unless ``arguments`` are a ``train`` command that launch can complete."""
    if processes < 1:
        raise DistributedError("{processes} must be ≥ 1, got {got}", got=processes)
    if not arguments or arguments[0] != "train":
        raise DistributedError(
            "give the command to run after --, e.g. -- train --epochs 2; got {got}", got=list(arguments)
        )
    given = [a.split("=", 1)[0] for a in arguments if a.split("=", 1)[0] in LAUNCHED]
    if given:
        raise DistributedError(
            "{given} are set by launch itself; leave them out of the train arguments", given=", ".join(given)
        )


# gloo's TCP transport writes "[Gloo] Rank R is connected to N peer ranks ..." from C++ for every
# process that joins: a notice for its developers, which a run's log need not repeat.
_NOTICE = "[Gloo] "


def _relay(pipe: IO[str], sink: IO[str], lock: threading.Lock) -> None:
    """Copies ``pipe`` to ``sink`` a whole line at a time (under ``lock``, shared by every process's
    pipes, so that two processes' lines never mix), leaving out gloo's notices."""
    with pipe:
        for line in pipe:
            if not line.startswith(_NOTICE):
                with lock:
                    sink.write(line)
                    sink.flush()
