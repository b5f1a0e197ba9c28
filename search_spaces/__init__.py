"""Search spaces for `python -m orchestrator.sweep --space NAME`, one short module per space."""
