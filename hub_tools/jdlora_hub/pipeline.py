"""What the commands do, as Python functions: convert, add, remove, export, inspect, push.

Every function that writes does so through `atomic_output_dir`: the output folder appears complete (bundle, report,
model card, all verified) or not at all, and an existing folder is replaced only with `overwrite=True`. An output that
is, contains or lies inside an input folder is refused; `--in-place` replaces only the bundle's own files
(`output.py`). Pushing happens only after the local bundle was written and verified, and uploads only its files.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from .card import adapter_rows, bundle_card, bundle_summary, export_card, plan_rows
from .errors import OutputExistsError, SourceError, UsageError, VerificationError
from .output import CARD_NAME, CONFIG_NAME, refuse_output_over_inputs, staged_bundle_update
from .push import PushResult, check_push_target, push_bundle
from .redact import is_redacted
from .settings import settings_module
from .signals import held_signals
from .sources import (
    DOWNLOAD_PATTERNS,
    HubClient,
    Resolution,
    ResolvedAdapter,
    file_sha256,
    parse_source,
    resolve_sources,
    weights_file,
)
from .verify import base_model_check, check_errors, check_reload, find_base_model

if TYPE_CHECKING:
    from peft_jdlora.compression.settings import CompressionSettings

Log = Callable[[str], None]
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class VerifyOptions:
    max_error: Optional[float] = None
    max_logit_error: Optional[float] = None
    base_model: Optional[str] = None  # folder or Hub id[@rev]; None: the recorded one, if available locally
    base_check: bool = True
    check_adapters: int = 3
    device: Optional[str] = None


@dataclass
class OutputOptions:
    out: Path
    overwrite: bool = False
    in_place: bool = False  # `out` is the bundle being changed: replace only its bundle files
    push: Optional[str] = None
    private: bool = False
    commit_message: Optional[str] = None


@dataclass
class Result:
    """What a command did, for the text summary and for --json."""

    command: str
    out: Optional[str] = None
    adapters: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    push: Optional[dict[str, Any]] = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = {
            "command": self.command,
            "out": self.out,
            "summary": self.summary,
            "adapters": self.adapters,
            "skipped": self.skipped,
            "push": self.push,
        }
        data.update(self.extra)
        return data


# ---------------------------------------------------------------------------------------------------- helpers


def _check_output(output: OutputOptions) -> None:
    """Refuse an existing output folder up front, before any download or compression."""
    if output.in_place:
        if not output.out.is_dir():
            raise UsageError(f"--in-place needs a local bundle folder; {output.out} is not a folder.")
    elif output.out.exists() and not output.overwrite:
        raise OutputExistsError(f"{output.out} already exists; pass --overwrite to replace it.")
    if output.out.exists() and not output.out.is_dir():
        raise OutputExistsError(f"{output.out} exists and is not a folder; it will not be replaced.")
    if output.push is not None:
        check_push_target(output.push)


def _check_output_location(output: OutputOptions, inputs: Sequence[tuple[str, Optional[Path]]]) -> None:
    """Refuse an `--out` that is, contains or lies inside a folder the command reads (see `output.py`). An in-place
    update replaces only the bundle's own files, so it cannot hit an input."""
    if not output.in_place:
        refuse_output_over_inputs(output.out, inputs)


def _bundle_folder(where: dict[str, Any]) -> list[tuple[str, Optional[Path]]]:
    """The bundle a command reads, as an input, when it is a local folder."""
    return [("the bundle being changed", Path(where["source"]))] if where.get("type") == "local" else []


def _local_base_model(verify: VerifyOptions, recorded: Optional[str]) -> list[tuple[str, Optional[Path]]]:
    """The base model's folder as an input, when it is a local one (the logits check reads it)."""
    name = verify.base_model or recorded
    path = Path(name).expanduser() if name else None
    return [("the base model", path)] if path is not None and path.is_dir() else []


def _spec_folders(specs: Sequence[Any]) -> list[tuple[str, Optional[Path]]]:
    """The local SOURCE folders as inputs (known before anything is resolved or downloaded)."""
    return [(f"the source folder {s.text!r}", Path(s.location)) for s in specs if s.kind == "local"]


