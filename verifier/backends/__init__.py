"""Model backends implementing the probe contract of `verifier.probe`."""
