"""The demo (`verifier demo`) and its small model zoo and packaged data sets: an example of
the library in use, not library core."""