def _source_folders(sources: Sequence[ResolvedAdapter]) -> list[tuple[str, Optional[Path]]]:
    """The folders of resolved source adapters (local ones, and the snapshots of Hub ones) as inputs."""
    return [(f"the folder of source adapter {s.name!r}", s.folder) for s in sources]


def _read_adapters(sources: Sequence[ResolvedAdapter], progress: bool) -> list[Any]:
    from tqdm.auto import tqdm

    from peft_jdlora.compression import AdapterReadError, read_lora_adapter

    adapters = []
    for src in tqdm(sources, desc="Reading adapters", unit="adapter", disable=not progress or len(sources) < 2):
        try:
            adapters.append(read_lora_adapter(src.folder, name=src.name, source=dict(src.source)))
        except AdapterReadError as err:
            raise SourceError(f"adapter {src.name!r} ({src.label}): {err}") from None
    return adapters


def _fill_sources(bundle: Any, adapters: Sequence[Any]) -> None:
    """Make sure adapter_sources records each adapter's provenance (source, pinned revision), in bundle order."""
    by_name = {a.name: a.source for a in adapters}
    existing = list(bundle.config.adapter_sources or [])
    if len(existing) != bundle.config.num_adapters:
        existing = [{} for _ in bundle.config.adapter_names]
    filled = []
    for name, entry in zip(bundle.config.adapter_names, existing):
        merged = dict(entry)
        for key, value in by_name.get(name, {}).items():
            merged.setdefault(key, value)
        filled.append(merged)
    bundle.config.adapter_sources = filled


def _write_verified(
    bundle: Any,
    output: OutputOptions,
    verify: VerifyOptions,
    *,
    originals: dict[str, Path],
    recorded_base: Optional[str],
    hub: Callable[[], HubClient],
    log: Log,
    title: Optional[str] = None,
) -> dict[str, Any]:
    """Write the bundle atomically after verifying it; the model card and report are written last, with the
    verification results. Returns the verification record."""
    from peft_jdlora.bundle import REPORT_NAME, atomic_output_dir, write_bundle_files
    from peft_jdlora.config import model_type_of
    from peft_jdlora.report import BundleReport

    bundle.report = bundle.report if bundle.report is not None else BundleReport()
    bundle.extra_files.pop(CARD_NAME, None)
    verification: dict[str, Any] = {"errors_checked": True, "reloaded": False}
    if output.in_place:
        destination = staged_bundle_update(output.out)
    else:
        destination = atomic_output_dir(output.out, overwrite=output.overwrite)
    try:
        with held_signals(start=False) as hold_signals, destination as tmp:
            base = find_base_model(verify.base_model, recorded_base, hub) if verify.base_check and originals else None
            if base is not None and base[0] is not None and bundle.config.base_model_type is None:
                # The model the logits check runs on, found (or downloaded) just now: the cache may not have held it
                # for the files to record its type.
                bundle.config.base_model_type = model_type_of(base[0])
            write_bundle_files(bundle, tmp, with_report=False)  # the report goes last, once, with the verification
            check_reload(bundle, tmp)
            verification["reloaded"] = True
            if base is not None:
                folder, name, reason = base
                if folder is None:
                    verification["base_model_check"] = {"status": "skipped", "reason": reason, "base_model": name}
                    log(f"base model check skipped: {reason}")
                else:
                    log(f"checking logits on the base model {name}")
                    verification["base_model_check"] = base_model_check(
                        tmp,
                        bundle,
                        originals,
                        folder,
                        name,
                        k=verify.check_adapters,
                        device=verify.device or "cpu",
                        max_logit_error=verify.max_logit_error,
                    )
            elif not verify.base_check:
                verification["base_model_check"] = {"status": "skipped", "reason": "--no-base-check"}
            bundle.report.verification = verification
            card = bundle_card(bundle.config, bundle.report, repo_id=output.push, title=title or output.out.name)
            bundle.extra_files[CARD_NAME] = card
            (tmp / REPORT_NAME).write_text(bundle.report.to_json())
            (tmp / CARD_NAME).write_text(card)
            hold_signals()  # from here until the finished files are in place, a signal waits (no half swap)
    except FileExistsError as err:
        raise OutputExistsError(str(err)) from None
    return verification


