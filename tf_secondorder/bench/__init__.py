"""Benchmarks behind `tf-secondorder bench`: tasks (`tasks`, TFDS builders in
`tfds_builders`), argument checks (`arguments`), training runs (`runner`)
and the table, ratios and plots (`report`)."""
