"""The `facevae` command: subcommands mapped to functions. Parsing and printing only; the work lives elsewhere.

User mistakes print one line on stderr and exit with status 2; `--json` prints one JSON object on stdout.
Nothing here imports torch at module level: `--help` and argument errors answer at once, and each command imports
the modules it needs inside its function.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from facevae.errors import Interrupted, UserError

if TYPE_CHECKING:
    from facevae.config import Config


class _Parser(argparse.ArgumentParser):
    """One-line errors, and no prefix matching of long options (`--epoch` is not taken for `--epochs`)."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # one line, exit status 2 (argparse prints the whole usage otherwise)
        raise UserError(f"{message} (see `{self.prog} --help`)")

    def format_help(self) -> str:
        """The help text; a description given as a function (one that needs torch) is made only now."""
        if callable(self.description):
            self.description = self.description()
        return super().format_help()


def _train_description() -> str:
    from facevae.distributions import LIKELIHOODS  # imports torch: only when `facevae train --help` is asked for

    return f"Train a VAE. Likelihoods (--set likelihood=NAME): {', '.join(LIKELIHOODS)}."


def _size(text: str) -> int | str:
    """--size: a number of pixels, or auto (the source's own size)."""
    return text if text == "auto" else int(text)


SCALE_HELP = "draw each face N times its size, nearest neighbour (default: at least 64 pixels wide)"


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand; defaults that are config keys come from Config."""
    from facevae.config import Config

    p = _Parser(prog="facevae", description="Variational auto-encoders for faces.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    _data_commands(sub, Config())
    _run_commands(sub, Config())
    _serve_command(sub)
    return p


def _data_commands(sub: Any, d: "Config") -> None:
    """prepare and train."""
    from facevae.config import SPLIT_SCHEMES

    s = sub.add_parser("prepare", help="decode and resize a data source once into a uint8 cache")
    s.add_argument("--data", default=d.data, help=f"lfw, celeba:PATH, folder:PATH or a prepared cache (default: "
                                                  f"{d.data})")
    s.add_argument("--size", type=_size, default=d.image_size,
                   help=f"image side after resizing, or auto: the source's own (default {d.image_size}: lfw 32, "
                        f"CelebA and folders 64)")
    s.add_argument("--crop", type=int, default=d.crop, help=f"CelebA center crop before resizing (default {d.crop})")
    s.add_argument("--split-scheme", "--split", dest="split_scheme", choices=SPLIT_SCHEMES, default=d.split_scheme,
                   help=f"how CelebA is split: official train/valid/test or the deck's 70/30 (the config key "
                        f"split_scheme; default {d.split_scheme})")
    s.add_argument("--seed", type=int, default=d.split_seed,
                   help=f"seed of the deck split (the config key split_seed; default {d.split_seed})")
    s.add_argument("--out", help="cache directory, new or empty (default: under $FACEVAE_CACHE or ~/.cache/facevae)")
    s.add_argument("--max-pixels", type=int,
                   help="largest image decoded, in pixels after reduced JPEG decoding (default 24 million); larger "
                        "ones are skipped and named")
    s.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    s = sub.add_parser("train", help="train a VAE (resumes when --out is an existing run)",
                       description=_train_description)
    s.add_argument("--config", help="a TOML recipe, e.g. configs/lfw-faces.toml")
    s.add_argument("--data", help="data SPEC (overrides the config)")
    s.add_argument("--out", help="run directory (default: runs/<config name>)")
    s.add_argument("--epochs", type=int, help="total epochs (overrides the config)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key")
    s.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_commands(sub: Any, d: "Config") -> None:
    """The commands on trained runs: evaluate, the ones that make faces, compare, summary."""
    s = sub.add_parser("evaluate", help="ELBO, importance-weighted NLL, bits/dim, PSNR, SSIM of a trained run")
    s.add_argument("run_dir")
    s.add_argument("--split", default="test", help="data split (default test)")
    s.add_argument("--iw-samples", type=int, default=1, help="K importance samples for -log p(x) (default 1: ELBO)")
    s.add_argument("--limit", type=int, help="evaluate only the first N images of the split")
    s.add_argument("--batch-size", type=int, default=d.eval_batch_size,
                   help="images decoded at once (default: the run's eval_batch_size; 0: by device, 32 on a CPU, "
                        "256 on a GPU)")
    s.add_argument("--device", help="auto, cpu or cuda (default: the run's config, as in training)")
    s.add_argument("--fid-weights", metavar="FILE",
                   help="Inception weights (inception-2015-12-05, torch-fidelity's .pth) for FID; needs facevae[fid]")
    s.add_argument("--data", help="data SPEC (default: the run's config.toml)")
    s.add_argument("--yes", action="store_true", help="run even when the estimate is beyond 12 hours")
    s.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    _making_commands(sub)

    s = sub.add_parser("compare", help="evaluated runs side by side: a Markdown table and their reconstructions")
    s.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="runs evaluated with `facevae evaluate`")
    s.add_argument("--split", default="test", help="data split of the pictured images (default test)")
    s.add_argument("-n", type=int, default=8, help="images in the picture (default 8)")
    s.add_argument("--out", default="compare.png", help="PNG file (default compare.png)")
    s.add_argument("--data", help="data SPEC (default: each run's config.toml)")
    s.add_argument("--force", action="store_true", help="replace --out even if facevae did not write it")
    s.add_argument("--scale", type=int, help=SCALE_HELP)

    _add_sharing_commands(sub)

    s = sub.add_parser("summary", help="the network's layers, output shapes and parameter counts")
    s.add_argument("run_dir", nargs="?", help="a run directory (else the config's network)")
    s.add_argument("--config", help="a TOML recipe")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key")


def _making_commands(sub: Any) -> None:
    """sample, reconstruct, interpolate, traverse, attributes, edit, analogy: the commands that make faces."""
    from facevae.vocabulary import FACE_HELP, MODES  # torch-free: the parser must not import torch

    s = sub.add_parser("sample", help="new faces from the prior, as a PNG grid")
    s.add_argument("run_dir")
    s.add_argument("-n", type=int, default=64, help="number of faces (default 64)")
    s.add_argument("--seed", type=int, default=0, help="seed of the prior draws (default 0)")
    s.add_argument("--temperature", type=float, default=1.0,
                   help="scale of the prior's standard deviation: z ~ N(0, T^2 I) (default 1)")
    s.add_argument("--scale", type=int, help=SCALE_HELP)
    _picture_options(s, "sample")

    s = sub.add_parser("reconstruct", help="real faces above their reconstructions, or your own (--image)")
    s.add_argument("run_dir")
    s.add_argument("--image", nargs="+", metavar="FACE", help=f"faces to reconstruct, each {FACE_HELP}")
    s.add_argument("--split", default="test", help="data split (default test)")
    s.add_argument("-n", type=int, default=32, help="number of faces (default 32)")
    s.add_argument("--data", help="data SPEC (default: the run's config.toml)")
    s.add_argument("--scale", type=int, help=SCALE_HELP)
    _picture_options(s, "reconstruct")

    s = sub.add_parser("interpolate", help="a row of faces between the posterior means of faces A and B")
    s.add_argument("run_dir")
    s.add_argument("a", metavar="A", help=f"the first face: {FACE_HELP}")
    s.add_argument("b", metavar="B", help="the last face")
    s.add_argument("--steps", type=int, default=8, help="faces on the path, its ends included (default 8)")
    s.add_argument("--mode", choices=MODES, default="slerp",
                   help="slerp: along the sphere, norm between the ends' (default); lerp: a straight line")
    _picture_options(s, "interpolate")

    s = sub.add_parser("traverse", help="what each latent dimension does: one row per dimension, most KL first")
    s.add_argument("run_dir")
    s.add_argument("--image", metavar="FACE", help=f"move around this face's posterior mean (else z = 0): {FACE_HELP}")
    s.add_argument("--dims", type=int, default=10, help="rows: the dimensions with the most KL (default 10)")
    s.add_argument("--range", type=float, default=3.0, dest="range_",
                   help="columns from -RANGE to +RANGE prior standard deviations (default 3)")
    s.add_argument("--device", help="auto, cpu or cuda for the pass over the test split (default: the run's)")
    _picture_options(s, "traverse")

    s = sub.add_parser("attributes", help="attribute vectors (CelebA's 40) and how well each reads its attribute")
    s.add_argument("run_dir")
    s.add_argument("--recompute", action="store_true", help="compute them again even if saved for this model")
    s.add_argument("--device", help="auto, cpu or cuda for the encoder passes (default: the run's)")
    _picture_options(s, "attributes")

    s = sub.add_parser("edit", help="add attribute vectors to a face: a row from its reconstruction to the edit")
    s.add_argument("run_dir")
    s.add_argument("image", metavar="FACE", help=FACE_HELP)
    s.add_argument("--add", action="append", default=[], metavar="NAME=AMOUNT",
                   help="an attribute and how much of it, in units of its vector's length (the difference of the "
                        "mean codes with and without it): --add Smiling=1.5 --add Eyeglasses=-1")
    s.add_argument("--steps", type=int, default=5, help="faces in the row, the reconstruction included (default 5)")
    _picture_options(s, "edit")

    s = sub.add_parser("analogy", help="A is to B as C is to C + (B - A), on posterior means")
    s.add_argument("run_dir")
    for name in "ABC":
        s.add_argument(name.lower(), metavar=name, help=f"face {name}: {FACE_HELP}")
    _picture_options(s, "analogy")


def _picture_options(s: argparse.ArgumentParser, name: str) -> None:
    s.add_argument("--out", help=f"PNG file (default RUN_DIR/images/{name}.png)")
    s.add_argument("--force", action="store_true", help="replace --out even if facevae did not write it")
    s.add_argument("--json", action="store_true", help="print its numbers as one JSON object on stdout")


def _serve_command(sub: Any) -> None:
    """serve: the web page."""
    s = sub.add_parser("serve", help="a web page to make faces with a run (needs the web extra)")
    s.add_argument("run_dir")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; others warn)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    s.add_argument("--max-upload-mb", type=float, default=10, help="largest photo upload in MiB (default 10)")
    s.add_argument("--data", metavar="SPEC",
                   help="the run's data, for the principal directions (default: the one its config.toml names)")


def _add_sharing_commands(sub: Any) -> None:
    """plot, report and export: looking at runs and taking models elsewhere."""
    s = sub.add_parser("plot", help="training curves of one or more runs on one figure (from metrics.jsonl)")
    s.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="runs to draw, labelled by their names")
    s.add_argument("--out", default="curves.png", help="PNG file (default curves.png)")
    s.add_argument("--force", action="store_true", help="replace --out even if facevae did not write it")

    s = sub.add_parser("report", help="one self-contained HTML file: numbers, curves, pictures, config")
    s.add_argument("run_dir")
    s.add_argument("--out", help="HTML file (default RUN_DIR/report.html)")
    s.add_argument("--force", action="store_true", help="replace --out even if it is not a facevae report")

    s = sub.add_parser("export", help="the model as ONNX files with a config and a model card (needs facevae[onnx])")
    s.add_argument("run_dir")
    s.add_argument("--onnx", required=True, metavar="DIR",
                   help="a new or empty directory (or an earlier export) for decoder.onnx, encoder.onnx, config.json, "
                        "README.md")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    try:
        args = build_parser().parse_args(argv)
        if args.version:
            from facevae.version import __version__

            print(__version__)
            return 0
        if not args.command:
            raise UserError(f"name a command: {', '.join(COMMANDS)} (see `facevae --help`)")
        return COMMANDS[args.command](args) or 0
    except UserError as e:
        print(f"facevae: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:  # the trainer has saved a checkpoint and said how to resume
        return e.exit_status
    except KeyboardInterrupt:
        print("facevae: interrupted", file=sys.stderr)
        return 130


def _print_json(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, indent=None))


def _scale(scale: int | None) -> int | None:
    if scale is not None and not 1 <= scale <= 32:
        raise UserError(f"--scale must be between 1 and 32, got {scale}")
    return scale


def cmd_prepare(args: argparse.Namespace) -> int:
    from facevae.data import native_shape, prepare

    size = native_shape(args.data)[1] if args.size == "auto" else args.size
    path, manifest = prepare(args.data, size=size, crop=args.crop, scheme=args.split_scheme, seed=args.seed,
                             out=args.out, max_pixels=args.max_pixels, progress=True)
    result = {"path": str(path), "images": manifest["images"],
              "splits": {k: v for k, v in manifest["splits"].items() if v}, "skipped": manifest.get("skipped", []),
              "size": manifest["size"], "crop": manifest.get("crop")}
    if args.json:
        _print_json(result)
    else:
        splits = ", ".join(f"{k} {v}" for k, v in result["splits"].items())
        print(f"prepared {result['images']} images ({splits}) at {result['size']}x{result['size']} "
              f"in {path}; skipped {len(result['skipped'])}", file=sys.stderr)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from facevae.config import Config
    from facevae.run import Run
    from facevae.train import train

    run = Run(args.out or Path("runs") / (Path(args.config).stem if args.config else "run"))
    base = Config.from_toml(args.config) if args.config else None
    overrides = list(args.set)
    if args.data:
        overrides.append(f"data={json.dumps(args.data)}")
    if args.epochs is not None:
        overrides.append(f"epochs={args.epochs}")
    config = run.resolve_config(base, overrides)
    train(config, run, progress=not args.quiet)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line from rank 0
        print(f"done: model in {run.model_file}, pictures in {run.images_dir}, metrics in {run.metrics_file}",
              file=sys.stderr)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from facevae.evaluate import evaluate_run, format_report
    from facevae.run import Run

    report = evaluate_run(args.run_dir, split=args.split, iw_samples=args.iw_samples, limit=args.limit,
                          batch_size=args.batch_size, device=args.device, fid_weights=args.fid_weights,
                          data=args.data, yes=args.yes)
    print(format_report(report), file=sys.stderr)
    if Run.keeps_eval(args.split, args.limit):
        print(f"wrote {Path(args.run_dir) / 'eval.json'}", file=sys.stderr)
    else:
        print("eval.json left as it was: only a full evaluation of the test split (no --limit) is written there",
              file=sys.stderr)
    if args.json:
        _print_json(report)
    return 0


def _report(args: argparse.Namespace, report: dict[str, Any], what: str) -> int:
    """Say where the picture went (stderr) and print the numbers with --json."""
    print(f"wrote {what} to {report['out']}", file=sys.stderr)
    if args.json:
        _print_json(report)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from facevae.making import sample_faces

    report = sample_faces(args.run_dir, n=args.n, temperature=args.temperature, seed=args.seed, out=args.out,
                          force=args.force, scale=_scale(args.scale))
    return _report(args, report, f"{args.n} samples at temperature {args.temperature:g}")


def cmd_reconstruct(args: argparse.Namespace) -> int:
    if args.image:
        from facevae.making import reconstruct_faces

        return _report(args, reconstruct_faces(args.run_dir, args.image, out=args.out, force=args.force),
                       "each face beside its reconstruction")
    from facevae.run import reconstruct_run

    path = reconstruct_run(args.run_dir, split=args.split, n=args.n, out=args.out, data=args.data, force=args.force,
                           scale=_scale(args.scale))
    print(f"wrote real faces, each row followed by the row of their reconstructions, to {path}", file=sys.stderr)
    if args.json:
        _print_json({"out": str(path), "split": args.split, "n": args.n})
    return 0


def cmd_interpolate(args: argparse.Namespace) -> int:
    from facevae.making import interpolate_faces

    report = interpolate_faces(args.run_dir, args.a, args.b, steps=args.steps, mode=args.mode, out=args.out,
                               force=args.force)
    return _report(args, report, f"A, the {args.mode} path of {args.steps} faces and B")


def cmd_traverse(args: argparse.Namespace) -> int:
    from facevae.making import traverse_faces

    report = traverse_faces(args.run_dir, image=args.image, dims=args.dims, range_=args.range_, device=args.device,
                            out=args.out, force=args.force)
    return _report(args, report, f"traversals of {len(report['dims'])} dimensions")


def cmd_attributes(args: argparse.Namespace) -> int:
    from facevae.making import attributes_report

    report = attributes_report(args.run_dir, recompute=args.recompute, device=args.device, out=args.out,
                               force=args.force)
    for row in report["attributes"]:
        auc = "n/a" if row["auc"] is None else f"{row['auc']:.3f}"
        print(f"  {row['name']:<20} AUC {auc}  ({row['positives']} with, {row['negatives']} without)",
              file=sys.stderr)
    return _report(args, report, f"vectors in {Path(args.run_dir) / 'attributes.safetensors'}; a picture of them")


def cmd_edit(args: argparse.Namespace) -> int:
    from facevae.making import edit_face, parse_amounts

    report = edit_face(args.run_dir, args.image, parse_amounts(args.add), steps=args.steps, out=args.out,
                       force=args.force)
    return _report(args, report, "the face, its reconstruction and the edits")


def cmd_analogy(args: argparse.Namespace) -> int:
    from facevae.making import analogy_faces

    return _report(args, analogy_faces(args.run_dir, args.a, args.b, args.c, out=args.out, force=args.force),
                   "A, B, C and C + (B - A)")


def cmd_compare(args: argparse.Namespace) -> int:
    from facevae.compare import compare_runs

    table, path = compare_runs(args.run_dirs, out=args.out, n=args.n, split=args.split, data=args.data,
                               force=args.force, scale=_scale(args.scale))
    print(table, end="")
    print(f"wrote real faces (top row) and each run's reconstructions (one row per run) to {path}", file=sys.stderr)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from facevae.curves import plot_runs

    path = plot_runs(args.run_dirs, out=args.out, force=args.force)
    print(f"wrote the curves of {len(args.run_dirs)} run(s) to {path}", file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from facevae.report import write_report

    path = write_report(args.run_dir, out=args.out, force=args.force)
    print(f"wrote the report of {args.run_dir} to {path}", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from facevae.export import export_onnx

    paths = export_onnx(args.run_dir, args.onnx)
    print(f"exported {args.run_dir} to {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from facevae.config import Config
    from facevae.model import network_summary

    if args.run_dir:
        from facevae.run import load_run

        config = load_run(args.run_dir).config
    else:
        from facevae.data import with_data_shape

        config = (Config.from_toml(args.config) if args.config else Config()).with_overrides(args.set).validate()
        config = with_data_shape(config)
    print(network_summary(config))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from facevae.web.server import serve

    serve(args.run_dir, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb, data=args.data)
    return 0


COMMANDS = {"prepare": cmd_prepare, "train": cmd_train, "evaluate": cmd_evaluate, "sample": cmd_sample,
            "reconstruct": cmd_reconstruct, "interpolate": cmd_interpolate, "traverse": cmd_traverse,
            "attributes": cmd_attributes, "edit": cmd_edit, "analogy": cmd_analogy, "compare": cmd_compare,
            "plot": cmd_plot, "report": cmd_report, "export": cmd_export, "summary": cmd_summary, "serve": cmd_serve}
