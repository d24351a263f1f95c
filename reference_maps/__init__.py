"""reference_maps: per-class expected attention and early maps plus feature statistics (framework-free)."""
