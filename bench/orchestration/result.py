"""What a job's run produced, as the worker hands it to the parent: the job folder's result.json.

A module of its own so that the parent process (bench/orchestration/job.py, summary.py) reads results without
importing the worker's stack (torch, transformers, peft), which only the worker needs.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.files import atomic_path


@dataclass
class Result:
    """What a run produced; `metrics` keys are the exact MLflow metric names (README: Metrics)."""
    name: str
    status: str                                   # FINISHED | FAILED | KILLED
    run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    skipped: bool = False                         # not run again: a FINISHED run with the same run key existed

    def write(self, out_dir: Path) -> Path:
        """result.json, written atomically (temp file, then rename)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "result.json"
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True))
        return path

    @classmethod
    def read(cls, out_dir: Path) -> "Result | None":
        path = Path(out_dir) / "result.json"
        return cls(**json.loads(path.read_text())) if path.exists() else None
