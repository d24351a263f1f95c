"""Where build, gate and audit run: `local` (this process, the default) or `ray` (a Ray cluster;
the `[ray]` extra)."""
