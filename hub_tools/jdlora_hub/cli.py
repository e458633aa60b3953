"""Command line: `jdlora-convert` and `jdlora {convert,inspect,export,add,remove,push,train}`.

Exit codes (see `errors.ExitCode`): 0 ok, 1 internal error, 2 usage, 3 bad input, 4 output exists, 5 verification
failed, 6 Hub request failed, 7 training failed (`train`). Errors are one line on stderr (and a JSON object on
stdout with --json); progress and log lines go to stderr, results to stdout. Heavy imports (torch, transformers)
happen only when a command needs them, so bad arguments fail fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from . import __version__
from .errors import ExitCode, JDLoraHubError, UsageError
from .signals import Terminated, termination_raises

CONVERT_EPILOG = """\
SOURCES are PEFT LoRA adapters of one base model:
  ./path/to/adapter        a local PEFT adapter folder
  org/name[@revision]      a Hub repo (branch, tag or commit; pinned to its commit sha)
  'org/task-*'             every model of org whose name matches the glob (quote it for the shell);
                           non-LoRA matches are skipped and reported
  NAME=SOURCE              the adapter's name in the bundle (default: the folder or repo name)

examples:
  jdlora-convert --from-hub 'org/*' --out bundle/ --rank 64 --clusters auto --target-error 0.05 --push org/jdlora-bundle
  jdlora-convert ./lora_a ./lora_b sql=org/sql-lora@v2 --out bundle/ --max-error 0.1
  HF_HUB_OFFLINE=1 jdlora-convert 'org/*' --out bundle/          # from the local Hugging Face cache

exit codes: 0 ok, 1 internal error, 2 usage, 3 bad input, 4 output exists, 5 verification failed, 6 Hub error
"""


# ---------------------------------------------------------------------------------------------------- arguments


def number_option(convert: Callable[[str], Any], accepts: Callable[[Any], bool], expected: str) -> Callable[[str], Any]:
    """An argparse `type` reading a number with `convert` that `accepts` it: 'expected <expected>, got ...'
    otherwise."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accepts(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = number_option(int, lambda value: value >= 1, "a positive integer")
_non_negative_float = number_option(float, lambda value: value >= 0, "a number >= 0")


def _clusters(text: str) -> Any:
    return "auto" if text == "auto" else _positive_int(text)


def _common_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("general")
    group.add_argument("-q", "--quiet", action="store_true", help="no progress bars, no log lines (errors still shown)")
    group.add_argument("--json", action="store_true", help="print the result (or the error) as JSON on stdout")
    group.add_argument(
        "--offline", action="store_true", help="use only the local Hugging Face cache (HF_HUB_OFFLINE=1)"
    )
    return common


def _add_compression_args(parser: argparse.ArgumentParser, refit: bool = False) -> None:
    what = " (with --refit; default: the bundle's)" if refit else ""
    group = parser.add_argument_group("compression" + (" (--refit only)" if refit else ""))
    group.add_argument(
        "--rank",
        type=_positive_int,
        help=f"rank r of the shared bases{what}"
        if refit
        else "rank r of the shared bases (16 when only --sigma, --clusters or --method is given); without any of "
        "them or --budget, a budget plan of the size of --rank 16 (per-adapter SVD or one shared basis per module)",
    )
    group.add_argument(
        "--sigma", choices=["full", "diag"], help=f"Σ per adapter: r×r ('full') or r numbers ('diag'){what}"
    )
    group.add_argument(
        "--clusters",
        type=_clusters,
        metavar="{N,auto}",
        help=f"number of shared bases, or 'auto' (with --target-error){what}",
    )
    group.add_argument(
        "--target-error",
        type=_non_negative_float,
        help="error target: with --clusters auto, the clusters are chosen to meet it; alone, a budget plan picks the "
        "smallest bundle meeting it (mean over adapters, or every adapter with --every-adapter)",
    )
    group.add_argument(
        "--budget",
        metavar="{BYTES,RATIOx,rR,auto}",
        help="size of the bundle in bytes (e.g. 4000000, 4MB, 4MiB), a ratio like 16x (16 times smaller than the "
        "source adapters) or r32 (the size of --rank 32): ranks, clusters and per-adapter SVD are chosen per module "
        "to minimise the mean error; auto: the smallest such bundle meeting --target-error (what --target-error "
        "alone asks for)",
    )
    group.add_argument(
        "--every-adapter",
        action="store_true",
        help="with --target-error and no --clusters auto (--budget auto): every adapter (not the mean) must meet the "
        "target",
    )
    group.add_argument(
        "--method", choices=["jd", "svd"], help="'jd': joint diagonalisation (default); 'svd': per-adapter SVD baseline"
    )
    group.add_argument("--max-iter", type=_positive_int, help="iteration cap of the joint fit")
    group.add_argument(
        "--tol", type=_non_negative_float, help="convergence tolerance on the subspace change (default 1e-3)"
    )
    group.add_argument(
        "--device", help="device for compression and checks, e.g. cpu, cuda, cuda:1 (default: the engine's choice)"
    )
    group.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="dtype of the stored factors")
    group.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def _add_verify_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("verification (before anything is written or pushed)")
    group.add_argument(
        "--max-error",
        type=_non_negative_float,
        help="fail if any adapter's error (squared relative Frobenius error of ΔW, mean over modules) exceeds this",
    )
    group.add_argument(
        "--base-model",
        metavar="PATH_OR_ID",
        help="base model for the logits check: a folder or Hub id[@revision] (downloaded if needed). Default: the "
        "adapters' recorded base model, if it is a local folder or in the Hugging Face cache",
    )
    group.add_argument("--no-base-check", action="store_true", help="skip the logits check on the base model")
    group.add_argument(
        "--check-adapters",
        type=_positive_int,
        default=3,
        metavar="K",
        help="adapters compared in the logits check (default 3)",
    )
    group.add_argument(
        "--max-logit-error",
        type=_non_negative_float,
        help="fail if an adapter's effect on the logits differs from the original's by more than this (relative)",
    )


