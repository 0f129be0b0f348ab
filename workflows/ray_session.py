"""The one way xrcam starts or joins Ray: :func:`ray_session`.

``run``, ``train --workers`` and ``reduce --address`` all go through it, so every command behaves
alike (``reduce`` without an address runs in threads of its own process, no Ray):

- with an address (argument, else ``XRCAM_ADDRESS``) it joins that cluster;
- without one it starts a local Ray bound to 127.0.0.1 (loopback only), without dashboard or usage
  statistics, with token authentication as Ray's default for a new local cluster has it (without
  Ray's notice saying so);
- an already initialised Ray (a notebook, the test session) is reused;
- Ray's own INFO lines are kept off the terminal; one line on stderr says that Ray is starting
  (it takes ~10-20 s), so the wait is not silent;
- on exit it shuts down only a Ray it started itself; a local Ray it starts is marked with
  :func:`workflows.ray_guard.orphan_guard`, so its processes die with this one even after a SIGKILL.

Process-wide settings of worker processes live in :func:`tune_process`, installed as Ray's
``worker_process_setup_hook`` for every worker of the job.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

__all__ = [
    "ADDRESS_ENVVAR",
    "WORKER_SETUP_HOOK",
    "ray_session",
    "resolve_address",
    "tune_process",
    "without_token_notice",
]

ADDRESS_ENVVAR = "XRCAM_ADDRESS"  # the one cluster-address variable of every command that joins Ray
WORKER_SETUP_HOOK = f"{__name__}.tune_process"  # runs once in every Ray worker process of our jobs

_LOOPBACK = "127.0.0.1"
_TOKEN_LOGGER = "ray._private.authentication.authentication_token_setup"
_WITHOUT_DASHBOARD_NOISE = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def resolve_address(address: str | None = None) -> str | None:
    """``address``, else ``$XRCAM_ADDRESS``, else ``None`` (start a local Ray)."""
    return address or os.environ.get(ADDRESS_ENVVAR) or None


def tune_process() -> None:
    """Process-wide settings of every Ray worker process of our jobs (setting them twice is harmless).

    Silences Ray Train's State-API polling warnings: Ray Train polls the State API, which a local
    session without dashboard does not serve, and warns about it every few seconds from a helper
    actor, saying nothing actionable here. (Memory is left to glibc: a fixed mmap threshold made every
    multi-MB tensor of an explanation a fresh mapping and `xrcam run` 1.4x slower.)
    """
    for name in _WITHOUT_DASHBOARD_NOISE:
        logging.getLogger(name).setLevel(logging.ERROR)


def _loopback_even_if_ray_was_imported() -> None:
    """Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, at import: apply it if ray came first."""
    try:
        from ray._private import ray_constants
    except ImportError:  # layout of another Ray version: the environment variable alone then decides
        return
    if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0" and hasattr(
        ray_constants, "ENABLE_RAY_CLUSTER"
    ):
        ray_constants.ENABLE_RAY_CLUSTER = False


class _TokenNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


@contextlib.contextmanager
def without_token_notice() -> Iterator[None]:
    """Drop Ray's notice that a new local cluster uses token authentication (its default, which we keep).

    Only that one informational line is filtered; any other authentication warning still shows. For code
    that must call ``ray.init`` itself (the test session's shared local Ray), wrap the call in it.
    """
    notice = _TokenNotice()
    logger = logging.getLogger(_TOKEN_LOGGER)
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


@contextlib.contextmanager
def ray_session(
    address: str | None = None, *, num_cpus: int | None = None, quiet: bool = False
) -> Iterator[bool]:
    """Start or join Ray for the body of the ``with``; yields whether this call started it.

    ``address`` (else ``XRCAM_ADDRESS``) names a cluster to join (``host:port`` or ``auto``); without
    one a local Ray on 127.0.0.1 with ``num_cpus`` CPUs (default: all) is started. ``quiet`` drops the
    one-line start-up notice on stderr. On exit Ray is shut down only if this call started it.
    """
    address = resolve_address(address)
    restore: dict[str, str | None] = {}
    if not address:
        # read by ray at start-up: the local node then takes 127.0.0.1 instead of an outward-facing IP
        # and sends no usage statistics
        for key, value in (("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"), ("RAY_USAGE_STATS_ENABLED", "0")):
            if key not in os.environ:
                restore[key] = None
                os.environ[key] = value
    import ray

    if not address:
        _loopback_even_if_ray_was_imported()
    started = False
    guard = contextlib.ExitStack()
    try:
        if not ray.is_initialized():
            if not address:  # a Ray we start dies with this process, even a SIGKILLed one
                from workflows.ray_guard import orphan_guard

                guard.enter_context(orphan_guard())
            if not quiet:
                where = (
                    f"joining the Ray cluster at {address}"
                    if address
                    else "starting a local Ray on 127.0.0.1"
                )
                print(f"xrcam: {where}…", file=sys.stderr, flush=True)
            common = {
                "logging_level": logging.WARNING,
                "log_to_driver": True,
                "runtime_env": {"worker_process_setup_hook": WORKER_SETUP_HOOK},
            }
            with without_token_notice():
                if address:
                    ray.init(address=address, **common)
                else:
                    ray.init(
                        address="local",
                        num_cpus=num_cpus,
                        include_dashboard=False,
                        _node_ip_address=_LOOPBACK,
                        **common,
                    )
            started = True
        yield started
    finally:
        if started:
            ray.shutdown()
        guard.close()  # after Ray's own shutdown: kills whatever of it is left
        for key, value in restore.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
