"""Removes the placement groups that stopped Train-run trials leave behind.

When ASHA stops a Train-run trial (``--workers-per-trial`` > 1), Tune ends the trial actor and
with it the Train V2 controller it owns, before the controller can remove its worker group's
placement group. Ray keeps such a group until the whole job ends, and Train's own
``PlacementGroupCleaner`` only removes it when the Ray state API (the dashboard) is reachable,
which an embedded instance started without a dashboard, or a machine running several Ray
instances, does not give. Left alone, the leaked CPUs starve every later trial.

This reads the GCS placement-group table, a Ray-internal API (``ray._private``): every caller
degrades to a warning when it fails.
"""

from __future__ import annotations

import logging
import time
from typing import Any

__all__ = ["remove_orphaned_placement_groups", "final_sweep", "placement_group_reaper"]

logger = logging.getLogger("cluster.tune")


def remove_orphaned_placement_groups() -> tuple[int, int]:
    """Removes this job's placement groups whose creating actor is dead.

    Only groups created by an actor of this job that has died are removed; Tune's own trial
    groups (created by the driver) and detached groups are left alone.

    Returns:
        ``(removed, alive)``: groups removed, and actor-created groups whose creator lives.
    """
    import ray
    from ray._private.state import state as global_state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    job_id = ray.get_runtime_context().get_job_id()
    removed = alive = 0
    accessor = global_state._connect_and_get_accessor()
    for raw in accessor.get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        creator = pg.creator_actor_id
        # A driver-created group (Tune's own trial groups) has a nil creator id: 0xff...
        by_actor = bool(creator) and creator[:-len(pg.creator_job_id)].strip(b"\xff") != b""
        if (pg.state == gcs_pb2.PlacementGroupTableData.REMOVED or pg.is_detached
                or not by_actor or pg.creator_job_id.hex() != job_id):
            continue
        if not pg.creator_actor_dead:
            alive += 1
            continue
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
        removed += 1
    return removed, alive


def final_sweep(timeout_s: float = 30.0) -> None:
    """After the search: waits for the last Train controllers to go, removing what they leave."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _, alive = remove_orphaned_placement_groups()
        except Exception as exc:  # noqa: BLE001 - Ray internals; degrade to a warning
            logger.warning("cannot sweep orphaned placement groups: %s", exc)
            return
        if not alive or time.monotonic() > deadline:
            return
        time.sleep(0.5)


def placement_group_reaper(interval_s: float = 5.0) -> Any:
    """A Tune callback that calls :func:`remove_orphaned_placement_groups` every few seconds."""
    from ray.tune import Callback

    class PlacementGroupReaper(Callback):
        def __init__(self) -> None:
            self._last = 0.0
            self._failed = False

        def _sweep(self) -> None:
            if self._failed:
                return
            try:
                n, _ = remove_orphaned_placement_groups()
            except Exception as exc:  # noqa: BLE001 - Ray internals; degrade to a warning
                self._failed = True
                logger.warning("cannot sweep orphaned placement groups (%s); stopped Train-run "
                               "trials may hold their CPUs until the search ends", exc)
                return
            if n:
                logger.info("removed %d placement group(s) of stopped Train-run trials", n)

        def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
            now = time.monotonic()
            if now - self._last >= interval_s:
                self._last = now
                self._sweep()

    return PlacementGroupReaper()
