"""The teacher store (`cdl_core.teacher_store`), its key (`cdl_core.teacher_identity`), its CLI and the
lease that shares teacher training across processes (`orchestrator.teachers`).

- the key: the same for configs that differ only in student-side or run-location settings (also in another
  process), different for every setting the teacher's training depends on;
- atomic writes and crash recovery: a writer SIGKILLed while writing a task leaves nothing that is served, and
  the next run trains that task again and gets the results of a run without a store;
- checksums, the manifest check, pyarrow filesystems other than the local one (in-memory object store, file://);
- `python -m orchestrator.teachers list | prune`;
- `LeaseTable` with a fake clock, and (slow) `TeacherSharing.lock` through a real Ray actor.

Every run is the tiny synthetic stream with random backbones; store-backed runs are compared with one run
without a store (same seed, one torch thread, as everywhere in this suite).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import fsspec
import pyarrow.fs as pafs
import pytest
import torch

import cdl_core.teacher_identity
from cdl_core.backbones import create_backbone
from cdl_core.config import BackboneConfig, ConfigError, DataConfig, DistillConfig, PromptConfig, RunConfig, TrainConfig
from cdl_core.training import PhaseTrainer
from cdl_core.learner import ContinualRun, teacher_identity, teacher_key
from cdl_core.teacher_store import TEMP_PREFIX, TeacherStore, TeacherStoreError, content_key
from orchestrator import teachers as teachers_cli
from orchestrator.teachers import LeaseTable

pytestmark = pytest.mark.usefixtures("forbid_demo_pretraining")

ROOT = Path(__file__).resolve().parents[1]
N_TASKS, CLASSES_PER_TASK, TRAIN_PER_CLASS, TEST_PER_CLASS = 2, 5, 1, 1
BATCH = CLASSES_PER_TASK * TRAIN_PER_CLASS  # one step per task


def make_cfg(method="coda", kd="cdl_prompt", schedule="sequential", prompt_params=None, query="student", **distill) -> RunConfig:
    return RunConfig(
        data=DataConfig(name="synthetic", n_tasks=N_TASKS, train_per_class=TRAIN_PER_CLASS, test_per_class=TEST_PER_CLASS, val_fraction=0.0),
        student=BackboneConfig("demo-s", "random"),
        teacher=BackboneConfig("demo-t", "random"),
        query=query,
        prompt=PromptConfig(method, dict(prompt_params or {})),
        distill=DistillConfig(kd, schedule=schedule, **distill),
        train=TrainConfig(batch_size=BATCH, eval_batch_size=16, device="cpu"),
    )


def seeded_run(cfg: RunConfig, **kwargs) -> ContinualRun:
    torch.manual_seed(0)  # random backbones are built under the global RNG state (see test_teacher_student.py)
    return ContinualRun(cfg, **kwargs)


def run_all(run: ContinualRun) -> tuple[list[bool | None], dict]:
    """(teacher_trained per task, matrices) of a whole run."""
    reports = []
    results = run.run(on_task=reports.append)
    return [r.teacher_trained for r in reports], results["matrices"]


def file_names(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def temp_names(directory: Path) -> set[str]:
    return {n for n in file_names(directory) if n.startswith(TEMP_PREFIX)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The matrices of a run without a store, and a store in which a run stored both teacher tasks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # results depend on the thread count; the subprocesses below use one thread too
    try:
        plain_trained, plain = run_all(seeded_run(make_cfg()))
        store = tmp_path_factory.mktemp("reference_store")
        stored_trained, stored = run_all(seeded_run(make_cfg(), teacher_store=store))
    finally:
        torch.set_num_threads(threads)
    key = teacher_key(make_cfg())
    return SimpleNamespace(
        matrices=plain, plain_trained=plain_trained, store=store, key=key,
        stored_trained=stored_trained, stored_matrices=stored,
    )


def copy_store(reference, tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the reference store: (store dir, entry dir)."""
    store = tmp_path / "store"
    shutil.copytree(reference.store, store)
    return store, store / reference.key


def test_reference_run_stores_both_tasks_and_matches_a_run_without_store(reference):
    assert reference.plain_trained == [True] * N_TASKS
    assert reference.stored_trained == [True] * N_TASKS
    assert reference.stored_matrices == reference.matrices
    entry_dir = reference.store / reference.key
    assert file_names(entry_dir) == {"teacher.json", "task_0.pt", "task_0.json", "task_1.pt", "task_1.json"}
    entry = TeacherStore(reference.store).entry(reference.key)
    assert entry.committed() == [0, 1]
    assert entry.matrix("test") == reference.matrices["teacher"]["test"]


# -- the key: stable -----------------------------------------------------------------------------------------

def _set(section: str, name: str, value):
    def mutate(cfg: RunConfig, files) -> None:
        setattr(getattr(cfg, section) if section else cfg, name, value)
    return mutate


def _dkd_params(cfg: RunConfig, files) -> None:
    cfg.distill.method = "dkd"
    cfg.distill.params = {"target_weight": 2.0, "non_target_weight": 8.0}