def _push(output: OutputOptions, log: Log) -> Optional[dict[str, Any]]:
    if output.push is None:
        return None
    log(f"pushing {output.out} to {output.push}")
    result: PushResult = push_bundle(
        output.out, output.push, private=output.private, commit_message=output.commit_message, log=log
    )
    return {
        "repo_id": result.repo_id,
        "commit": result.commit,
        "url": result.url,
        "created": result.created,
        "changed": result.changed,
    }


def _result_rows(bundle: Any) -> list[dict[str, Any]]:
    return adapter_rows(bundle.config, bundle.report)


# ---------------------------------------------------------------------------------------------------- convert


def convert(
    sources: Sequence[str],
    output: OutputOptions,
    *,
    from_hub: Sequence[str] = (),
    compression: Optional[CompressionSettings] = None,
    verify: Optional[VerifyOptions] = None,
    revision: Optional[str] = None,
    select_base: Optional[str] = None,
    skip_invalid: bool = False,
    progress: bool = True,
    log: Log = lambda message: None,
) -> Result:
    """Compress the LoRA adapters named by `sources` (and the Hub ids / globs `from_hub`) into a verified bundle at
    `output.out` (and push it), with `compression` (default: `CompressionSettings()`; the command line's default is
    a budget plan, `CONVERT_DEFAULT`). Settings that do not fit the collection raise `CompressionSettingsError`."""
    compression = compression if compression is not None else settings_module().CompressionSettings()
    verify = verify or VerifyOptions()
    if not sources and not from_hub:
        raise UsageError("no SOURCES given.")
    specs = [parse_source(s, default_revision=revision) for s in sources]
    specs += [parse_source(s, default_revision=revision, hub_only=True) for s in from_hub]
    _check_output(output)
    _check_output_location(output, _spec_folders(specs) + _local_base_model(verify, None))

    client_holder: list[HubClient] = []

    def hub() -> HubClient:
        if not client_holder:
            client_holder.append(HubClient(progress=progress))
        return client_holder[0]

    resolution: Resolution = resolve_sources(
        specs, hub=hub, select_base=select_base, skip_invalid=skip_invalid, log=log
    )
    for s in resolution.skipped:
        log(f"skipped {s.source}: {s.reason}")
    log(f"{len(resolution.adapters)} adapters of base model {resolution.base_model or '(not recorded)'}")
    # Again with the downloaded sources (Hub snapshots) and the recorded base model.
    _check_output_location(
        output, _source_folders(resolution.adapters) + _local_base_model(verify, resolution.base_model)
    )

    from peft_jdlora.compression import AdapterReadError, compress

    sources_kept = list(resolution.adapters)
    if skip_invalid:
        adapters, kept = [], []
        for src in sources_kept:
            try:
                adapters.extend(_read_adapters([src], progress=False))
                kept.append(src)
            except SourceError as err:
                resolution.skipped.append(_skipped(src, str(err)))
                log(f"skipped {src.label}: {err}")
        sources_kept = kept
        if not adapters:
            raise SourceError("every source adapter was skipped (--skip-invalid): nothing to compress.")
    else:
        adapters = _read_adapters(sources_kept, progress)

    try:
        bundle = compress(adapters, compression, progress=progress)
    except AdapterReadError as err:
        raise SourceError(str(err)) from None
    if bundle is None:  # only on ranks > 0 under torch.distributed, which the CLI does not use
        raise UsageError("compression returned no bundle: run jdlora-convert as a single process.")
    _fill_sources(bundle, adapters)
    if resolution.base_model and not bundle.config.base_model_name_or_path:
        bundle.config.base_model_name_or_path = resolution.base_model

    check_errors(bundle, adapters, verify.max_error)
    verification = _write_verified(
        bundle,
        output,
        verify,
        originals={s.name: s.folder for s in sources_kept},
        recorded_base=resolution.base_model,
        hub=hub,
        log=log,
    )
    log(f"wrote {output.out}")
    pushed = _push(output, log)
    return _written_result("convert", output.out, bundle, resolution, pushed, {"verification": verification})


