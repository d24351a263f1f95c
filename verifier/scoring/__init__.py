"""Scores of a probe result against the reference store: the similarity measures (`measures`,
a registry), the `comparator` (every score family, vectorised over the batch) and the
`garbage` head."""
