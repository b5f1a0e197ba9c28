"""What exists, as plain metadata (no torch): backbone presets, datasets, prompt and distillation methods with
their parameters. Validation and sweep planning read only this, so checking a whole config or planning a sweep
never builds a model or reads an image; the implementations (cdl_core.backbones, cdl_core.data, cdl_core.prompts,
cdl_core.distill) build what these entries describe."""
