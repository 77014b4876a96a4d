"""Fast model implementations (packed student/teacher execution) on the diffusers models' own
parameters. Imported lazily: ``import dopsd_fast`` does not import this package."""
