"""The Dash dashboard and the commands that draw figures from runs (`neuronmap visualize`, `report`, `dashboard`).

Reads runs through `neuronmap.store` and artifacts through `neuronmap.analysis`; draws with
`neuronmap.viz`. Needs the ``dashboard`` extra (plotly, dash, dash-bootstrap-components, kaleido).
Module map: `paths` (safe ids -> paths under the runs directory), `export` (figures to HTML/PNG/SVG),
`report` (one standalone HTML page per run), `data` (cached access for the app), `jobs` (background
analyses), `system` (CPU/RAM/disk/GPU), `app` (create_app, routing), `pages/` (one module per page),
`cli` (the commands, registered through the `neuronmap.cli` entry point group).
"""
