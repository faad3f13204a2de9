"""`create_app(runs_dir)`: the Dash app, its page shell and the router.

Routing is by path; page arguments travel in the query string (``/run?run=demo/minilm``), so run ids
may hold slashes. Each page module (`pages/*.py`) has ``PATH``, ``TITLE``, ``layout(ctx, query)`` and
``register(app, ctx)`` for its callbacks. A `NeuronMapError` raised while building a page (a refused
id, a deleted run, a corrupt manifest) becomes an error state, never a server error.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import parse_qs

import dash
import dash_bootstrap_components as dbc
from dash import Input, Output, dcc, html

from neuronmap.errors import NeuronMapError

from . import reduce
from .components import Context, error_state
from .data import Repository
from .jobs import JobManager
from .pages import PAGES
from .prefetch import Prefetcher

ASSETS = Path(__file__).parent / "assets"
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
                    "Referrer-Policy": "same-origin"}


def navbar() -> dbc.Navbar:
    links = [dbc.NavItem(dbc.NavLink(page.TITLE, href=page.PATH, active="exact")) for page in PAGES if page.IN_NAV]
    return dbc.Navbar(dbc.Container([
        dcc.Link("NeuronMap", href="/", className="navbar-brand fw-bold text-white text-decoration-none"),
        dbc.Nav(links, navbar=True, className="flex-wrap"),
    ], fluid=True), color="dark", dark=True, className="mb-3", expand="md")


def shell() -> html.Div:
    return html.Div([
        dcc.Location(id="url", refresh=False),
        html.A("Skip to content", href="#page", className="visually-hidden-focusable"),
        navbar(),
        dbc.Container(html.Main(id="page", tabIndex="-1"), fluid=True, className="pb-5"),
    ])


def parse_query(search: str | None) -> dict[str, str]:
    return {key: values[-1] for key, values in parse_qs((search or "").lstrip("?"), keep_blank_values=True).items()}


def create_app(runs_dir: str | os.PathLike, workers: int = 2, prefetch: bool = True) -> dash.Dash:
    """The dashboard over the runs under `runs_dir` (analyses launched from it run on `workers` threads).

    With `prefetch` a Run page visit warms that run's layer summaries and CKA matrix in the background.
    """
    reduce.preload()
    repository = Repository(runs_dir)
    ctx = Context(repository, JobManager(repository, workers), Prefetcher(repository) if prefetch else None)
    app = dash.Dash(__name__, assets_folder=str(ASSETS), suppress_callback_exceptions=True, title="NeuronMap",
                    update_title=None, serve_locally=True, meta_tags=[
                        {"name": "viewport", "content": "width=device-width, initial-scale=1"}])
    app.layout = shell()
    routes = {page.PATH: page for page in PAGES}

    @app.callback(Output("page", "children"), Input("url", "pathname"), Input("url", "search"))
    def route(pathname: str | None, search: str | None):
        page = routes.get(pathname or "/")
        if page is None:
            return error_state(f"there is no page {pathname!r}; pick one from the menu", title="Page not found")
        try:
            return page.layout(ctx, parse_query(search))
        except NeuronMapError as error:
            return error_state(str(error))

    for page in PAGES:
        page.register(app, ctx)

    @app.server.after_request
    def _headers(response):
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        return response

    app.neuronmap = ctx  # tests and the CLI reach the repository and jobs through it
    return app
