"""The run machinery: the run folder (paths, tables, manifest, lock), stage parameters and
checks, the stage commands, the book, the rerun proof and several processes."""