def _add_output_args(parser: argparse.ArgumentParser, *, required: bool = True, in_place: bool = False) -> None:
    group = parser.add_argument_group("output")
    group.add_argument(
        "--out", type=Path, required=required and not in_place, help="output bundle folder (written atomically)"
    )
    if in_place:
        group.add_argument("--in-place", action="store_true", help="replace the (local) bundle folder itself")
    group.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    group.add_argument("--push", metavar="ORG/NAME", help="also push the bundle to this Hub repo (one commit)")
    group.add_argument("--private", action="store_true", help="create the --push repo as private")
    group.add_argument("--commit-message", help="commit message for --push")


def _convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sources", nargs="*", metavar="SOURCE", help="LoRA adapters: folders, Hub ids, Hub globs")
    _add_output_args(parser)
    group = parser.add_argument_group("sources")
    group.add_argument(
        "--from-hub",
        action="append",
        default=[],
        metavar="ORG/NAME_OR_GLOB",
        help="a Hub repo id or glob, never read as a local folder (repeatable; same as a SOURCE otherwise)",
    )
    group.add_argument("--revision", help="revision for Hub sources given without @revision (default: main)")
    group.add_argument(
        "--select-base", metavar="BASE", help="keep only adapters of this base model (others are skipped)"
    )
    group.add_argument(
        "--skip-invalid",
        action="store_true",
        help="skip adapters that cannot be read or represented (DoRA, corrupt files, ...) instead of failing",
    )
    _add_compression_args(parser)
    _add_verify_args(parser)


