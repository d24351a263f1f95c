"""reference_maps: per-class expected attention and early maps plus feature statistics (framework-free).

Never imports torch, onnxruntime or `verifier` (numpy, scipy, scikit-learn, POT only).
"""
from .artifact import Artifact, ArtifactError, read_artifact, sha256_file, write_artifact
from .canonical import DEFAULT_GRID, to_grid
from .store import ReferenceStore

__all__ = ["Artifact", "ArtifactError", "read_artifact", "write_artifact", "sha256_file",
           "DEFAULT_GRID", "to_grid", "ReferenceStore"]
