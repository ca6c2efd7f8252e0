"""Benchmarks behind the `tf-secondorder` subcommands. `bench`: its command
(`command`), tasks (the `tasks` package, one module per task; TFDS builders
in `tfds_builders`), argument checks (`arguments`, `--option` in `options`),
training runs (`runner`) and the table, ratios and plots (`report`); `scale`
(`scale`), `bytes` (`communication_bytes`) and `multiworker` (`multiworker`,
its workers in `multiworker_worker`)."""
