"""`status.json`: every point's state (pending, running, done, skipped, failed), files, error and timing."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from chunky_utils.cache import atomic_write_json
from chunky_utils.config import RunConfig
from chunky_utils.sweep.spec import PointGroup, result_path

STATUS_FILE = "status.json"


def iso_time(timestamp: float) -> str:
    """A Unix time as UTC ISO 8601 text, to the millisecond."""
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds")


class SweepStatus:
    """`status.json`: one entry per point (state, files, error, timing); written atomically after each group."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = folder
        self.name = name
        self.path = folder / STATUS_FILE
        self.points: dict[str, dict[str, Any]] = {}
        self.previous = self._read_points()

    def _read_points(self) -> dict[str, dict[str, Any]]:
        try:
            return dict(json.loads(self.path.read_text(encoding="utf-8"))["points"])
        except (OSError, ValueError, KeyError, TypeError):
            return {}

    def add(self, group: PointGroup, config: RunConfig, state: str) -> None:
        """Register a point; a skipped one keeps the timing and worker of the run that made it."""
        point = group.point_id(config)
        earlier = self.previous.get(point, {}) if state == "skipped" else {}
        kept = {key: earlier[key] for key in ("seconds", "started_at", "finished_at", "worker") if key in earlier}
        self.points[point] = {
            "state": state,
            "group": group.id,
            "target_subset": config.target_subset,
            "baseline_subset": config.baseline_subset,
            "layer": config.layer,
            "scale": config.scale,
            "inference_dataset": config.inference_dataset,
            "inference_n_samples": config.inference_n_samples,
            "result": result_path(config).relative_to(self.folder).as_posix(),
            "notebook": group.notebook_path.relative_to(self.folder).as_posix(),
            "error": None,
            **kept,
        }

    def update(self, point_id: str, **values: Any) -> None:
        """Change fields of one point's entry."""
        self.points[point_id].update(values)

    def counts(self) -> dict[str, int]:
        """How many points are in each state."""
        counts: dict[str, int] = {}
        for entry in self.points.values():
            counts[entry["state"]] = counts.get(entry["state"], 0) + 1
        return counts

    def save(self) -> Path:
        """Write status.json atomically."""
        return atomic_write_json(
            self.path,
            {
                "name": self.name,
                "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "counts": self.counts(),
                "points": self.points,
            },
        )
