"""Parallelism strategies, one file per family. See README.md beside this file."""
