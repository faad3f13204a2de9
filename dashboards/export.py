"""Figures to files: standalone HTML (plotly.js inlined, works offline), PNG and SVG through kaleido.

Static export: kaleido 1.x drives a headless Chrome/Chromium it finds on PATH (``chromium`` from
Debian's package works) or at ``BROWSER_PATH``; it downloads nothing. Without one, PNG/SVG fail with
a ConfigError naming the fix, and HTML still works.
"""

from __future__ import annotations

import os
from pathlib import Path

from neuronmap.errors import ConfigError

FORMATS = ("html", "png", "svg")
MAX_PIXELS = 16384
"""Largest width and height of an exported image: Chromium draws at most 16384 x 16384 pixels (268 M);
past that area kaleido returns a few bytes of garbage instead of a PNG."""
NO_BROWSER = ("PNG/SVG export needs Chrome or Chromium for kaleido: install it (Debian: apt-get install chromium) "
              "or point BROWSER_PATH at it; or write .html, which needs nothing")


def figure_format(out: str | os.PathLike) -> str:
    """The format named by `out`'s suffix; ConfigError for anything but .html, .png, .svg."""
    suffix = Path(out).suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        raise ConfigError(f"--out {out} must end in .html, .png or .svg (got {suffix or 'no suffix'!r})")
    return suffix


def check_image_size(width: int, height: int, scale: float = 1.0) -> None:
    """ConfigError unless width and height (times `scale`) are whole pixels in [1, MAX_PIXELS]."""
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value * scale <= MAX_PIXELS:
            raise ConfigError(f"--{name} {value!r} must be between 1 and {MAX_PIXELS} pixels (the largest image "
                              f"Chromium renders{f' at scale {scale}' if scale != 1 else ''}), e.g. --{name} "
                              f"{1000 if name == 'width' else 700}")


def _looks_like(data: bytes, format: str) -> bool:
    if format == "png":
        return data.startswith(b"\x89PNG\r\n\x1a\n")
    head = data[:512].lstrip().lower()
    return head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in data[:4096].lower())


def figure_bytes(fig, format: str, width: int = 1000, height: int = 700, scale: float = 1.0) -> bytes:
    """PNG or SVG bytes of `fig` through kaleido (headless Chromium); ConfigError when it gives no valid image."""
    if format not in ("png", "svg"):
        raise ConfigError(f"format={format!r} must be png or svg")
    check_image_size(width, height, scale)
    try:
        import kaleido  # noqa: F401
    except ImportError:
        raise ConfigError("PNG/SVG export needs kaleido: pip install -e '.[dashboard]'; or write .html") from None
    try:
        data = fig.to_image(format=format, width=width, height=height, scale=scale)
    except Exception as error:  # kaleido raises several types when no browser can start
        text = " ".join(str(error).split())
        if "browser" in text.lower() or "chrome" in text.lower() or "chromium" in text.lower():
            raise ConfigError(f"{NO_BROWSER} ({text[:200]})") from None
        raise
    if not _looks_like(data, format):  # never report success for bytes no viewer can open
        raise ConfigError(f"kaleido returned {len(data)} bytes that are not a {format.upper()} image at {width} x "
                          f"{height} pixels: try a smaller --width/--height, or write .html")
    return data


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
    """Write `data` to `out` through a temp file renamed into place; an OSError (a parent that is a file, no
    permission, a full disk) is a one-line StorageError naming the cause, and no temp file is left behind."""
    from neuronmap.store.manifest import storage_error

    from neuronmap.tempfiles import remove_abandoned, temp_path

    temp = temp_path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned(out)  # what a killed writer of the same file left
        temp.write_bytes(data)
        os.replace(temp, out)
    except OSError as error:
        try:
            temp.unlink(missing_ok=True)
        except OSError:  # the folder is not there (its parent is a file): nothing was written
            pass
        raise storage_error(error, out, resumable=False) from None
    return out
