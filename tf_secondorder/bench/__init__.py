"""Benchmarks behind `tf-secondorder bench`: tasks (the `tasks` package, one
module per task; TFDS builders in `tfds_builders`), argument checks
(`arguments`), training runs (`runner`) and the table, ratios and plots
(`report`)."""