# Settings a sequential teacher does not depend on: student-side (KD) and where/how the run executes.
DATA_IRRELEVANT = {"root": "/somewhere/else", "download": True}
TRAIN_IRRELEVANT = {"device": "auto", "num_workers": 2, "eval_batch_size": 7, "signal_cache_max_gb": 0.5}
STUDENT_SIDE = {
    "distill-method-kd": _set("distill", "method", "kd"),
    "distill-method-dkd": _set("distill", "method", "dkd"),
    "distill-alpha": _set("distill", "alpha", 0.9),
    "distill-temperature": _set("distill", "temperature", 4.0),
    "distill-params-cdl": _set("distill", "params", {"components": 20, "length": 4}),
    "distill-params-dkd": _dkd_params,
    **{f"data-{k}": _set("data", k, v) for k, v in DATA_IRRELEVANT.items()},
    **{f"train-{k}": _set("train", k, v) for k, v in TRAIN_IRRELEVANT.items()},
}


@pytest.mark.parametrize("mutate", STUDENT_SIDE.values(), ids=STUDENT_SIDE.keys())
def test_student_side_and_run_location_settings_keep_the_key(mutate):
    base, changed = make_cfg(), make_cfg()
    mutate(changed, None)
    assert changed.to_dict() != base.to_dict()  # the setting really differs
    assert teacher_key(changed) == teacher_key(base)


def test_prompt_params_in_another_order_or_set_to_their_defaults_keep_the_key():
    assert teacher_key(make_cfg(prompt_params={"pool_size": 40, "length": 4})) == teacher_key(
        make_cfg(prompt_params={"length": 4, "pool_size": 40})
    )
    explicit = {"ortho_mu": 0.0, "layers": [0, 1, 2, 3, 4], "length": 8, "pool_size": 100}  # CODA's defaults
    assert teacher_key(make_cfg(prompt_params=explicit)) == teacher_key(make_cfg())
    assert teacher_key(make_cfg(prompt_params={"layers": (0, 1, 2, 3, 4)})) == teacher_key(make_cfg())
    # and for another method
    assert teacher_key(make_cfg("l2p", prompt_params={"length": 20})) == teacher_key(make_cfg("l2p"))


def test_prompt_param_default_given_as_an_int_keeps_the_key():
    assert teacher_key(make_cfg(prompt_params={"ortho_mu": 0})) == teacher_key(make_cfg())


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory) -> SimpleNamespace:
    """State-dict files that load strictly: demo-t (two contents, one also copied elsewhere) and demo-s."""
    directory = tmp_path_factory.mktemp("weights")
    teacher_state = create_backbone(BackboneConfig("demo-t", "random")).vit.state_dict()
    torch.save(teacher_state, directory / "teacher_a.pt")
    shutil.copy(directory / "teacher_a.pt", directory / "teacher_a_copy.pt")
    other = {k: v.clone() for k, v in teacher_state.items()}
    other["cls_token"] += 0.5
    torch.save(other, directory / "teacher_b.pt")
    torch.save(create_backbone(BackboneConfig("demo-s", "random")).vit.state_dict(), directory / "student.pt")
    files = SimpleNamespace(**{p.stem: str(p) for p in directory.iterdir()})
    # they are real weights files for their presets (a strict load), with the content they claim
    a, b = (create_backbone(BackboneConfig("demo-t", files.teacher_a)), create_backbone(BackboneConfig("demo-t", files.teacher_b)))
    assert a.weights_sha256 != b.weights_sha256
    create_backbone(BackboneConfig("demo-s", files.student))
    return files


def test_query_own_keeps_the_key_whatever_the_student_backbone(weight_files):
    base = make_cfg(query="own")
    for preset, weights in (("demo-t", "random"), ("demo-s", weight_files.student), ("demo-s", "default")):
        other = make_cfg(query="own")
        other.student = BackboneConfig(preset, weights)
        assert teacher_key(other) == teacher_key(base), (preset, weights)


def test_the_same_weights_file_content_at_another_path_keeps_the_key(weight_files):
    first, second = make_cfg(), make_cfg()
    first.teacher.weights, second.teacher.weights = weight_files.teacher_a, weight_files.teacher_a_copy
    assert teacher_key(first) == teacher_key(second)


