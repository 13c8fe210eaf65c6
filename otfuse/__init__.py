"""The `otfuse` command line: fusion on one machine (`fuse`, `eval`)."""
