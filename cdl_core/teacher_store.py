"""Content-addressed store of trained teachers, so each distinct teacher is trained once and reused.

An entry is addressed by a key, the hash of everything the teacher's training depends on (see
`cdl_core.teacher_identity`), and holds the teacher task by task:

    <root>/<key>/teacher.json    identity (the teacher's config) and what its first writer checked it against
    <root>/<key>/task_<t>.pt     the teacher's trainable state after task t
    <root>/<key>/task_<t>.json   commit record of task t: sha256 and size of task_<t>.pt, the accuracy rows
    <root>/<key>/signals_<t>_<variant>.pt/.json   its students' frozen signals on task t (cdl_core.signal_cache)

Every file is written under a temporary name and then moved into place, and a task counts as stored only
once its commit record exists, which is written after its state file. A writer killed mid-entry therefore
leaves at most a temporary file or an uncommitted state file: never served, and rewritten by the next writer.
Loading verifies the state file's sha256 against its record.

`root` is a local directory or a URI that pyarrow's filesystems open (s3://bucket/prefix, gs://..., hdfs://,
file://), so all nodes of a cluster share one store. pyarrow is already a pinned dependency; this module is
storage only and knows nothing of Ray, MLflow or Optuna.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch

from cdl_core.errors import TeacherStoreError
from cdl_core.teacher_identity import content_key  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

TEMP_PREFIX = ".tmp-"


def open_filesystem(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, root path inside it) for a local directory or a filesystem URI."""
    text = str(location).strip()
    if not text:
        raise TeacherStoreError("the teacher store location is empty; give a directory or a URI such as s3://bucket/teachers")
    if "://" not in text:
        return pafs.LocalFileSystem(), str(Path(text).expanduser().resolve())
    try:
        return pafs.FileSystem.from_uri(text)
    except (ValueError, OSError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise TeacherStoreError(f"cannot open teacher store {text!r}: {err}") from None


class TeacherStore:
    def __init__(self, location: str | Path, filesystem: pafs.FileSystem | None = None) -> None:
        self.location = str(location)
        if filesystem is None:
            self.fs, self.root = open_filesystem(location)
        else:
            self.fs, self.root = filesystem, str(location)

    def __repr__(self) -> str:
        return f"TeacherStore({self.location!r})"

    def entry(self, key: str) -> TeacherEntry:
        return TeacherEntry(self, key)

    def keys(self) -> list[str]:
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory and not i.base_name.startswith("."))

    def remove(self, key: str) -> None:
        self.fs.delete_dir(posixpath.join(self.root, key))