def test_the_key_is_the_same_in_a_fresh_process(weight_files, tmp_path):
    with_file = make_cfg(prompt_params={"length": 4, "pool_size": 40}, query="own")
    with_file.teacher.weights = weight_files.teacher_b
    configs = [make_cfg(), with_file, make_cfg("dualprompt", "dkd")]
    # the config as the orchestrator hands it over (a plain dict) gives the key of the config object
    assert [teacher_key(RunConfig.from_dict(c.to_dict())) for c in configs] == [teacher_key(c) for c in configs]
    script = textwrap.dedent("""
        import json, sys
        from cdl_core.config import RunConfig
        from cdl_core.learner import teacher_key
        print(json.dumps([teacher_key(RunConfig.from_dict(c)) for c in json.load(sys.stdin)]))
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONHASHSEED="12345", HF_HUB_OFFLINE="1", CDL_CACHE_DIR=str(tmp_path))
    out = subprocess.run(
        [sys.executable, "-c", script], input=json.dumps([c.to_dict() for c in configs]), env=env, cwd=tmp_path,
        capture_output=True, text=True, timeout=120, check=True,
    )
    keys = json.loads(out.stdout.strip().splitlines()[-1])
    assert keys == [teacher_key(c) for c in configs] and len(set(keys)) == 3


# -- the key: sensitive ----------------------------------------------------------------------------------------

DATA_CHANGES = {
    "name": "fashion_mnist", "n_tasks": 5, "class_order": "shuffled", "class_order_seed": 1, "train_per_class": 2,
    "test_per_class": 2, "val_fraction": 0.2, "split_seed": 1, "train_augment": False, "crop_scale_min": 0.5,
    "input_scaling": "mean_std",
}
DATA_BY_CONTENT = {"split_files"}  # in the key as official-or-ours; the lists' content through the data fingerprint
TRAIN_CHANGES = {
    "epochs": 2, "batch_size": 4, "lr": 5e-3, "betas": (0.8, 0.999), "weight_decay": 1e-4, "lr_schedule": "constant", "seed": 1,
    "precision": "bf16", "compile": True,  # both change the teacher's weights in the last bits
    "drop_last": False,
}


def _noop(cfg, files) -> None:
    pass


def _weights(role: str, name: str):
    def mutate(cfg: RunConfig, files) -> None:
        getattr(cfg, role).weights = getattr(files, name)
    return mutate


# id -> (make the base config, make the other config), both from make_cfg()
TEACHER_SETTINGS = {
    "teacher-preset": (_noop, _set("teacher", "preset", "demo-s")),
    "teacher-weights-random-vs-file": (_noop, _weights("teacher", "teacher_a")),
    "teacher-weights-file-content": (_weights("teacher", "teacher_a"), _weights("teacher", "teacher_b")),
    "query-student-preset": (_noop, _set("student", "preset", "demo-t")),
    "query-student-weights": (_noop, _weights("student", "student")),
    "query-mode": (_noop, _set("", "query", "own")),
    "prompt-method": (_noop, _set("prompt", "method", "l2p")),
    "prompt-pool-size": (_noop, _set("prompt", "params", {"pool_size": 50})),
    "prompt-length": (_noop, _set("prompt", "params", {"length": 4})),
    "prompt-layers": (_noop, _set("prompt", "params", {"layers": [0, 1]})),
    **{f"data-{k}": (_noop, _set("data", k, v)) for k, v in DATA_CHANGES.items()},
    **{f"train-{k}": (_noop, _set("train", k, v)) for k, v in TRAIN_CHANGES.items()},
}


@pytest.mark.parametrize("make_base, make_other", TEACHER_SETTINGS.values(), ids=TEACHER_SETTINGS.keys())
def test_every_setting_the_teacher_depends_on_changes_the_key(make_base, make_other, weight_files):
    base, other = make_cfg(), make_cfg()
    make_base(base, weight_files)
    make_base(other, weight_files)
    make_other(other, weight_files)
    assert teacher_key(other) != teacher_key(base)


def test_every_data_and_train_field_is_classified_for_the_key():
    """A new DataConfig/TrainConfig field must be added to the key tests above (and to teacher_identity)."""
    assert set(DATA_CHANGES) | set(DATA_IRRELEVANT) | DATA_BY_CONTENT == {f.name for f in dataclasses.fields(DataConfig)}
    assert set(TRAIN_CHANGES) | set(TRAIN_IRRELEVANT) == {f.name for f in dataclasses.fields(TrainConfig)}


def test_official_split_files_enter_the_key_as_official_whatever_their_path():
    def key(split_files):
        cfg = RunConfig.from_dict({"data": {"name": "imagenet_r", "split_files": split_files}, "student": {"weights": "random"},
                                   "teacher": {"preset": "demo-t", "weights": "random"}, "distill": {"method": "kd"}})
        return teacher_key(cfg)

    assert key("/data/splits") == key("/elsewhere/splits") != key(None)


def test_a_new_trainer_version_changes_the_key(monkeypatch):
    before = teacher_key(make_cfg())
    monkeypatch.setattr(cdl_core.teacher_identity, "TRAINER_VERSION", cdl_core.teacher_identity.TRAINER_VERSION + 1)
    assert teacher_key(make_cfg()) != before


def test_a_joint_schedule_teacher_has_no_identity():
    with pytest.raises(ConfigError, match="sequential"):
        teacher_identity(make_cfg(schedule="joint"))


# -- atomic writes ---------------------------------------------------------------------------------------------

STATE = {"weight": torch.arange(6.0).reshape(2, 3), "bias": torch.tensor([1.0, -2.0, 3.0])}
ROWS = {"test": [60.0], "val": [40.0]}
IDENTITY = {"teacher": {"preset": "demo-t", "weights": "random:demo-t"}, "trainer_version": 1}
FACTS = {"n_tasks": "2", "teacher_weights_sha256": "abc"}


class RecordingHandler(pafs.FSSpecHandler):
    """A local fsspec filesystem that records where files are opened for writing and moved to."""

    def __init__(self) -> None:
        super().__init__(fsspec.filesystem("file"))
        self.opened: list[str] = []
        self.moves: list[tuple[str, str]] = []

    def open_output_stream(self, path, metadata):
        self.opened.append(path)
        return super().open_output_stream(path, metadata)

    def move(self, src, dest):
        self.moves.append((src, dest))
        return super().move(src, dest)


def test_save_writes_each_file_under_a_temp_name_then_moves_it_state_before_record(tmp_path):
    handler = RecordingHandler()
    entry = TeacherStore(str(tmp_path / "store"), filesystem=pafs.PyFileSystem(handler)).entry("k")
    entry.save(0, STATE, ROWS, IDENTITY, FACTS)
    entry.save(1, STATE, ROWS, IDENTITY, FACTS)
    assert all(Path(p).name.startswith(TEMP_PREFIX) for p in handler.opened)
    assert [Path(src).name.startswith(TEMP_PREFIX) and Path(src).name.endswith(Path(dest).name)
            for src, dest in handler.moves] == [True] * 5
    assert [Path(dest).name for _, dest in handler.moves] == [
        "teacher.json", "task_0.pt", "task_0.json", "task_1.pt", "task_1.json"
    ]
    assert temp_names(tmp_path / "store" / "k") == set()


def test_save_and_load_round_trip_with_no_temp_file_left(tmp_path):
    store = TeacherStore(tmp_path / "store")
    entry = store.entry("k")
    assert not entry.has(0) and entry.manifest() is None and store.keys() == []
    record = entry.save(0, STATE, ROWS, IDENTITY, FACTS, seconds=1.5)
    assert file_names(tmp_path / "store" / "k") == {"teacher.json", "task_0.pt", "task_0.json"}
    assert entry.has(0) and not entry.has(1) and entry.committed() == [0] and store.keys() == ["k"]
    state, loaded = entry.load(0)
    assert set(state) == set(STATE) and all(torch.equal(state[k], v) for k, v in STATE.items())
    assert loaded == record == entry.record(0)
    assert loaded["rows"] == ROWS and loaded["size"] == (tmp_path / "store" / "k" / "task_0.pt").stat().st_size
    assert entry.matrix("test") == [[60.0]] and entry.matrix("val") == [[40.0]]
    assert entry.manifest()["identity"] == IDENTITY and entry.manifest()["facts"] == FACTS
    assert entry.size_bytes() == sum(p.stat().st_size for p in (tmp_path / "store" / "k").iterdir())


def test_temp_and_uncommitted_files_are_not_served_and_clean_removes_exactly_them(tmp_path):
    entry = TeacherStore(tmp_path / "store").entry("k")
    entry.save(0, STATE, ROWS, IDENTITY, FACTS)
    directory = tmp_path / "store" / "k"
    committed = {name: (directory / name).read_bytes() for name in file_names(directory)}
    temp = f"{TEMP_PREFIX}{uuid.uuid4().hex}-task_1.pt"
    (directory / temp).write_bytes(b"half a state file")
    shutil.copy(directory / "task_0.pt", directory / "task_1.pt")  # a complete-looking state file, never committed
    assert not entry.has(1) and entry.record(1) is None and entry.committed() == [0]
    with pytest.raises(TeacherStoreError, match="has no stored task 1"):
        entry.load(1)
    assert entry.matrix("test") == [[60.0]]

    assert sorted(entry.clean()) == sorted([temp, "task_1.pt"])
    assert {name: (directory / name).read_bytes() for name in file_names(directory)} == committed
    assert entry.has(0) and entry.clean() == []


def test_a_state_file_that_does_not_match_its_record_size_is_not_served(tmp_path):
    entry = TeacherStore(tmp_path / "store").entry("k")
    entry.save(0, STATE, ROWS, IDENTITY, FACTS)
    path = tmp_path / "store" / "k" / "task_0.pt"
    path.write_bytes(path.read_bytes()[:-10])
    assert not entry.has(0) and entry.committed() == []
    assert entry.clean() == ["task_0.pt"]


def test_matrix_only_has_rows_of_committed_tasks(tmp_path):
    entry = TeacherStore(tmp_path / "store").entry("k")
    entry.save(0, STATE, ROWS, IDENTITY, FACTS)
    entry.save(1, STATE, {"test": [50.0, 50.0]}, IDENTITY, FACTS)
    (tmp_path / "store" / "k" / "task_1.pt").unlink()
    assert entry.committed() == [0]
    assert entry.matrix("test") == [[60.0]]


# -- crash recovery with a killed writer -----------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import json, sys, time, uuid
    import torch
    torch.set_num_threads(1)
    from cdl_core.config import RunConfig
    from cdl_core.learner import ContinualRun
    from cdl_core.teacher_store import TEMP_PREFIX, TeacherEntry

    store, marker, stage, config = sys.argv[1:5]
    original = TeacherEntry._write_atomic

    def hang(self):
        open(marker, "w").close()
        while True:
            time.sleep(60)

    def write_atomic(self, name, data):
        if stage == "mid-state-file" and name == "task_1.pt":
            self.fs.create_dir(self.path, recursive=True)
            out = self.fs.open_output_stream(self._file(f"{TEMP_PREFIX}{uuid.uuid4().hex}-{name}"))
            out.write(data[: len(data) // 2])
            out.flush()
            hang(self)
        if stage == "before-record" and name == "task_1.json":
            hang(self)
        original(self, name, data)

    TeacherEntry._write_atomic = write_atomic
    torch.manual_seed(0)
    ContinualRun(RunConfig.from_dict(json.loads(config)), teacher_store=store).run()
    print("the writer was not stopped", file=sys.stderr)
    sys.exit(3)
""")