def _written_result(
    command: str, out: Path, bundle: Any, resolution: Any, pushed: Optional[dict[str, Any]], extra: dict[str, Any]
) -> Result:
    """The Result of a command that wrote (and maybe pushed) a bundle: convert and add."""
    return Result(
        command=command,
        out=str(out),
        adapters=_result_rows(bundle),
        skipped=[{"source": s.source, "reason": s.reason} for s in resolution.skipped],
        summary=bundle_summary(bundle.config, bundle.report),
        push=pushed,
        extra=extra,
    )


def _skipped(src: ResolvedAdapter, reason: str) -> Any:
    from .sources import Skipped

    return Skipped(src.label, reason)


# ---------------------------------------------------------------------------------------------------- reading bundles


def locate_bundle(ref: str, *, revision: Optional[str] = None, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """The local folder of a bundle: a folder as it is, a Hub repo id[@revision] downloaded at its commit sha (the
    revision pinned). Returns (folder, where: {"type": "local" or "hub", "source", "revision"})."""
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SourceError(f"{path} is a file; a bundle is a folder holding {CONFIG_NAME} and its weights.")
        return path, {"type": "local", "source": str(path.resolve()), "revision": None}
    spec = parse_source(ref, default_revision=revision)
    if spec.kind != "hub":
        raise SourceError(f"{ref!r} is neither a bundle folder nor a Hub repo id.")
    client = HubClient(progress=progress)
    sha, files = client.resolve(spec.location, spec.revision)
    if CONFIG_NAME not in files:
        raise SourceError(f"Hub repo {spec.location}@{sha[:10]} is not a PEFT adapter: it has no {CONFIG_NAME}.")
    folder = client.download(spec.location, sha, ["*.json", "*.safetensors", "*.md"])
    return Path(folder), {"type": "hub", "source": spec.location, "revision": sha}


def open_bundle(ref: str, *, revision: Optional[str] = None, progress: bool = True) -> tuple[Any, dict[str, Any]]:
    """Load a bundle from a folder or a Hub repo id[@revision] (pinned to its commit sha). Returns (bundle, where)."""
    from peft_jdlora import BundleFormatError, load_bundle

    folder, where = locate_bundle(ref, revision=revision, progress=progress)
    try:
        return load_bundle(folder), where
    except BundleFormatError as err:
        raise SourceError(str(err)) from None


def inspect(ref: str, *, revision: Optional[str] = None, progress: bool = True) -> Result:
    bundle, where = open_bundle(ref, revision=revision, progress=progress)
    summary = bundle_summary(bundle.config, bundle.report)
    summary["modules"] = len(bundle.modules)
    from peft_jdlora.compression.cost import bundle_floats

    summary["parameters"] = bundle_floats(bundle)
    summary["tensor_dtype"] = str(next(iter(bundle.modules.values())).U.dtype).removeprefix("torch.")
    extra = {"bundle": where, "plan": plan_rows(bundle.report)}
    return Result(command="inspect", out=None, adapters=_result_rows(bundle), summary=summary, extra=extra)


# ---------------------------------------------------------------------------------------------------- export


MAX_FOLDER_NAME = 96  # characters of an exported adapter's folder name; file systems allow 255 bytes


def _safe_folder_name(name: str) -> str:
    """A folder name for an adapter name: '/' (from org/name sources) becomes '--', characters no file system takes
    (NUL, other control characters) become '_', and a long name is cut, with a hash of the whole name appended so
    that two long names stay apart. The adapter's own name is kept in the folder's README and the command's output."""
    safe = "".join(c if c.isprintable() else "_" for c in name.replace("/", "--").replace("\\", "--")).strip(". ")
    safe = safe or "adapter"
    if len(safe) > MAX_FOLDER_NAME or len(safe.encode()) > 4 * MAX_FOLDER_NAME:
        digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:12]
        safe = f"{safe[: MAX_FOLDER_NAME - 13]}-{digest}"
    return safe


