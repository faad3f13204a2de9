"""One module per page: ``PATH``, ``TITLE``, ``IN_NAV``, ``layout(ctx, query)``, ``register(app, ctx)``."""

from . import analysis_artifact, attention, compare, gallery, jobs, launch, layer, run, runs

PAGES = [runs, run, layer, attention, compare, gallery, analysis_artifact, launch, jobs]