def kill_writer_at(stage: str, tmp_path: Path) -> Path:
    """Run a tiny teacher-training run in a subprocess, SIGKILL it at `stage` of storing task 1; its store."""
    store, marker, log = tmp_path / "store", tmp_path / "hanging", tmp_path / "child.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", CDL_CACHE_DIR=str(tmp_path / "cache"))
    with open(log, "w") as out:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(store), str(marker), stage, json.dumps(make_cfg().to_dict())],
            env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 180
            while not marker.exists():
                assert child.poll() is None, f"the writer exited ({child.returncode}):\n{log.read_text()}"
                assert time.monotonic() < deadline, f"the writer never reached {stage}:\n{log.read_text()}"
                time.sleep(0.05)
            os.kill(child.pid, signal.SIGKILL)
        finally:
            if child.poll() is None:
                child.kill()
            child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    return store


@pytest.mark.parametrize("stage", ["mid-state-file", "before-record"])
def test_a_writer_killed_while_storing_a_task_leaves_it_unserved_and_the_next_run_retrains_it(stage, reference, tmp_path):
    store_dir = kill_writer_at(stage, tmp_path)
    key = teacher_key(make_cfg())
    entry_dir = store_dir / key
    entry = TeacherStore(store_dir).entry(key)
    assert entry.has(0) and not entry.has(1) and entry.committed() == [0]
    assert not (entry_dir / "task_1.json").exists()
    if stage == "mid-state-file":
        (temp,) = temp_names(entry_dir)
        assert temp.endswith("-task_1.pt") and not (entry_dir / "task_1.pt").exists()
        assert 0 < (entry_dir / temp).stat().st_size < (reference.store / key / "task_1.pt").stat().st_size
        stray = {temp}
    else:
        assert temp_names(entry_dir) == set() and (entry_dir / "task_1.pt").is_file()
        stray = set()  # the uncommitted task_1.pt is replaced by the next writer

    trained, matrices = run_all(seeded_run(make_cfg(), teacher_store=store_dir))
    assert trained == [False, True]
    assert matrices == reference.matrices
    assert entry.has(1) and entry.committed() == [0, 1]
    entry.load(1)
    assert temp_names(entry_dir) == stray  # what the killed writer left stays until pruned
    assert set(entry.clean()) == stray and temp_names(entry_dir) == set()


