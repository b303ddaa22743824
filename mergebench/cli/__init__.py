"""The `mergebench` command line: a thin click + rich shell over the Python API."""