def _export_slot(config: Any, name: str) -> int:
    """The slot of `--adapter NAME`: an adapter of that name first (names may be digits), else an index."""
    if name in config.adapter_names:
        return config.adapter_names.index(name)
    try:
        slot = config.resolve_adapter(int(name) if name.isdigit() else name)
    except (KeyError, IndexError) as err:
        raise SourceError(str(err.args[0]) if err.args else str(err)) from None
    if slot < 0:
        raise SourceError(f"{name!r} is the base model, not an adapter: nothing to export.")
    return slot


def export(
    ref: str,
    adapters: Sequence[str],
    out: Path,
    *,
    all_adapters: bool = False,
    overwrite: bool = False,
    revision: Optional[str] = None,
    progress: bool = True,
    log: Log = lambda message: None,
) -> Result:
    """Write one adapter (`out` is the LoRA folder) or several / all (`out/<name>/` each) as PEFT LoRA folders."""
    from tqdm.auto import tqdm

    from peft_jdlora.bundle import atomic_output_dir, export_lora

    if bool(adapters) == all_adapters:
        raise UsageError("name the adapters to export with --adapter NAME (repeatable), or pass --all.")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it.")
    bundle, where = open_bundle(ref, revision=revision, progress=progress)
    if where["type"] == "local":
        refuse_output_over_inputs(out, [("the bundle being exported", Path(where["source"]))])
    names = list(bundle.config.adapter_names) if all_adapters else [str(name) for name in adapters]
    resolved: list[str] = []
    for name in names:
        adapter = bundle.config.adapter_names[_export_slot(bundle.config, name)]
        if adapter not in resolved:  # `--adapter a --adapter 0` names one adapter twice
            resolved.append(adapter)
    single = len(names) == 1 and not all_adapters  # one --adapter: --out is the LoRA folder itself
    bundle_ref = where["source"] if where["type"] == "local" else f"{where['source']}@{where['revision'][:10]}"
    written = []
    try:
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            for name in tqdm(resolved, desc="Exporting", unit="adapter", disable=not progress or single):
                target = tmp / "adapter" if single else tmp / _safe_folder_name(name)
                if target.exists():
                    raise UsageError(f"two adapters map to the folder name {target.name!r}.")
                export_lora(bundle, name, target)
                (target / CARD_NAME).write_text(export_card(bundle.config, bundle.report, name, bundle_ref))
                written.append({"name": name, "folder": str(out if single else out / target.name)})
            if single:
                for item in (tmp / "adapter").iterdir():
                    item.replace(tmp / item.name)
                shutil.rmtree(tmp / "adapter")
    except FileExistsError as err:
        raise OutputExistsError(str(err)) from None
    log(f"exported {len(written)} adapter(s) to {out}")
    rows = [r for r in _result_rows(bundle) if r["name"] in resolved]
    for row, item in zip(rows, sorted(written, key=lambda w: resolved.index(w["name"]))):
        row["folder"] = item["folder"]
    return Result(command="export", out=str(out), adapters=rows, extra={"bundle": where})


# ---------------------------------------------------------------------------------------------------- add / remove


