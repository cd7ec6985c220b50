"""The run folder and the commands on top of it: stages, pipeline, book, rerun."""