def build_parser(prog: str = "jdlora") -> argparse.ArgumentParser:
    common = _common_parser()
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Build, inspect and edit JD-LoRA bundles: many LoRA adapters of one base model compressed into "
        "shared bases, served by one PEFT model with a different adapter on each row of a batch.",
        epilog="Run `jdlora COMMAND --help` for a command's options. Exit codes: 0 ok, 1 internal error, 2 usage, "
        "3 bad input, 4 output exists, 5 verification failed, 6 Hub error, 7 training failed.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "convert",
        parents=[common],
        help="compress LoRA adapters (folders, Hub ids, Hub globs) into a bundle",
        description="Compress PEFT LoRA adapters of one base model into a verified JD-LoRA bundle folder, with a "
        "model card, and optionally push it to the Hub.",
        epilog=CONVERT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _convert_arguments(p)

    p = sub.add_parser(
        "inspect",
        parents=[common],
        help="show a bundle's settings and adapters",
        description="Show a bundle's settings, size, errors and its adapters (name, source, revision, cluster, error).",
    )
    p.add_argument("bundle", metavar="BUNDLE", help="bundle folder or Hub id[@revision]")
    p.add_argument("--revision", help="revision of a Hub bundle (default: main)")

    p = sub.add_parser(
        "export",
        parents=[common],
        help="write adapters of a bundle back as plain PEFT LoRA folders",
        description="Write one adapter (--out is the LoRA folder) or several / all (--out/<name>/ each) as PEFT LoRA "
        "folders that PEFT loads without peft-jdlora. They compute exactly what the bundle computes.",
    )
    p.add_argument("bundle", metavar="BUNDLE", help="bundle folder or Hub id[@revision]")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME", help="adapter name or index (repeatable)")
    p.add_argument("--all", action="store_true", help="export every adapter")
    p.add_argument("--out", type=Path, required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--revision", help="revision of a Hub bundle (default: main)")

    p = sub.add_parser(
        "add",
        parents=[common],
        help="add adapters to a bundle (projection into its bases, or --refit)",
        description="Add LoRA adapters to a bundle by projecting them into its shared bases (fast; the bases and the "
        "other adapters stay as they are), or with --refit compress the bundle's original adapters and the new ones "
        "again (needs the originals, re-read at their recorded revisions).",
        epilog="SOURCES as for `jdlora convert`. Exit codes as for `jdlora convert`.",
    )
    p.add_argument("bundle", metavar="BUNDLE", help="bundle folder or Hub id[@revision]")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="LoRA adapters to add")
    p.add_argument("--refit", action="store_true", help="compress everything again instead of projecting")
    p.add_argument("--revision", help="revision for Hub sources given without @revision (default: main)")
    _add_output_args(p, in_place=True)
    _add_compression_args(p, refit=True)
    _add_verify_args(p)

    p = sub.add_parser(
        "remove",
        parents=[common],
        help="remove adapters from a bundle",
        description="Remove adapters from a bundle; the shared bases and the other adapters stay as they are.",
    )
    p.add_argument("bundle", metavar="BUNDLE", help="bundle folder or Hub id[@revision]")
    p.add_argument("names", nargs="+", metavar="NAME", help="adapters to remove")
    _add_output_args(p, in_place=True)

    p = sub.add_parser(
        "push",
        parents=[common],
        help="push a bundle folder to the Hub (one commit)",
        description="Push a bundle folder written by these tools to a Hub repo as one commit (e.g. after a push that "
        "failed). The repo is created if needed.",
    )
    p.add_argument("folder", type=Path, metavar="FOLDER", help="bundle folder")
    p.add_argument("repo_id", metavar="ORG/NAME", help="Hub repo")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--commit-message", help="commit message")

    from .train import add_parser as add_train_parser

    add_train_parser(sub, common, _add_output_args)
    return parser


def build_convert_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jdlora-convert",
        parents=[_common_parser()],
        description="Compress PEFT LoRA adapters of one base model into a verified JD-LoRA bundle folder, with a "
        "model card, and optionally push it to the Hub. Same as `jdlora convert`.",
        epilog=CONVERT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _convert_arguments(parser)
    return parser


# ---------------------------------------------------------------------------------------------------- running


def _setup_environment(args: argparse.Namespace) -> None:
    """Environment switches that huggingface_hub / transformers read when first imported."""
    if args.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
        if "huggingface_hub" in sys.modules:  # called in-process: the constant was read at import time
            from huggingface_hub import constants

            constants.HF_HUB_OFFLINE = True
    if args.quiet:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        os.environ["HF_HUB_VERBOSITY"] = "error"  # e.g. huggingface_hub's "Retrying in 2s" notices
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"
        if "huggingface_hub" in sys.modules:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _outputs(args: argparse.Namespace, bundle_ref: Optional[str] = None) -> Any:
    from .pipeline import OutputOptions

    out = args.out
    in_place = bool(getattr(args, "in_place", False))
    if in_place:
        if out is not None:
            raise UsageError("--in-place and --out exclude each other.")
        if bundle_ref is None or not Path(bundle_ref).is_dir():
            raise UsageError("--in-place needs a local bundle folder; use --out for a Hub bundle.")
        out = Path(bundle_ref)
    if out is None:
        raise UsageError("--out is required (or --in-place for a local bundle).")
    return OutputOptions(
        out=out,
        overwrite=args.overwrite,
        in_place=in_place,
        push=args.push,
        private=args.private,
        commit_message=args.commit_message,
    )


