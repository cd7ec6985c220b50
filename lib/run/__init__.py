"""The run machinery: the run folder (paths, tables, manifest, lock), stage parameters and
checks, the stage commands, the book and what its chapters say about the build, the rerun
proof and several processes."""
