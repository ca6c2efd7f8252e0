"""Benchmarks behind `tf-secondorder bench`: tasks, the runner, TFDS builders."""
