"""One module per command of the ``cpl-cert`` command line; each is a thin wrapper over the library."""
