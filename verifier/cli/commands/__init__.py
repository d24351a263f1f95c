"""Sub-commands of the `verifier` CLI: each module has `add_arguments(parser)` and `run(args) -> int`."""