def _original_sources(bundle: Any, hub: Callable[[], HubClient]) -> list[ResolvedAdapter]:
    """The bundle's own source adapters, from adapter_sources at their recorded revisions (for --refit)."""
    from .sources import SourceSpec

    out = []
    entries = bundle.config.adapter_sources or []
    if len(entries) != bundle.config.num_adapters:
        raise SourceError("the bundle records no adapter_sources, so its adapters cannot be re-read for --refit.")
    for name, entry in zip(bundle.config.adapter_names, entries):
        where = entry.get("source")
        kind = entry.get("type") or ("local" if where and Path(where).is_dir() else "hub")
        if not where:
            raise SourceError(f"adapter {name!r} has no recorded source, so it cannot be re-read for --refit.")
        if kind == "trained":  # `jdlora train`: Σ trained in this bundle's basis, there is no LoRA behind it
            raise SourceError(
                f"adapter {name!r} was trained in the bundle's basis (`jdlora train`): it has no source LoRA to "
                "re-read for --refit. Export it (`jdlora export --adapter NAME`), remove it (`jdlora remove`), and "
                "pass the exported folder as a SOURCE of the --refit."
            )
        if is_redacted(where):
            raise SourceError(
                f"adapter {name!r} came from a local folder of the machine that built the bundle ({where}: its path "
                "is not published), so it cannot be re-read for --refit; refit from that machine's copy of the bundle."
            )
        if kind == "local":
            folder = Path(where)
            weights = weights_file(folder) if folder.is_dir() else None
            if weights is None:
                raise SourceError(f"source of adapter {name!r} ({where}) is gone: it cannot be re-read for --refit.")
            if entry.get("sha256") and file_sha256(weights) != entry["sha256"]:
                raise SourceError(
                    f"source of adapter {name!r} ({where}) changed since the bundle was built; refusing to --refit "
                    "from different weights (remove and re-add it instead)."
                )
        else:
            if not entry.get("revision"):
                raise SourceError(f"adapter {name!r} ({where}) has no pinned revision; cannot --refit it exactly.")
            folder = hub().download(where, entry["revision"], DOWNLOAD_PATTERNS)
        spec = SourceSpec(where, "local" if kind == "local" else "hub", where, entry.get("revision"), name)
        out.append(
            ResolvedAdapter(name=name, config={}, source=dict(entry), spec=spec, folder=folder, explicit_name=True)
        )
    return out


def add(
    ref: str,
    sources: Sequence[str],
    output: OutputOptions,
    *,
    refit: bool = False,
    compression: Optional[CompressionSettings] = None,
    verify: Optional[VerifyOptions] = None,
    revision: Optional[str] = None,
    progress: bool = True,
    log: Log = lambda message: None,
) -> Result:
    """Add adapters to a bundle by projection into its bases (or, with `refit`, by compressing everything again with
    the bundle's own settings, the options given in `compression` over them: see `CompressionSettings.with_options`)."""
    verify = verify or VerifyOptions()
    if not sources:
        raise UsageError("no SOURCES given.")
    specs = [parse_source(s, default_revision=revision) for s in sources]
    _check_output(output)
    bundle, where = open_bundle(ref, progress=progress)
    base = bundle.config.base_model_name_or_path
    _check_output_location(output, _bundle_folder(where) + _spec_folders(specs) + _local_base_model(verify, base))

    client_holder: list[HubClient] = []

    def hub() -> HubClient:
        if not client_holder:
            client_holder.append(HubClient(progress=progress))
        return client_holder[0]

    resolution = resolve_sources(specs, hub=hub, log=log)
    for s in resolution.skipped:
        log(f"skipped {s.source}: {s.reason}")
    if base and resolution.base_model and resolution.base_model != base:
        raise SourceError(
            f"the new adapters are for base model {resolution.base_model!r}, the bundle for {base!r}: a bundle holds "
            "adapters of one base model."
        )
    clashes = [s.name for s in resolution.adapters if s.name in bundle.config.adapter_names]
    if clashes:
        raise SourceError(
            f"the bundle already holds adapters named {clashes}: remove them first (`jdlora remove`) or give the new "
            "ones other names with NAME=SOURCE."
        )
    _check_output_location(output, _source_folders(resolution.adapters))
    new_adapters = _read_adapters(resolution.adapters, progress)

    from peft_jdlora.compression import AdapterReadError, compress, project

    try:
        if refit:
            old_sources = _original_sources(bundle, hub)
            old_adapters = _read_adapters(old_sources, progress)
            given = compression.given() if compression is not None else {}
            settings = _bundle_settings(bundle).with_options(**given)
            _check_output_location(output, _source_folders(old_sources))
            new_bundle = compress(old_adapters + new_adapters, settings, progress=progress)
            _fill_sources(new_bundle, old_adapters + new_adapters)
            originals = {s.name: s.folder for s in old_sources + resolution.adapters}
        else:
            new_bundle = project(bundle, new_adapters, progress=progress)
            _fill_sources(new_bundle, new_adapters)
            originals = {s.name: s.folder for s in resolution.adapters}
    except AdapterReadError as err:
        raise SourceError(str(err)) from None

    check_errors(new_bundle, new_adapters, verify.max_error)
    verification = _write_verified(
        new_bundle, output, verify, originals=originals, recorded_base=base, hub=hub, log=log
    )
    log(f"wrote {output.out} ({len(new_adapters)} adapters added{' with a refit' if refit else ' by projection'})")
    pushed = _push(output, log)
    extra = {"verification": verification, "added": [a.name for a in new_adapters], "refit": refit, "bundle": where}
    return _written_result("add", output.out, new_bundle, resolution, pushed, extra)


