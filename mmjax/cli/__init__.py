"""Command-line tools: `deploy` (a finished run -> a deployable artifact), `lowering` (a
config's steps lowered for GPU and TPU on this CPU), `convert_export` (an export of an
older format -> the current one), `reference` (the generated pages of docs/reference/).
Each is `python -m mmjax.cli.<name>`."""
