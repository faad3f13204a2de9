"""Registered analyses, one module per family: every module here is imported by the registry.

A module registers thin adapters with `@register(...)` (see `neuronmap.analysis.registry`): each
reads its input (`LayerInput`, `PairInput` or `RunInput`), calls the family's pure functions
(`neuronmap.analysis.<family>`) and returns an `AnalysisResult`.
"""