def _compression(args: argparse.Namespace) -> Any:
    """The compression settings of the options (`CompressionSettings`, checked without importing torch): for
    `convert`, over the default plan (`CONVERT_DEFAULT`); for `add --refit`, the options given, which the refit lays
    over the bundle's own settings."""
    from .settings import OPTION_NAMES, option_spelling, settings_module

    settings = settings_module()
    base = settings.CONVERT_DEFAULT if args.command == "convert" else settings.CompressionSettings()
    # {setting: the option's value}; None, or a flag that is off, is an option not given (0 is a value).
    values = {setting: getattr(args, option[2:].replace("-", "_")) for setting, option in OPTION_NAMES.items()}
    given = {setting: None if value is False else value for setting, value in values.items()}
    try:
        return base.with_options(**given)
    except settings.CompressionSettingsError as err:
        raise UsageError(err.render(option_spelling)) from None


def _verify(args: argparse.Namespace) -> Any:
    from .pipeline import VerifyOptions

    return VerifyOptions(
        max_error=args.max_error,
        max_logit_error=args.max_logit_error,
        base_model=args.base_model,
        base_check=not args.no_base_check,
        check_adapters=args.check_adapters,
        device=args.device,
    )


def _run(args: argparse.Namespace, log: Callable[[str], None]) -> Any:
    from . import pipeline

    progress = not args.quiet
    if args.command == "convert":
        if not args.sources and not args.from_hub:
            raise UsageError("give at least one SOURCE (or --from-hub ORG/GLOB).")
        return pipeline.convert(
            args.sources,
            _outputs(args),
            from_hub=args.from_hub,
            compression=_compression(args),
            verify=_verify(args),
            revision=args.revision,
            select_base=args.select_base,
            skip_invalid=args.skip_invalid,
            progress=progress,
            log=log,
        )
    if args.command == "inspect":
        return pipeline.inspect(args.bundle, revision=args.revision, progress=progress)
    if args.command == "export":
        return pipeline.export(
            args.bundle,
            args.adapter,
            args.out,
            all_adapters=args.all,
            overwrite=args.overwrite,
            revision=args.revision,
            progress=progress,
            log=log,
        )
    if args.command == "add":
        refit_only = ("rank", "sigma", "clusters", "target_error", "method", "max_iter", "tol", "dtype", "budget")
        given = [f"--{name.replace('_', '-')}" for name in refit_only if getattr(args, name) is not None]
        if given and not args.refit:
            raise UsageError(f"{', '.join(given)} only apply with --refit (projection keeps the bundle's bases).")
        return pipeline.add(
            args.bundle,
            args.sources,
            _outputs(args, args.bundle),
            refit=args.refit,
            compression=_compression(args),
            verify=_verify(args),
            revision=args.revision,
            progress=progress,
            log=log,
        )
    if args.command == "remove":
        return pipeline.remove(args.bundle, args.names, _outputs(args, args.bundle), progress=progress, log=log)
    if args.command == "push":
        return pipeline.push(
            args.folder, args.repo_id, private=args.private, commit_message=args.commit_message, log=log
        )
    if args.command == "train":
        from .train import options_from_args, train

        options = options_from_args(args)
        output = _outputs(args, args.bundle)
        return train(
            args.bundle, args.name, args.data, output, options, revision=args.revision, progress=progress, log=log
        )
    raise UsageError(f"unknown command {args.command!r}")


def _one_line(err: BaseException) -> str:
    if isinstance(err, _settings_error()):
        from .settings import option_spelling

        text = err.render(option_spelling)
    else:
        text = str(err).strip() or type(err).__name__
    return " ".join(text.split())


def _settings_error() -> type[Exception]:
    from .settings import settings_module

    return settings_module().CompressionSettingsError


def _known_error_code(err: BaseException) -> Optional[ExitCode]:
    """Exit code for errors that are about the user's inputs or environment, raised below our own code."""
    from peft_jdlora.config import BundleFormatError

    if isinstance(err, BundleFormatError):
        return ExitCode.INPUT
    if isinstance(err, _settings_error()):  # settings only the collection could refuse, e.g. a budget below its floor
        return ExitCode.USAGE
    if isinstance(err, FileExistsError):
        return ExitCode.OUTPUT_EXISTS
    if isinstance(err, (FileNotFoundError, NotADirectoryError, PermissionError)):
        return ExitCode.INPUT
    return None


