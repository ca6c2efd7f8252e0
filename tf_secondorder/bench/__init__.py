"""Benchmarks behind `tf-secondorder bench` (tasks of shared BENCHMARKS.md)."""
