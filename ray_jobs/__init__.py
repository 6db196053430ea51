"""Ray glue for scopeforge jobs: one module per job (``run(cfg, stage) -> metrics``), the runtime and the CLI."""