def _execute(parser: argparse.ArgumentParser, argv: Optional[list[str]], command: Optional[str] = None) -> int:
    args = parser.parse_args(argv)
    if command is not None:
        args.command = command
    _setup_environment(args)
    prog = parser.prog

    def log(message: str) -> None:
        if not args.quiet:
            print(printable(message), file=sys.stderr, flush=True)

    def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
        if not args.quiet:
            print(f"warning: {printable(' '.join(str(message).split()))}", file=sys.stderr)

    # SIGTERM / SIGHUP unwind like Ctrl-C, so a temporary output folder is removed and a new Hub repo deleted.
    with warnings.catch_warnings(), termination_raises():
        warnings.showwarning = show_warning
        # Deprecation notices of the libraries underneath are for their developers, not for users of the CLI.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            result = _run(args, log)
        except KeyboardInterrupt:
            print(f"{prog}: interrupted.", file=sys.stderr)
            return 130
        except Terminated as err:
            print(f"{prog}: {err}.", file=sys.stderr)
            return 128 + err.signum
        except JDLoraHubError as err:
            return _fail(prog, args, _one_line(err), err.exit_code)
        except Exception as err:
            code = _known_error_code(err)
            if code is not None:
                return _fail(prog, args, _one_line(err), code)
            if os.environ.get("JDLORA_DEBUG"):
                traceback.print_exc()
            message = f"internal error: {type(err).__name__}: {_one_line(err)} (set JDLORA_DEBUG=1 for the traceback)"
            return _fail(prog, args, message, ExitCode.INTERNAL)
    if args.json:
        print(json_printable(json.dumps(result.to_dict(), indent=2, default=str, ensure_ascii=False)))
    else:
        print(_format_result(result))
    return int(ExitCode.OK)


def _fail(prog: str, args: argparse.Namespace, message: str, code: ExitCode) -> int:
    print(f"{prog}: error: {printable(message)}", file=sys.stderr)
    if getattr(args, "json", False):
        print(json_printable(json.dumps({"error": message, "exit_code": int(code)}, ensure_ascii=False)))
    return int(code)


