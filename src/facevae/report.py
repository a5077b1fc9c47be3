"""`facevae report RUN`: one self-contained HTML file to look at or send: the eval numbers with their units, the curves,
reconstructions, samples, the attribute table where there is one, and the config.

Self-contained: pictures are embedded as base64 data: URIs, there is no script and no link to fetch, so the file
opens offline and tells nobody it was opened. A run directory may come from someone else: every string taken from it
is HTML-escaped, only regular files inside the run are read (no link leads out of it), each after a size check, and
pictures are embedded only when they are PNG files.
"""

from __future__ import annotations

import base64
import html
import json
import tomllib
from pathlib import Path
from typing import Any, Callable

from facevae import __version__
from facevae.compare import ROWS
from facevae.curves import png_bytes, read_metrics
from facevae.errors import UserError
from facevae.fileio import atomic_write, check_path_text
from facevae.run import Run

REPORT_MARK = "<!-- facevae report: written by facevae, replaced by `facevae report` -->"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PICTURE_BYTES = 32 * 2**20
MAX_TEXT_BYTES = 4 * 2**20  # config.toml, eval.json, attributes.json: a few KB when facevae wrote them
# The run's pictures, first found wins: what `facevae reconstruct` / `sample` wrote, else the last epoch's grids.
# (title, what it shows, files (first found wins), the command that makes it; None: shown only when present).
PICTURES = [("Reconstructions", "real faces, each row followed by the row of their reconstructions",
             ("images/reconstruct.png", "images/reconstructions.png"), "reconstruct"),
            ("Samples", "new faces: means of p(x|z) for z drawn from the prior N(0, I)",
             ("images/sample.png", "images/samples.png"), "sample"),
            ("Interpolation", "from one face's code to another's", ("images/interpolate.png",), None),
            ("Latent traversal", "one latent dimension changed at a time", ("images/traverse.png",), None),
            ("Analogy", "A is to B as C is to C + (B - A)", ("images/analogy.png",), None),
            ("Attribute edit", "attribute vectors added to a face", ("images/edit.png",), None)]
# The columns of the attribute table: index key -> heading (facevae.attributes writes the index).
ATTRIBUTE_COLUMNS = {"name": "attribute", "auc": "test AUC", "auc_balanced": "test AUC, balanced vector",
                     "positives": "training images with it", "negatives": "without"}
STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
img{max-width:100%}img.faces{image-rendering:pixelated}
.note{color:#666}code{background:#f4f4f4;padding:0 .2em}"""


def esc(value: Any) -> str:
    """Any value as escaped HTML text (quotes too: safe inside attributes)."""
    return html.escape(str(value), quote=True)


def read_run_file(run_dir: Path, name: str, limit: int) -> bytes | None:
    """The bytes of RUN_DIR/name when it is a regular file inside the run no larger than `limit`, else None."""
    path = run_dir / name
    try:
        inside = path.resolve().is_relative_to(run_dir.resolve())
        if not (inside and path.is_file()) or path.stat().st_size > limit:
            return None
        return path.read_bytes()
    except OSError:
        return None


def _table(rows: list[tuple[str, str]], *, header: tuple[str, ...] = ()) -> str:
    """Rows of (already escaped) cells as an HTML table."""
    head = "<tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _picture(data: bytes, alt: str, *, faces: bool = False) -> str:
    """A PNG embedded as a data: URI (faces: drawn with sharp pixels when scaled)."""
    css = ' class="faces"' if faces else ""
    return f'<img alt="{esc(alt)}"{css} src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def eval_section(run: Run) -> str:
    """The eval.json numbers with their units and directions, or a note saying how to get them."""
    if read_run_file(run.path, run.eval_file.name, MAX_TEXT_BYTES) is None:
        return f'<p class="note">Not evaluated: run <code>facevae evaluate {esc(run)}</code>, then the report.</p>'
    try:
        report = run.read_eval()
    except UserError as e:
        return f'<p class="note">{esc(e)}</p>'
    rows = [(esc(label.replace("\\|", "|")), esc(_cell(cell, report))) for label, cell in ROWS]
    rows.append(("evaluated on", esc(f"{report.get('images', '?')} images of the '{report.get('split', '?')}' "
                                     f"split")))
    return _table(rows, header=("figure", "value"))


def _cell(cell: Callable[[dict[str, Any]], str], report: dict[str, Any]) -> str:
    try:
        return cell(report)
    except (KeyError, TypeError, ValueError):  # a field missing or of the wrong type in someone else's eval.json
        return "n/a"


def curves_section(run: Run) -> str:
    """The training curves, drawn now from metrics.jsonl."""
    try:
        curves = read_metrics(run)
    except UserError as e:
        return f'<p class="note">No curves: {esc(e)}</p>'
    if not curves.epochs and not curves.steps:
        return '<p class="note">No curves: metrics.jsonl holds no epoch or step records yet.</p>'
    return _picture(png_bytes([curves]), "training curves")


def pictures_section(run: Run) -> str:
    """The run's reconstruction and sample grids, and the pictures of the making-faces commands it has, embedded."""
    parts = []
    for title, what, names, command in PICTURES:
        found = [(n, d) for n in names if (d := read_run_file(run.path, n, MAX_PICTURE_BYTES)) is not None
                 and d.startswith(PNG_SIGNATURE)]
        if found:
            name, data = found[0]
            parts.append(f"<h3>{title}</h3><p>{esc(what)} (<code>{esc(name)}</code>)</p>"
                         + _picture(data, title, faces=True))
        elif command:
            parts.append(f'<h3>{title}</h3><p class="note">None in the run: make them with <code>facevae '
                         f'{command} {esc(run)}</code>.</p>')
    return "".join(parts)


def attributes_section(run: Run) -> str:
    """The attribute vectors' table (`facevae attributes`) when the run has attributes.json; else ""."""
    from facevae.attributes import INDEX_FILE, model_digest

    data = read_run_file(run.path, INDEX_FILE, MAX_TEXT_BYTES)
    if data is None:
        return ""
    try:
        index = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return f'<h2>Attributes</h2><p class="note">{INDEX_FILE} is not valid JSON.</p>'
    entries = index.get("attributes") if isinstance(index, dict) else None
    entries = [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []
    rows = [tuple(esc(_number(e.get(k))) for k in ATTRIBUTE_COLUMNS) for e in entries]
    stale = run.model_file.is_file() and index.get("model_sha256") != model_digest(run)
    note = (f'<p class="note">These vectors were computed for another model: <code>facevae attributes {esc(run)} '
            f'--recompute</code> makes them again.</p>') if stale else ""
    return ("<h2>Attributes</h2><p>One latent direction per attribute: the mean code of the training images with it "
            "minus that of those without (balanced: Male and non-Male groups averaged first). AUC: how well the "
            "projection on it separates the test images with the attribute from those without (0.5: not at all)."
            f"</p>{note}" + _table(rows, header=tuple(ATTRIBUTE_COLUMNS.values())))


def _number(value: Any) -> Any:
    return "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else value


def config_section(run: Run) -> str:
    """The run's config.toml as a key / value table."""
    data = read_run_file(run.path, run.config_file.name, MAX_TEXT_BYTES)
    try:
        values = tomllib.loads(data.decode()) if data is not None else None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError):
        values = None
    if not isinstance(values, dict):
        return '<p class="note">No readable config.toml in the run.</p>'
    rows = [(f"<code>{esc(k)}</code>", esc(v if isinstance(v, str) else json.dumps(v, default=str)))
            for k, v in values.items()]  # default=str: TOML dates and times
    return _table(rows, header=("key", "value"))


def build_report(run: Run | str | Path) -> str:
    """The whole report of a run as one HTML document."""
    run = Run(run)
    if not run.path.is_dir():
        raise UserError(f"run directory {run} does not exist")
    name = run.path.resolve().name
    sections = [("Evaluation", eval_section(run)), ("Training curves", curves_section(run)),
                ("Pictures", pictures_section(run)), ("", attributes_section(run)),
                ("Configuration", config_section(run))]
    body = "".join((f"<h2>{title}</h2>" if title else "") + html_part for title, html_part in sections)
    return (f"<!DOCTYPE html>\n{REPORT_MARK}\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>facevae run {esc(name)}</title><style>{STYLE}</style></head><body>"
            f"<h1>facevae run <code>{esc(name)}</code></h1>"
            f"<p>Report written by facevae {esc(__version__)} from the run directory "
            f"<code>{esc(run)}</code>. Nats and bits are per image and per dimension as stated; an ELBO is a "
            f"lower bound on log p(x).</p>{body}</body></html>\n")


def write_report(run: Run | str | Path, *, out: str | Path | None = None, force: bool = False) -> Path:
    """Write the report to `out` (default RUN_DIR/report.html); an existing file is replaced only if it is a report
    (or `force`)."""
    run = Run(run)
    out = Path(out) if out is not None else run.path / "report.html"
    check_path_text(str(out), "--out")
    if out.is_symlink() or (out.exists() and not out.is_file()):
        raise UserError(f"{out} exists and is not a regular file; choose another --out")
    if out.is_file() and not force:
        with out.open("rb") as f:
            head = f.read(200)
        if REPORT_MARK.encode() not in head:
            raise UserError(f"--out {out} exists and is not a facevae report; choose another --out or add --force "
                            f"to replace it")
    text = build_report(run)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, text)
    return out
