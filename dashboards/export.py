"""Figures to files: standalone HTML (plotly.js inlined, works offline), PNG and SVG through kaleido.

Static export: kaleido 1.x drives a headless Chrome/Chromium it finds on PATH (``chromium`` from
Debian's package works) or at ``BROWSER_PATH``; it downloads nothing. Without one, PNG/SVG fail with
a ConfigError naming the fix, and HTML still works.
"""

from __future__ import annotations

import os
from pathlib import Path

from neuronmap.errors import ConfigError, StorageError

FORMATS = ("html", "png", "svg")
NO_BROWSER = ("PNG/SVG export needs Chrome or Chromium for kaleido: install it (Debian: apt-get install chromium) "
              "or point BROWSER_PATH at it; or write .html, which needs nothing")


def figure_format(out: str | os.PathLike) -> str:
    """The format named by `out`'s suffix; ConfigError for anything but .html, .png, .svg."""
    suffix = Path(out).suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        raise ConfigError(f"--out {out} must end in .html, .png or .svg (got {suffix or 'no suffix'!r})")
    return suffix


def figure_bytes(fig, format: str, width: int = 1000, height: int = 700, scale: float = 1.0) -> bytes:
    """PNG or SVG bytes of `fig` through kaleido (headless Chromium)."""
    if format not in ("png", "svg"):
        raise ConfigError(f"format={format!r} must be png or svg")
    try:
        import kaleido  # noqa: F401
    except ImportError:
        raise ConfigError("PNG/SVG export needs kaleido: pip install -e '.[dashboard]'; or write .html") from None
    try:
        return fig.to_image(format=format, width=width, height=height, scale=scale)
    except Exception as error:  # kaleido raises several types when no browser can start
        text = " ".join(str(error).split())
        if "browser" in text.lower() or "chrome" in text.lower() or "chromium" in text.lower():
            raise ConfigError(f"{NO_BROWSER} ({text[:200]})") from None
        raise


def figure_html(fig, include_plotlyjs: bool | str = True) -> str:
    """A whole HTML page of `fig`; plotly.js inlined by default (no network needed to view it)."""
    return fig.to_html(include_plotlyjs=include_plotlyjs, full_html=True, config={"displaylogo": False})


def write_figure(fig, out: str | os.PathLike, width: int = 1000, height: int = 700) -> Path:
    """Write `fig` to `out` (.html, .png or .svg), atomically (temp file + rename)."""
    out = Path(out)
    format = figure_format(out)
    data = figure_html(fig).encode("utf-8") if format == "html" else figure_bytes(fig, format, width, height)
    return write_bytes(out, data)


def write_bytes(out: Path, data: bytes) -> Path:
    temp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        temp.write_bytes(data)
        os.replace(temp, out)
    except OSError as error:
        temp.unlink(missing_ok=True)
        raise StorageError(f"cannot write {out}: {error.strerror or error}; check the folder is writable") from None
    return out
