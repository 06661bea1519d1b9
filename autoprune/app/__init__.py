"""Front doors: the Python API, the command line and the search service, over one `Session` that wires the
stages for a spec."""