# -- checksums and the manifest check ----------------------------------------------------------------------------

def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupted_state_file_fails_its_checksum(reference, tmp_path):
    store_dir, entry_dir = copy_store(reference, tmp_path)
    size = (entry_dir / "task_0.pt").stat().st_size
    flip_a_byte(entry_dir / "task_0.pt")
    assert (entry_dir / "task_0.pt").stat().st_size == size
    entry = TeacherStore(store_dir).entry(reference.key)
    assert entry.has(0)  # same size: only the checksum tells
    with pytest.raises(TeacherStoreError, match="checksum"):
        entry.load(0)
    run = seeded_run(make_cfg(), teacher_store=store_dir, require_teacher=True)
    with pytest.raises(TeacherStoreError, match="checksum"):
        run.run_task()


def test_a_corrupted_teacher_task_is_retrained_and_replaced_without_require_teacher(reference, tmp_path):
    store_dir, entry_dir = copy_store(reference, tmp_path)
    original = (entry_dir / "task_0.pt").read_bytes()
    flip_a_byte(entry_dir / "task_0.pt")
    trained, matrices = run_all(seeded_run(make_cfg(), teacher_store=store_dir))
    assert trained == [True, False]
    assert matrices == reference.matrices
    entry = TeacherStore(store_dir).entry(reference.key)
    state, _ = entry.load(0)  # passes its checksum now
    reference_state, _ = TeacherStore(reference.store).entry(reference.key).load(0)
    assert set(state) == set(reference_state) and all(torch.equal(state[k], v) for k, v in reference_state.items())
    assert (entry_dir / "task_0.pt").read_bytes() == original  # the same teacher, saved the same way
    assert temp_names(entry_dir) == set()


