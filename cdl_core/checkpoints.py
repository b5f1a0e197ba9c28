"""Per-task teacher checkpoints in a directory, so a teacher is trained once and reused.

Layout: `<dir>/teacher.json` (what the teacher depends on, and its accuracy rows so far) and
`<dir>/task_<t>.pt` (the teacher's trainable state after task t). Files are written aside and renamed, so a
crash never leaves a half-written checkpoint under its final name.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch


class TeacherCheckpointError(RuntimeError):
    """The directory holds no usable checkpoint for this teacher."""


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


class TeacherCheckpoints:
    def __init__(self, directory: str | Path, identity: dict[str, Any]) -> None:
        self.dir = Path(directory).expanduser()
        self.identity = json.loads(json.dumps(identity))
        self.manifest_path = self.dir / "teacher.json"

    def _manifest(self) -> dict[str, Any] | None:
        if not self.manifest_path.is_file():
            return None
        manifest = json.loads(self.manifest_path.read_text())
        if manifest.get("identity") != self.identity:
            stored = manifest.get("identity", {})
            differing = sorted(k for k in set(stored) | set(self.identity) if stored.get(k) != self.identity.get(k))
            raise TeacherCheckpointError(
                f"teacher checkpoints in {self.dir} were made for a different teacher (differs in: {', '.join(differing)}); "
                "use another --teacher-dir or delete that one"
            )
        return manifest

    def has(self, task_id: int) -> bool:
        manifest = self._manifest()
        return manifest is not None and str(task_id) in manifest["tasks"] and (self.dir / f"task_{task_id}.pt").is_file()

    def load(self, task_id: int) -> tuple[dict[str, torch.Tensor], dict[str, list[float]]]:
        """Trainable state after `task_id` and the teacher's accuracy rows for that task."""
        if not self.has(task_id):
            raise TeacherCheckpointError(
                f"no teacher checkpoint for task {task_id} in {self.dir}; train the teacher there first "
                "(run with --teacher-dir, which saves as it trains)"
            )
        manifest = self._manifest()
        state = torch.load(self.dir / f"task_{task_id}.pt", map_location="cpu", weights_only=True)
        return state, manifest["tasks"][str(task_id)]

    def save(self, task_id: int, state: dict[str, torch.Tensor], rows: dict[str, list[float]]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.dir / f"task_{task_id}.pt", lambda p: torch.save(state, p))
        manifest = self._manifest() or {"identity": self.identity, "tasks": {}}
        manifest["tasks"][str(task_id)] = rows
        _atomic_write(self.manifest_path, lambda p: p.write_text(json.dumps(manifest, indent=1)))
