"""Sans-I/O wire adapters: wire messages <-> the events of `events.py`."""