@pytest.mark.parametrize("fact", ["teacher_weights_sha256", "data_fingerprint"])
def test_an_entry_made_with_other_weights_or_data_is_refused_with_the_prune_command(fact, reference, tmp_path):
    store_dir, entry_dir = copy_store(reference, tmp_path)
    manifest = json.loads((entry_dir / "teacher.json").read_text())
    assert fact in manifest["facts"]
    manifest["facts"][fact] = "0" * 64
    (entry_dir / "teacher.json").write_text(json.dumps(manifest))
    with pytest.raises(TeacherStoreError) as raised:
        seeded_run(make_cfg(), teacher_store=store_dir)
    message = str(raised.value)
    (other,) = {"teacher_weights_sha256", "data_fingerprint"} - {fact}
    assert fact in message and other not in message
    command = f"python -m orchestrator.teachers --store {store_dir} prune --key {reference.key}"
    assert command in message
    # the command it names does remove the entry
    assert teachers_cli.main(command.split()[3:]) == 0
    assert TeacherStore(store_dir).keys() == []


def test_an_entry_with_another_identity_under_the_key_names_a_prune_command_that_works(reference, tmp_path, monkeypatch, capsys):
    store_dir, entry_dir = copy_store(reference, tmp_path)
    manifest = json.loads((entry_dir / "teacher.json").read_text())
    manifest["identity"]["train"]["lr"] = 0.5
    (entry_dir / "teacher.json").write_text(json.dumps(manifest))
    with pytest.raises(TeacherStoreError, match="different teacher under the same key") as raised:
        seeded_run(make_cfg(), teacher_store=store_dir)
    command = str(raised.value).split("remove it: ", 1)[1]
    assert command.startswith("python -m orchestrator.teachers")
    monkeypatch.chdir(tmp_path)
    assert teachers_cli.main(command.split()[3:]) == 0, capsys.readouterr().err
    assert TeacherStore(store_dir).keys() == []


# -- other pyarrow filesystems -----------------------------------------------------------------------------------

def memory_store() -> TeacherStore:
    """An object-store-like filesystem (no real directories, moves are copies) in memory."""
    fs = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem("memory")))
    return TeacherStore(f"/teachers-{uuid.uuid4().hex}", filesystem=fs)


@pytest.mark.parametrize("kind", ["memory", "file-uri"])
def test_a_store_on_another_pyarrow_filesystem_stores_and_serves_the_teacher(kind, reference, tmp_path, monkeypatch):
    store = memory_store() if kind == "memory" else TeacherStore(f"file://{tmp_path}/uri-store")
    trained, matrices = run_all(seeded_run(make_cfg(), teacher_store=store))
    assert trained == [True, True] and matrices == reference.matrices
    assert store.keys() == [reference.key]
    entry = store.entry(reference.key)
    assert entry.committed() == [0, 1]
    assert {i.base_name for i in entry.files()} == {"teacher.json", "task_0.pt", "task_0.json", "task_1.pt", "task_1.json"}
    if kind == "file-uri":
        assert file_names(tmp_path / "uri-store" / reference.key) == file_names(reference.store / reference.key)

    train = PhaseTrainer.train_phase

    def no_teacher_training(self, role, task):
        assert role != "teacher", "the teacher was trained although it is stored"
        return train(self, role, task)

    monkeypatch.setattr(PhaseTrainer, "train_phase", no_teacher_training)
    again = store if kind == "memory" else f"file://{tmp_path}/uri-store"  # by URI string too
    trained, matrices = run_all(seeded_run(make_cfg(), teacher_store=again, require_teacher=True))
    assert trained == [False, False] and matrices == reference.matrices
    store.remove(reference.key)
    assert store.keys() == []


@pytest.mark.parametrize("location, message", [
    ("", "location is empty"),
    ("   ", "location is empty"),
    ("nosuchscheme://x", "cannot open teacher store 'nosuchscheme://x'"),
])
def test_a_bad_store_location_gives_a_clear_error(location, message):
    with pytest.raises(TeacherStoreError, match=message):
        TeacherStore(location)


# -- python -m orchestrator.teachers -------------------------------------------------------------------------------

def fake_identity(preset: str, method: str, dataset: str, seed: int = 0) -> dict:
    """Shaped like teacher_identity's output."""
    return {
        "teacher": {"preset": preset, "weights": f"random:{preset}"}, "query_backbone": "own",
        "prompt": {"method": method, "params": {}}, "data": {"name": dataset, "n_tasks": 2},
        "train": {"seed": seed, "lr": 0.001}, "trainer_version": 1,
    }


def fake_entry(store: TeacherStore, tasks, preset="demo-t", method="coda", dataset="synthetic") -> str:
    identity = fake_identity(preset, method, dataset)
    key = content_key(identity)
    for t in tasks:
        store.entry(key).save(t, {"w": torch.full((8,), float(t))}, {"test": [50.0] * (t + 1)}, identity, {"n_tasks": "2"})
    return key


