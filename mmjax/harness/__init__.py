"""The experiment harness: what it asks of a model (`family`) and of a task (`task`), the
config checks before any work (`run_setup`), the trainer (`train`), the optimizer
(`optim`), checkpoints with exact resume (`checkpointing`), shardings (`sharding`),
metrics (`metrics_writer`) and the compression a config selects (`compress_config`,
`compress_finish`). It knows no model: families plug in."""
