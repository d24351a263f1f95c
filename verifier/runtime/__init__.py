"""Gating at run time: the `gatekeeper` (decisions for inputs), the `decision` record, the
Parquet decision `log`, and `parity` (declaring another model file compatible with a bundle).
`from verifier import Gatekeeper` is the short way in."""