@pytest.fixture
def cli_store(tmp_path) -> SimpleNamespace:
    """Two complete entries (one with a leftover temp file) and a partial one with a killed writer's files."""
    root = tmp_path / "teachers"
    store = TeacherStore(root)
    a = fake_entry(store, [0, 1], "demo-t", "coda", "synthetic")
    b = fake_entry(store, [0, 1], "vit_base_patch16_224", "l2p", "cifar100")
    c = fake_entry(store, [0], "demo-s", "dualprompt", "fashion_mnist")
    (root / a / f"{TEMP_PREFIX}{uuid.uuid4().hex}-task_1.json").write_bytes(b"{")
    (root / c / f"{TEMP_PREFIX}{uuid.uuid4().hex}-task_1.pt").write_bytes(b"half")
    shutil.copy(root / c / "task_0.pt", root / c / "task_1.pt")  # uncommitted
    return SimpleNamespace(root=root, store=store, a=a, b=b, c=c)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def cli(root: Path, *args: str) -> int:
    return teachers_cli.main(["--store", str(root), *args])


def test_cli_list_shows_each_teacher_with_its_tasks_and_status(cli_store, capsys):
    assert cli(cli_store.root, "list") == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.split() and len(line.split()[0]) == 24}
    assert set(lines) == {cli_store.a, cli_store.b, cli_store.c}
    for key, words in (
        (cli_store.a, ["demo-t", "coda", "synthetic", "2/2", "complete"]),
        (cli_store.b, ["vit_base_patch16_224", "l2p", "cifar100", "2/2", "complete"]),
        (cli_store.c, ["demo-s", "dualprompt", "fashion_mnist", "1/2", "partial"]),
    ):
        assert all(word in lines[key].split() for word in words), (words, lines[key])
    assert "partial" not in lines[cli_store.a] and "(+2 stray)" in lines[cli_store.c]
    assert "3 teachers" in out


def test_cli_list_of_an_empty_or_missing_store(tmp_path, capsys):
    assert cli(tmp_path / "none", "list") == 0
    assert "0 teachers" in capsys.readouterr().out


def test_cli_prune_key_removes_only_that_entry(cli_store, capsys):
    before = snapshot(cli_store.root)
    assert cli(cli_store.root, "prune", "--key", cli_store.b) == 0
    assert cli_store.store.keys() == sorted([cli_store.a, cli_store.c])
    assert snapshot(cli_store.root) == {k: v for k, v in before.items() if not k.startswith(cli_store.b)}
    assert f"removed {cli_store.b}" in capsys.readouterr().out


def test_cli_prune_partial_removes_only_partial_entries(cli_store):
    before = snapshot(cli_store.root)
    assert cli(cli_store.root, "prune", "--partial") == 0
    assert cli_store.store.keys() == sorted([cli_store.a, cli_store.b])
    assert snapshot(cli_store.root) == {k: v for k, v in before.items() if not k.startswith(cli_store.c)}


def test_cli_prune_stray_removes_only_temp_and_uncommitted_files(cli_store):
    before = snapshot(cli_store.root)
    assert cli(cli_store.root, "prune", "--stray") == 0
    stray = {k for k in before if Path(k).name.startswith(TEMP_PREFIX) or k == f"{cli_store.c}/task_1.pt"}
    assert len(stray) == 3
    assert snapshot(cli_store.root) == {k: v for k, v in before.items() if k not in stray}
    assert cli_store.store.keys() == sorted([cli_store.a, cli_store.b, cli_store.c])


def test_cli_prune_stray_with_key_cleans_only_that_entry(cli_store):
    before = snapshot(cli_store.root)
    assert cli(cli_store.root, "prune", "--stray", "--key", cli_store.c) == 0
    after = snapshot(cli_store.root)
    assert {k for k in before if k.startswith(cli_store.c)} - set(after) == {
        k for k in before if k.startswith(cli_store.c) and (Path(k).name.startswith(TEMP_PREFIX) or k.endswith("task_1.pt"))}
    assert {k: v for k, v in after.items() if not k.startswith(cli_store.c)} == {
        k: v for k, v in before.items() if not k.startswith(cli_store.c)}  # entry a keeps its temp file


def test_cli_prune_older_than_keeps_fresh_entries_and_removes_old_ones(cli_store):
    before = snapshot(cli_store.root)
    assert cli(cli_store.root, "prune", "--older-than", "1") == 0
    assert snapshot(cli_store.root) == before
    three_days_ago = time.time() - 3 * 86400
    for path in (cli_store.root / cli_store.a).iterdir():
        os.utime(path, (three_days_ago, three_days_ago))
    assert cli(cli_store.root, "prune", "--older-than", "1") == 0
    assert cli_store.store.keys() == sorted([cli_store.b, cli_store.c])
    assert cli(cli_store.root, "prune", "--older-than", "4") == 0
    assert cli_store.store.keys() == sorted([cli_store.b, cli_store.c])


