"""Command-line tools over a finished run or export: `deploy` (a run -> a deployable
artifact), `lowering` (the steps lowered for GPU and TPU on this CPU), `convert_export`
(an export of an older format -> the current one). Each is `python -m mmjax.cli.<name>`."""
