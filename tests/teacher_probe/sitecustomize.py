"""Loaded at startup by every Python process that has this folder on PYTHONPATH (the sweep's driver, Ray's
workers: a local Ray passes the driver's environment on). Only when $CDL_TEACHER_PROBE_DIR is set does it
install the teacher-copy probe of cdl_teacher_probe.py, which patches cdl_core.learner when that is imported."""
import os

if os.environ.get("CDL_TEACHER_PROBE_DIR"):
    import cdl_teacher_probe

    cdl_teacher_probe.install_import_hook()