@pytest.mark.parametrize("selection", [["--key", "A"], ["--partial"], ["--stray"], ["--older-than", "0"]],
                         ids=["key", "partial", "stray", "older-than"])
def test_cli_prune_dry_run_deletes_nothing(selection, cli_store, capsys):
    selection = [cli_store.a if s == "A" else s for s in selection]
    before = snapshot(cli_store.root)
    assert cli(cli_store.root, "prune", *selection, "--dry-run") == 0
    assert snapshot(cli_store.root) == before
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("would remove") for line in lines)
    assert not any(line.startswith("removed") for line in lines)


@pytest.mark.parametrize("args, message", [
    (["prune"], "prune needs a selection"),
    (["prune", "--key", "unknown"], "no teacher unknown"),
])
def test_cli_prune_without_a_valid_selection_exits_2(args, message, cli_store, capsys):
    before = snapshot(cli_store.root)
    assert cli(cli_store.root, *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1
    assert snapshot(cli_store.root) == before


def test_cli_bad_store_exits_2(capsys):
    assert teachers_cli.main(["--store", "nosuchscheme://x", "list"]) == 2
    assert capsys.readouterr().err.startswith("error: cannot open teacher store")


# -- leases ---------------------------------------------------------------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_lease_is_exclusive_while_held_and_reentrant_for_its_holder():
    clock = FakeClock()
    table = LeaseTable(clock=clock)
    assert table.acquire("k/task_0", "a", ttl=10)
    assert not table.acquire("k/task_0", "b", ttl=10)
    assert table.acquire("k/task_1", "b", ttl=10)  # another name is another lease
    clock.now += 9
    assert not table.acquire("k/task_0", "b", ttl=10)
    assert table.acquire("k/task_0", "a", ttl=10)  # the holder again: extends it
    clock.now += 9
    assert not table.acquire("k/task_0", "b", ttl=10)
    assert table.held() == {"k/task_0": "a"}  # k/task_1 expired


def test_a_lease_expires_after_its_ttl():
    clock = FakeClock()
    table = LeaseTable(clock=clock)
    assert table.acquire("k", "a", ttl=5)
    clock.now += 4.9
    assert not table.acquire("k", "b", ttl=5) and table.held() == {"k": "a"}
    clock.now += 0.1
    assert table.held() == {}
    assert table.acquire("k", "b", ttl=5) and table.held() == {"k": "b"}


def test_renew_extends_a_held_lease_and_fails_for_others():
    clock = FakeClock()
    table = LeaseTable(clock=clock)
    assert not table.renew("k", "a", ttl=5)  # nothing to renew
    assert table.acquire("k", "a", ttl=5)
    clock.now += 4
    assert table.renew("k", "a", ttl=5)
    clock.now += 4  # 8 s after acquiring: alive only thanks to the renewal
    assert not table.acquire("k", "b", ttl=5)
    assert not table.renew("k", "b", ttl=5)
    clock.now += 2  # expired
    assert table.acquire("k", "b", ttl=5)
    assert not table.renew("k", "a", ttl=5)  # another took it
    assert table.held() == {"k": "b"}


def test_release_by_a_non_holder_is_a_no_op():
    clock = FakeClock()
    table = LeaseTable(clock=clock)
    table.release("k", "a")  # nothing held: no error
    assert table.acquire("k", "a", ttl=5)
    table.release("k", "b")
    assert table.held() == {"k": "a"} and not table.acquire("k", "b", ttl=5)
    table.release("k", "a")
    assert table.held() == {} and table.acquire("k", "b", ttl=5)


def run_lease_scenario(scenario: str, directory: Path) -> dict:
    """Run one scenario of tests/lease_scenarios.py as its own Ray driver; what it printed."""
    script = Path(__file__).with_name("lease_scenarios.py")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, str(script), scenario, str(directory)], env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, f"exit {done.returncode}: {done.stderr[-3000:]}"
    return json.loads(lines[-1])


@pytest.mark.slow
def test_teacher_lock_admits_one_process_at_a_time(tmp_path):
    out = run_lease_scenario("lock", tmp_path)
    results = sorted(out["results"], key=lambda r: r[1])
    for (_, _, end, _), (_, start, _, _) in zip(results, results[1:]):
        assert start >= end, results
    assert len({pid for *_, pid in results}) > 1  # several processes
    assert any(asked < end for (_, _, end, _), (asked, *_) in zip(results, results[1:])), "no process had to wait"
    assert out["held"] == {}


@pytest.mark.slow
def test_a_lease_whose_holder_was_killed_is_free_after_its_ttl_not_before(tmp_path):
    out = run_lease_scenario("killed", tmp_path)
    assert out["died"]
    waited = out["acquired"] - out["dead_acquired"]
    # the dead holder's lease was taken just before it wrote the marker: allow for that latency
    assert out["ttl"] - 0.5 <= waited <= out["ttl"] + 20, waited
    assert out["held"] == {}
