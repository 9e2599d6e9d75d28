"""Reading mve's TensorBoard files back with TensorBoard's own event reader (tests only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def read_events(logdir: Path) -> Any:
    """An ``EventAccumulator`` over one run directory, every scalar and image kept."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    return ea


def session_hparams(ea: Any) -> tuple[dict[str, Any], list[str]]:
    """The hparams plugin's hyperparameters and metric tags of a run, as TensorBoard reads
    them."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    values: dict[str, Any] = {}
    metrics: list[str] = []
    for content in ea.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.HasField("session_start_info"):
            for k, v in data.session_start_info.hparams.items():
                values[k] = getattr(v, v.WhichOneof("kind"))
        if data.HasField("experiment"):
            metrics += [m.name.tag for m in data.experiment.metric_infos]
    return values, metrics
