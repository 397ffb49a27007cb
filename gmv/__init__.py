"""The composition root: the `gmv` command line, its wiring of parts into processes, and the
bench harness that spawns them. The only package that imports both `ticker` and `simulator`."""