def _bundle_settings(bundle: Any) -> CompressionSettings:
    """Settings that reproduce a bundle's shape (for --refit): the rank asked for (the engine may have capped it per
    module), Σ type, method, and the number of clusters it ended with; for a budget plan, the same budget (or target
    error) and cluster counts, planned again for the new collection."""
    settings = settings_module().CompressionSettings
    report = bundle.report
    method = report.method if report is not None else None
    plan = report.budget if method == "budget" else None
    if plan and plan.get("requested") is not None:
        counts = plan.get("cluster_counts")
        options: dict[str, Any] = {"budget": plan["requested"]}
        if counts is not None:
            options["cluster_counts"] = tuple(counts)
        if plan["requested"] == "auto":
            options.update(target_error=plan["target_error"], target_error_every=plan.get("target") == "every adapter")
        return settings(**options)
    rank = int((report.rank if report is not None else None) or bundle.config.r)
    if method == "svd":  # per-adapter SVD has one basis per adapter and a diagonal core by construction
        return settings(rank=rank, method="svd")
    return settings(
        rank=rank,
        method="jd",
        sigma=bundle.config.sigma_type,
        clusters=bundle.config.num_clusters,
    )


def remove(
    ref: str,
    names: Sequence[str],
    output: OutputOptions,
    *,
    progress: bool = True,
    log: Log = lambda message: None,
) -> Result:
    """Drop adapters from a bundle (the shared bases stay as they are)."""
    if not names:
        raise UsageError("name the adapters to remove.")
    _check_output(output)
    bundle, where = open_bundle(ref, progress=progress)
    _check_output_location(output, _bundle_folder(where))
    missing = [n for n in names if n not in bundle.config.adapter_names]
    if missing:
        raise SourceError(
            f"the bundle holds no adapters named {missing} (it holds {len(bundle.config.adapter_names)}: "
            "see `jdlora inspect`)."
        )
    if len(set(names)) >= bundle.config.num_adapters:
        raise UsageError("cannot remove every adapter of a bundle.")
    from peft_jdlora.compression import remove as remove_adapters

    new_bundle = remove_adapters(bundle, list(names))
    verification = _write_verified(
        new_bundle,
        output,
        VerifyOptions(base_check=False),
        originals={},
        recorded_base=new_bundle.config.base_model_name_or_path,
        hub=lambda: HubClient(progress=progress),
        log=log,
    )
    log(f"wrote {output.out} ({len(names)} adapters removed)")
    pushed = _push(output, log)
    return Result(
        command="remove",
        out=str(output.out),
        adapters=_result_rows(new_bundle),
        summary=bundle_summary(new_bundle.config, new_bundle.report),
        push=pushed,
        extra={"verification": verification, "removed": list(names), "bundle": where},
    )


def push(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    commit_message: Optional[str] = None,
    log: Log = lambda m: None,
) -> Result:
    """Push an existing bundle folder (e.g. after a failed push) as one commit, after checking it loads."""
    from peft_jdlora import BundleFormatError, load_bundle

    check_push_target(repo_id)
    try:
        bundle = load_bundle(folder)
    except BundleFormatError as err:
        raise SourceError(str(err)) from None
    if not (folder / CARD_NAME).is_file():
        raise VerificationError(f"{folder} has no README.md model card: write bundles with jdlora-convert.")
    output = OutputOptions(out=folder, push=repo_id, private=private, commit_message=commit_message)
    pushed = _push(output, log)
    return Result(
        command="push",
        out=str(folder),
        adapters=_result_rows(bundle),
        summary=bundle_summary(bundle.config, bundle.report),
        push=pushed,
    )