def printable(text: str) -> str:
    """`text` with every character a terminal could act on (ESC and the other control characters, bidi overrides,
    line breaks) written as a Python escape: names and messages come from folders, configs and the Hub, and must not
    recolour, move or rewrite the user's terminal."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def json_printable(text: str) -> str:
    """JSON text with the non-printable characters inside its strings written as \\u escapes (the same JSON value;
    `json.dumps` leaves C1 controls and bidi overrides raw). Line breaks between values stay."""

    def escape(c: str) -> str:
        if c == "\n" or c.isprintable():
            return c
        data = c.encode("utf-16-be", "surrogatepass")
        return "".join(f"\\u{int.from_bytes(data[i : i + 2], 'big'):04x}" for i in range(0, len(data), 2))

    return "".join(escape(c) for c in text)


# ---------------------------------------------------------------------------------------------------- text output


# A fixed-rank bundle suggests a budget plan when per-adapter SVD has below this share of its error, in at most its
# bytes, or in at most SVD_HINT_BYTES times its bytes at the next rank (which a plan can mix with cheaper modules).
SVD_HINT_ERROR = 0.9
SVD_HINT_BYTES = 1.25


def budget_hint(summary: dict[str, Any]) -> Optional[str]:
    """The line that tells a user of the fixed default that these adapters share little, or None."""
    from .card import format_error

    baseline, error, floats = summary.get("svd_baseline") or {}, summary.get("mean_error"), summary.get("params_bundle")
    if not error or not floats:
        return None
    for key, max_bytes in (("same_floats", 1.0), ("next_rank", SVD_HINT_BYTES)):
        point = baseline.get(key)
        if point and point["mean_error"] < SVD_HINT_ERROR * error and point["floats"] <= max_bytes * floats:
            return (
                f"per-adapter SVD (rank {point['rank']}) has mean error {format_error(point['mean_error'])} in "
                f"{point['floats'] / floats:.2f}x these bytes: the adapters share little; "
                f"--budget {summary['compression_ratio']:.1f}x chooses per module"
            )
    return None


def _format_result(result: Any) -> str:
    from .card import describe_plan_summary, format_error

    lines: list[str] = []
    s = result.summary
    if result.command in ("convert", "add", "remove", "inspect", "push", "train") and s:
        if result.command == "inspect":
            where = result.extra.get("bundle", {})
            ref = where.get("source", "")
            if where.get("revision"):
                ref += f"@{where['revision']}"
            lines.append(f"bundle:        {ref}")
        else:
            lines.append(f"bundle:        {result.out}")
        lines.append(f"base model:    {s.get('base_model')}")
        lines.append(
            f"adapters:      {s.get('num_adapters')} | rank {s.get('rank')} | Σ {s.get('sigma_type')} | "
            f"{s.get('num_clusters')} cluster(s) | method {s.get('method') or 'n/a'}"
        )
        if s.get("params_bundle"):
            lines.append(
                f"parameters:    {s['params_bundle']:,} (originals {s.get('params_original') or 0:,}, "
                f"ratio {s.get('compression_ratio') or 0:.2f}x)"
            )
        if s.get("mean_error") is not None:
            lines.append(
                f"error:         mean {format_error(s['mean_error'])}, worst {s.get('worst_adapter')} "
                f"({format_error(s.get('worst_error'))})"
            )
        plan = describe_plan_summary(s.get("budget_plan"))
        if plan:
            lines.append(f"plan:          {plan}")
        hint = budget_hint(s) if result.command == "convert" else None
        if hint:
            lines.append(f"hint:          {hint}")
        check = (result.extra.get("verification") or s.get("verification") or {}).get("base_model_check")
        if check:
            if check.get("status") == "ok":
                lines.append(
                    f"logits check:  on {check['base_model']}: max effect error "
                    f"{format_error(check['max_effect_error'])} over {len(check['adapters'])} adapters"
                )
            else:
                lines.append(f"logits check:  {check.get('status')} ({check.get('reason')})")
    if result.command == "inspect":
        lines.append("")
        header = f"{'#':>4}  {'name':<28} {'cluster':>7}  {'error':>9}  {'revision':<10}  source"
        lines.append(header)
        for r in result.adapters:
            revision = (r["revision"] or "local")[:10]
            lines.append(
                f"{r['index']:>4}  {r['name']:<28} {r['cluster']:>7}  {format_error(r['mean_error']):>9}  "
                f"{revision:<10}  {r['source'] or 'n/a'}"
            )
    if result.command == "inspect" and result.extra.get("plan"):
        # Per module of a budget plan: the choice, its floats and error, and the uniform baselines' best error within
        # the same floats (≤: an upper bound).
        lines.append("")
        lines.append(
            f"{'module':<40} {'kind':>5} {'rank':>4} {'Σ':>4} {'floats':>10} {'error':>9}  "
            f"{'per-adapter SVD':<16} one shared basis"
        )
        for row in result.extra["plan"]:
            lines.append(
                f"{row['module']:<40} {row['kind']:>5} {row['rank']:>4} {row['sigma_type']:>4} {row['floats']:>10,} "
                f"{format_error(row['error']):>9}  {row['svd_same_floats']:<16} {row['jd1_same_floats']}"
            )
    if result.command == "export":
        for r in result.adapters:
            lines.append(f"exported {r['name']} -> {r['folder']}")
    if result.command == "add":
        lines.append(
            f"added:         {', '.join(result.extra.get('added', []))}"
            + (" (refit)" if result.extra.get("refit") else " (projection)")
        )
    if result.command == "remove":
        lines.append(f"removed:       {', '.join(result.extra.get('removed', []))}")
    if result.command == "train":
        from .train import format_lines

        lines += format_lines(result)
    for skipped in result.skipped:
        lines.append(f"skipped:       {skipped['source']}: {skipped['reason']}")
    if result.push:
        note = "" if result.push.get("changed", True) else " (no change: the repo already holds these files)"
        lines.append(f"pushed:        {result.push['repo_id']} @ {result.push['commit']} ({result.push['url']}){note}")
    # Per line: a line break inside a value (an adapter name, a source) is escaped like any control character.
    return "\n".join(printable(line) for line in lines)


# ---------------------------------------------------------------------------------------------------- entry points


def main(argv: Optional[list[str]] = None) -> int:
    """`jdlora COMMAND ...`"""
    return _execute(build_parser(), argv)


def convert_main(argv: Optional[list[str]] = None) -> int:
    """`jdlora-convert SOURCES... --out DIR ...` (the same as `jdlora convert`)."""
    return _execute(build_convert_parser(), argv, command="convert")


if __name__ == "__main__":
    raise SystemExit(main())
