"""The `deit` command: parses flags into configs and calls the library, nothing else.

Errors in what the user gave (a bad flag value, file or folder) print one line and exit 2.

Two command-line libraries, on purpose. `deit train` is parsed by tyro (`cli_train.py`): its
flags are the whole typed config tree (well over a hundred dotted flags, each field's docstring
its help, a recipe or config file as the defaults), which tyro derives from the dataclasses, so
a new setting needs no wiring. The eight other subcommands (eval, predict, convert, export,
visualize, info, data, cache) have a few flat flags each and no config tree behind them, with a
flag whose value is optional (`--pretrained [NAME]`) and nested commands (`deit data check|pack`,
`deit cache list|clear`) that argparse states in a line each; they use the standard library and
start without importing tyro. One `main` routes both and maps every library error to the same
one-line messages and exit codes (`deit.cli_messages`).

Over 400 lines: eight subcommands' flags and the one exit-code table; each `cmd_*` only parses
and calls one library function, so splitting it would scatter the command's surface, not
separate concerns.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import time
import traceback
from pathlib import Path

from deit.cli_messages import (
    USER_ERRORS,
    library_messages,
    report_no_space,
    user_message,
)
from deit.errors import InputError, NoSpaceError


def cmd_train(argv: list[str]) -> None:
    from deit import cli_train, parallel

    cfg, cmd = cli_train.parse(argv)
    if cmd.print_config:
        print(cli_train.print_config(cfg))
        return
    again = [*argv, *([] if cmd.resume else ["--resume"])]

    def lost(message: str) -> None:  # the watchdog's thread; the process ends right after
        print(
            f"deit train: error: {message}; continue the run by starting every process again "
            f"with --resume (each with its own --process-id): deit train {shlex.join(again)}",
            file=sys.stderr,
            flush=True,
        )

    parallel.initialize(cmd.coordinator, cmd.num_processes, cmd.process_id, cfg.parallel, lost)
    from deit.compiler import use_compile_cache
    from deit.data.config import cache_home

    use_compile_cache(cache_home() / "jax-cache", cmd.compile_cache)
    from deit.budget import process_age
    from deit.report import results_table
    from deit.run import finetune, train_and_evaluate
    from deit.signals import Interrupted

    why = cli_train.recipe_reason(argv)
    # A --time-budget is the command's: counted from the process's launch.
    launched = time.perf_counter() - process_age()
    try:
        if cfg.finetune:
            summary = finetune(cfg, cfg.finetune, resume=cmd.resume, why=why, started=launched)
        else:
            summary = train_and_evaluate(cfg, resume=cmd.resume, why=why, started=launched)
    except Interrupted as stop:
        # The launch flags are not in config.json: a multi-host run needs them again.
        launch = [
            f"{flag} {value}"
            for flag, value in (
                ("--coordinator", cmd.coordinator),
                ("--num-processes", cmd.num_processes),
                ("--process-id", cmd.process_id),
            )
            if value is not None
        ]
        if stop.resume and launch:
            stop.resume += " " + " ".join(launch)
        raise
    except (InputError, FloatingPointError):
        raise  # every process stops with these, together
    except Exception:
        parallel.await_verdict()  # a lost process, if that is the cause, is named instead
        raise
    finally:
        parallel.finish()
    import jax

    if jax.process_index() == 0:
        print(results_table(summary))
        print(f"results: {Path(cfg.output).absolute() / 'results.json'}")


def cmd_eval(args: argparse.Namespace) -> None:
    from deit.evaluate import evaluate_checkpoint
    from deit.report import results_table

    checkpoint = _checkpoint(args)
    if checkpoint is None:
        raise InputError("no model given; expected --checkpoint DIR or --pretrained NAME")
    results = evaluate_checkpoint(
        checkpoint, args.data, args.batch_size, args.workers, args.bad_images, args.per_class
    )
    per_class = results.pop("per_class", None)
    print(results_table({"val": results}))
    if per_class is not None:
        width = max(len(row["name"]) for row in per_class)
        print(f"\n{'class':>5}  {'name':<{width}}  {'top-1':>7}  {'images':>6}")
        for row in per_class:
            print(
                f"{row['class']:>5}  {row['name']:<{width}}  {row['top1']:7.2f}  {row['count']:>6}"
            )
        results["per_class"] = per_class
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


def cmd_predict(args: argparse.Namespace) -> None:
    from deit.evaluate import predict

    checkpoint = _checkpoint(args)
    if checkpoint is None:
        raise InputError("no model given; expected --checkpoint DIR or --pretrained NAME")
    if args.features:
        from deit.evaluate import predict_features

        out = Path(args.features)
        feats = predict_features(checkpoint, args.images, out)
        print(
            f"wrote pre-logits {feats.shape} to {out} (its rows' images: {out.with_suffix('.txt')})"
        )
        return
    if args.top < 1:
        raise InputError(f"--top {args.top}; expected 1 or more classes to show")
    for path, top in zip(args.images, predict(checkpoint, args.images, args.top), strict=True):
        print(path)
        for name, p in top:
            print(f"  {p:7.2%}  {name}")


def cmd_convert(args: argparse.Namespace) -> None:
    from deit.convert import convert_checkpoint

    out = convert_checkpoint(
        args.src,
        args.model,
        args.out,
        num_classes=args.num_classes,
        img_size=args.img_size,
        drop_heads=args.drop_heads,
        to=args.to,
    )
    print(f"wrote {out}")


def cmd_export(args: argparse.Namespace) -> None:
    from deit.serving import export_model

    done = export_model(args.checkpoint, args.format, args.out)
    if done.max_abs_diff is not None:
        print(f"checked: max |Δ| {done.max_abs_diff:.3g} against deit.jit's logits (float32)")
    print(f"wrote {done.folder}")


def cmd_visualize(args: argparse.Namespace) -> None:
    from deit import visualize

    checkpoint = _checkpoint(args)
    if args.images and not checkpoint:
        raise InputError("image files need --checkpoint DIR: the model whose attention to draw")
    if not checkpoint and not args.run:
        raise InputError("nothing to draw; expected --checkpoint DIR IMAGE... and/or --run DIR")
    written = []
    if checkpoint:
        out = args.out or "visualize"
        written += visualize.visualize_checkpoint(
            checkpoint, args.images, out, together=args.together
        )
    if args.run:
        written += visualize.visualize_run(args.run, args.out)
    for path in written:
        print(f"wrote {path}")


def cmd_info(args: argparse.Namespace) -> None:
    import jax
    import jax.numpy as jnp

    import deit

    print(f"{'model':36} {'params':>12} {'GFLOP/img':>10}")
    for name in deit.list_models():
        model = deit.create_model(name)
        x = jax.ShapeDtypeStruct((1, model.img_size, model.img_size, 3), jnp.float32)
        params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
        count = deit.param_count(params)
        print(f"{name:36} {count:>12,} {deit.flops_per_image(model) / 1e9:10.2f}")


def _data_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="check or pack an image folder")
    data = p.add_subparsers(dest="data_command", required=True)
    c = data.add_parser("check", help="decode every image of PATH/train and PATH/val")
    c.add_argument("path", help="image folder (train/<class>/, val/<class>/) or shard folder")
    c.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
    k = data.add_parser("pack", help="write an image folder into ArrayRecord shards")
    k.add_argument("path", help="image folder with train/<class>/ and val/<class>/")
    k.add_argument("--out", required=True, help="new or empty folder for the shards")
    k.add_argument("--records-per-shard", type=int, default=None)


def cmd_data(args: argparse.Namespace) -> int:
    from deit import data

    if args.data_command == "pack":
        extra = {}
        if args.records_per_shard is not None:
            extra["records_per_shard"] = args.records_per_shard
        out = data.pack(args.path, args.out, **extra)
        print(f"wrote {out}; train or evaluate from it with --data {out}")
        return 0
    bad = data.check_images(args.path, args.workers)
    for name, reason in bad:
        print(f"{name}: {reason}")
    if bad:
        print(f"{len(bad)} unreadable image(s) in {args.path}", file=sys.stderr)
        return 1
    print(f"every image in {args.path} decodes")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deit", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of every error (also DEIT_DEBUG=1)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    # `deit train ARGS` is parsed by `cli_train` (tyro over the config tree); listed for --help.
    sub.add_parser("train", help="train (and distil) a DeiT; no flags: the built-in data set")
    p = sub.add_parser("eval", help="per-head top-1/top-5 of an exported model")
    _model_args(p)
    p.add_argument("--data", default="digits", help="image folder (uses val/) or digits")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=None, help="default: one per usable core")
    p.add_argument(
        "--bad-images",
        choices=("error", "skip"),
        default="error",
        help="an unreadable image stops (error) or is left out of the counts (skip)",
    )
    p.add_argument(
        "--per-class",
        action="store_true",
        help="also the averaged heads' top-1 per class (ImageNet-1k names for converted weights)",
    )
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p = sub.add_parser("predict", help="top-5 classes of image files")
    _model_args(p)
    p.add_argument("--top", type=int, default=5)
    p.add_argument(
        "--features",
        default=None,
        metavar="OUT.npy",
        help="instead of classes, save the pre-logits (N, D) of the images (folders: every "
        "image inside), rows in the order of OUT.txt",
    )
    p.add_argument("images", nargs="+", help="image files, or folders of them with --features")
    p = sub.add_parser("convert", help="timm/official/HF weights <-> a Flax model folder")
    p.add_argument("src", help=".pth/.pth.tar/.bin/.safetensors, or a model folder with --to timm")
    p.add_argument("--model", default=None, help="variant name (inferred when omitted)")
    p.add_argument("--out", required=True)
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--drop-heads", action="store_true", help="fresh heads (fine-tuning)")
    p.add_argument("--to", choices=("flax", "timm"), default="flax")
    p = sub.add_parser("export", help="a model for serving: StableHLO, ONNX, or safetensors")
    p.add_argument("checkpoint", help="run folder, exported model folder, or a pretrained name")
    p.add_argument(
        "--format",
        default="safetensors",
        help="safetensors (a model folder, the default), stablehlo (jax.export) or onnx "
        "(pip install 'deit[onnx]'); each serving format is checked against the model",
    )
    p.add_argument("--out", required=True, help="output folder")
    p = sub.add_parser("visualize", help="CLS/DIST attention maps of images; a run's curves")
    _model_args(p)
    p.add_argument("--run", default=None, help="run folder: training curves and per-head table")
    p.add_argument("--out", default=None, help="output folder (default: ./visualize, or --run)")
    p.add_argument("--together", action="store_true", help="all images in one attention.png")
    p.add_argument("images", nargs="*", help="image files (with --checkpoint)")
    sub.add_parser("info", help="registered variants with parameter counts and FLOPs")
    _data_parser(sub)
    p = sub.add_parser("cache", help="the downloaded and converted official weights")
    cache = p.add_subparsers(dest="cache_command", required=True)
    cache.add_parser("list", help="what the cache holds, with sizes")
    c = cache.add_parser("clear", help="delete the cache's downloads and converted folders")
    c.add_argument("name", nargs="?", default=None, help="only this model's (default: all)")
    return parser


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        default=None,
        help="run folder, exported model folder, or a pretrained name (deit cache list)",
    )
    p.add_argument(
        "--pretrained",
        nargs="?",
        const="",
        default=None,
        metavar="NAME",
        help="the official weights NAME (NAME@hf, NAME@timm: from the Hugging Face Hub), "
        "downloaded and converted once; alone, those of --model",
    )
    p.add_argument("--model", default=None, help="with --pretrained: the variant name")


def _checkpoint(args: argparse.Namespace) -> str | None:
    """`--checkpoint`, `--pretrained NAME` or `--model NAME --pretrained`, as one path or name."""
    named = args.pretrained or (args.model if args.pretrained == "" else None)
    if args.pretrained == "" and not args.model:
        raise InputError("--pretrained without a name needs --model NAME")
    if args.model and args.pretrained is None:
        raise InputError("--model names the weights only with --pretrained")
    if named and args.checkpoint:
        raise InputError("--checkpoint and --pretrained both name the model; expected one")
    return named or args.checkpoint


def cmd_cache(args: argparse.Namespace) -> None:
    from deit import pretrained

    if args.cache_command == "clear":
        removed = pretrained.clear_cache(args.name)
        for path in removed:
            print(f"removed {path}")
        print(f"{len(removed)} entr{'y' if len(removed) == 1 else 'ies'} removed")
        return
    entries = pretrained.cache_entries()
    print(f"cache: {pretrained.cache_home()} (set DEIT_HOME to move it)")
    for path, size in entries:
        print(f"{size / 2**20:10.1f} MiB  {path.relative_to(pretrained.cache_home())}")
    if not entries:
        print("empty; deit eval/predict/visualize --pretrained NAME fills it:")
    print("names: " + ", ".join(pretrained.PRETRAINED))


COMMANDS = {
    "eval": cmd_eval,
    "predict": cmd_predict,
    "convert": cmd_convert,
    "export": cmd_export,
    "visualize": cmd_visualize,
    "info": cmd_info,
    "data": cmd_data,
    "cache": cmd_cache,
}


def main(argv: list[str] | None = None) -> int:
    program = argv is None  # the `deit` command itself, not a call from Python
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("DEIT_DEBUG", "") not in ("", "0") or "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    args = build_parser().parse_args(argv) if argv[:1] != ["train"] else None
    from deit.signals import Interrupted

    command = "train" if args is None else args.command
    try:
        with library_messages():
            code = cmd_train(argv[1:]) if args is None else COMMANDS[command](args)
    except BrokenPipeError:  # `deit ... | head`: the reader left; nothing more to say
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- Python flushes stdout at exit
        return 0
    except Interrupted as stop:
        print(f"deit {command}: {stop}", file=sys.stderr)
        if program:
            # Everything is saved and closed; the interpreter's teardown (XLA's runtime, the
            # data workers' leftovers) takes seconds on a busy machine, which a user who
            # pressed Ctrl-C would wait through for nothing.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(128 + stop.signum)
        return 128 + stop.signum
    except KeyboardInterrupt:  # Ctrl-C where nothing listens for it (start-up, imports)
        print(f"deit {command}: stopped by SIGINT", file=sys.stderr)
        return 128 + signal.SIGINT
    except FloatingPointError as err:
        if debug:
            traceback.print_exc()
        print(f"deit {command}: error: {user_message(err)}", file=sys.stderr)
        return 3
    except USER_ERRORS as err:
        if debug:
            traceback.print_exc()
        if isinstance(err, NoSpaceError):
            return report_no_space(command, err, quiet=program and not debug)
        print(f"deit {command}: error: {user_message(err)}", file=sys.stderr)
        return 2
    except Exception as err:
        from deit import diskspace

        if isinstance(err, OSError) and diskspace.is_no_space(err):  # the machine's state
            if debug:
                traceback.print_exc()
            return report_no_space(command, err, quiet=program and not debug)
        traceback.print_exc()
        print(
            f"deit {command}: internal error: this is a bug in deit, not in what you gave it; "
            "please report it with the traceback above",
            file=sys.stderr,
        )
        return 1
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
