"""Fault-injection suite (issue 14): `python -m bench.faults --trials N`. Not part of `make test`."""
