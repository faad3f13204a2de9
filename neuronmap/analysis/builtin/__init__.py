"""Registered analyses, one module per family: every module here is imported by the registry.

A module registers thin adapters with `@register(...)` (see `neuronmap.analysis.registry`): each
reads its input (`LayerInput`, `PairInput` or `RunInput`), calls the family's pure functions
(`neuronmap.analysis.<family>`) and returns an `AnalysisResult`.
"""

# analysis name -> the module here that registers it. `get_analysis(name)` imports just that module,
# so `neuronmap analyze RUN stats` does not import scikit-learn (~1 s); `list_analyses()` and any
# name not listed here (a plugin's) import everything. A test keeps this in step with the registry.
MODULES = {
    "kmeans": "clustering", "dbscan": "clustering", "hierarchical": "clustering",
    "cav": "concepts", "top-activations": "concepts",
    "pca": "dimensionality", "intrinsic-dim": "dimensionality", "tsne": "dimensionality",
    "evolution": "evolution",
    "entropy": "information", "mutual-info": "information", "layer-mi": "information",
    "probe": "probing",
    "cka": "similarity", "rsa": "similarity", "correlation": "similarity", "cosine": "similarity",
    "stats": "statistics",
}
