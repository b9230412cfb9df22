"""What every stage function returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class StageResult:
    """One stage run: where it wrote, what it measured, its named files and its part of a report.

    A composite stage (``pipeline``) builds its report from its steps' results, never by re-reading their files.

    Attributes:
        stage: the stage's name (``pretrain``, ``evaluate``, ...).
        run_dir: the folder the run wrote (with its ``run.json``).
        metrics: what it measured: the content of its ``metrics.json`` (or ``plan.json``).
        outputs: named files, e.g. ``model``, ``adapter``, ``manifest``, ``report``, ``confusion``.
        sections: ``(heading, markdown)`` parts for a report that gathers several stages.
        steps: the results of the stages a composite stage ran, by step name.
    """

    stage: str
    run_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Path] = field(default_factory=dict)
    sections: list[tuple[str, str]] = field(default_factory=list)
    steps: dict[str, StageResult] = field(default_factory=dict)