class TeacherEntry:
    def __init__(self, store: TeacherStore, key: str) -> None:
        self.store, self.key = store, key
        self.fs = store.fs
        self.path = posixpath.join(store.root, key)

    def __repr__(self) -> str:
        return f"teacher {self.key} in {self.store.location}"

    # -- files ----------------------------------------------------------------------------------------------
    def _file(self, name: str) -> str:
        return posixpath.join(self.path, name)

    def _write_atomic(self, name: str, data: bytes) -> None:
        self.fs.create_dir(self.path, recursive=True)
        temp = self._file(f"{TEMP_PREFIX}{uuid.uuid4().hex}-{name}")
        with self.fs.open_output_stream(temp) as out:
            out.write(data)
        self.fs.move(temp, self._file(name))

    def _read(self, name: str) -> bytes | None:
        try:
            with self.fs.open_input_stream(self._file(name)) as stream:
                return stream.read()
        except FileNotFoundError:
            return None

    def _read_json(self, name: str) -> dict[str, Any] | None:
        data = self._read(name)
        try:
            return json.loads(data) if data is not None else None
        except ValueError:
            return None

    def _delete(self, name: str) -> None:
        try:
            self.fs.delete_file(self._file(name))
        except FileNotFoundError:
            pass

    def files(self) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))

    # -- the entry -----------------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any] | None:
        return self._read_json("teacher.json")

    def check(self, identity: dict[str, Any], facts: dict[str, str]) -> None:
        """Refuse an entry made for another identity, or whose weights or data behind the same config differ
        (`facts`: e.g. the loaded weights' sha256, the data split's fingerprint)."""
        manifest = self.manifest()
        if manifest is None:
            return
        if manifest["identity"] != json.loads(json.dumps(identity)):
            raise TeacherStoreError(
                f"{self} holds a different teacher under the same key; remove it: "
                f"python -m orchestrator.teachers --store {self.store.location} prune --key {self.key}"
            )
        differing = sorted(k for k in facts if k in manifest["facts"] and manifest["facts"][k] != facts[k])
        if differing:
            raise TeacherStoreError(
                f"{self} was trained with different {', '.join(differing)} than this run loads for the same config "
                f"(the weights or data behind it changed); retrain it by removing the entry: "
                f"python -m orchestrator.teachers --store {self.store.location} prune --key {self.key}"
            )

    def committed(self) -> list[int]:
        names = {i.base_name for i in self.files()}
        return sorted(int(n[5:-5]) for n in names if n.startswith("task_") and n.endswith(".json") and self.has(int(n[5:-5])))

    def record(self, task_id: int) -> dict[str, Any] | None:
        return self._read_json(f"task_{task_id}.json")

    def has(self, task_id: int) -> bool:
        """Task committed: a record exists and the state file is there with the recorded size."""
        return self.has_file(f"task_{task_id}")

    def has_file(self, stem: str) -> bool:
        """`<stem>.pt` committed: its record `<stem>.json` exists and the file has the recorded size."""
        record = self._read_json(f"{stem}.json")
        if record is None:
            return False
        info = self.fs.get_file_info(self._file(f"{stem}.pt"))
        return info.type == pafs.FileType.File and info.size == record["size"]

    def load(self, task_id: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The teacher's trainable state after `task_id` and its commit record, checksum verified."""
        return self.load_file(f"task_{task_id}", f"no stored task {task_id}; train the teacher first (run without --require-teacher)")

    def load_file(self, stem: str, missing: str | None = None) -> tuple[Any, dict[str, Any]]:
        """The tensors of committed `<stem>.pt` and its record, checksum verified; `missing` says what to do when
        it is not there."""
        record = self._read_json(f"{stem}.json")
        data = self._read(f"{stem}.pt") if record is not None else None
        if data is None:
            raise TeacherStoreError(f"{self} has {missing or f'no {stem}.pt'}")
        digest = hashlib.sha256(data).hexdigest()
        if digest != record["sha256"]:
            raise TeacherStoreError(
                f"{self}: {stem}.pt fails its checksum (sha256 {digest[:12]}..., recorded {record['sha256'][:12]}...); "
                "the file is corrupted and will not be used"
            )
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), record

    def save(
        self, task_id: int, state: dict[str, torch.Tensor], rows: dict[str, list[float]],
        identity: dict[str, Any], facts: dict[str, str], seconds: float = 0.0,
    ) -> dict[str, Any]:
        """Store the state after `task_id`: manifest (if new), state file, then the commit record."""
        if self.manifest() is None:
            manifest = {"key": self.key, "identity": identity, "facts": facts, "created": time.time()}
            self._write_atomic("teacher.json", json.dumps(manifest, indent=1, sort_keys=True).encode())
        return self.save_file(f"task_{task_id}", state, {"task_id": task_id, "rows": rows, "seconds": seconds})

    def save_file(self, stem: str, tensors: Any, record: dict[str, Any]) -> dict[str, Any]:
        """Write `tensors` to `<stem>.pt`, then commit it with `<stem>.json`: `record` plus the file's sha256 and size."""
        self._delete(f"{stem}.json")  # uncommit first when replacing a file (e.g. after a checksum failure)
        buffer = io.BytesIO()
        torch.save(tensors, buffer)
        data = buffer.getvalue()
        self._write_atomic(f"{stem}.pt", data)
        record = record | {
            "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
            "trained_by": f"{socket.gethostname()}:{os.getpid()}", "created": time.time(),
        }
        self._write_atomic(f"{stem}.json", json.dumps(record, indent=1).encode())
        return record

    def matrix(self, split: str = "test") -> list[list[float]]:
        """The teacher's accuracy rows R[t][0..t] for the consecutive committed tasks from task 0."""
        rows = []
        while self.has(len(rows)):
            rows.append(self.record(len(rows))["rows"][split])
        return rows

    def stray(self) -> list[pafs.FileInfo]:
        """Temporary and uncommitted files: what a killed writer leaves (or one writing right now)."""
        def uncommitted(name: str) -> bool:
            return name.endswith(".pt") and not self.has_file(name[:-3])

        return [i for i in self.files() if i.base_name.startswith(TEMP_PREFIX) or uncommitted(i.base_name)]

    def clean(self) -> list[str]:
        """Delete the stray files; returns their names."""
        removed = []
        for info in self.stray():
            self.fs.delete_file(info.path)
            removed.append(info.base_name)
        return removed

    def size_bytes(self) -> int:
        return sum(i.size or 0 for i in self.files() if i.type == pafs.FileType.File)
