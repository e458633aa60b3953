"""The compression API used by the CLI and the tuner: compress, project, remove, evaluate."""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal, Optional, Union

import torch

from ..bundle import Bundle, ModuleFactors
from ..config import JDLoraConfig
from ..report import BundleReport, OverallFidelity
from .cluster import compact
from .cost import stored_floats
from .engine import (
    Engine,
    EngineResult,
    FactorSource,
    LoraFactorSource,
    Placement,
    canonical_batches,
    dist_info,
)
from .metrics import (
    adapter_reports,
    compression_report,
    dtype_bytes,
    dtype_name,
    least_squares_sigma,
    own_basis_cores,
    sigma_for_storage,
    stored_errors,
)
from .settings import (
    DEFAULT_CLUSTER_COUNTS,
    DEFAULT_CLUSTER_SAMPLE,
    DEFAULT_MAX_BATCH_BYTES,
    CompressionSettings,
    CompressionSettingsError,
)
from .sources import AdapterReadError, LoraAdapter, as_adapters
from .svd import svd_baseline, truncated_svd

AdapterLike = Union[LoraAdapter, str, os.PathLike]


def _resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def compress(
    adapters: Union[Sequence[AdapterLike], FactorSource],
    settings: Optional[CompressionSettings] = None,
    *,
    rank: Optional[int] = None,
    sigma: Optional[Literal["full", "diag"]] = None,
    clusters: Union[int, Literal["auto"], None] = None,
    target_error: Optional[float] = None,
    method: Optional[Literal["jd", "svd"]] = None,
    max_iter: int = 100,
    tol: float = 1e-3,
    device: Union[str, torch.device, None] = None,
    dtype: Union[torch.dtype, str, None] = None,
    seed: int = 0,
    progress: bool = True,
    stall_tol: float = 1e-5,
    compute_dtype: Union[torch.dtype, str, None] = None,
    max_clusters: Optional[int] = None,
    max_cluster_iter: int = 20,
    check_base_model: bool = True,
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    budget: Union[int, float, str, None] = None,
    target_error_every: bool = False,
    cluster_counts: Sequence[int] = DEFAULT_CLUSTER_COUNTS,
    cluster_sample: int = DEFAULT_CLUSTER_SAMPLE,
) -> Optional[Bundle]:
    """Compress a collection of LoRA adapters into a JD-LoRA bundle ("Compress then Serve"; docs/algorithms.md).

    Args:
        adapters: `LoraAdapter` objects and/or PEFT LoRA folders (read lazily), or a `FactorSource`.
        settings: all settings as one `CompressionSettings` (as the jdlora tools pass them), instead of the keyword
            arguments below.
        progress: tqdm progress bars (rank 0 only).

    The other keyword arguments are the fields of `CompressionSettings`, where each is described:

    - a fixed shape: `rank` (default 16; capped per module where more cannot help, see `cost.target_rank`), `sigma`
      ("full" or "diag"), `clusters` (a number, or "auto" with `target_error`), `method` ("jd", or "svd": per-adapter
      SVD in the same format);
    - or a budget plan: `budget` (bytes, "4MB", a ratio "16x", "r16": the size `rank=16` gives; or "auto" with
      `target_error`, `target_error_every`), `cluster_counts`, `cluster_sample`; the representation (shared bases,
      clusters or per-adapter SVD), rank and clusters are chosen per module to minimise the mean error, never above
      the better of per-adapter SVD and one shared basis within the same budget (see `budget.py`);
    - the fit: `max_iter`, `tol`, `stall_tol`, `max_clusters`, `max_cluster_iter`, `seed`; where it runs: `device`,
      `dtype` (storage), `compute_dtype`, `max_batch_bytes`; and `check_base_model`.

    Returns:
        The bundle, with `bundle.report` (fidelity, sizes, timings; for `method="jd"` in one process, also
        "svd_baseline": the exact error of a per-adapter SVD around the same size, see `svd.svd_baseline`) and
        `config.adapter_sources` filled. Under `torch.distributed` the modules are split over the processes and the
        bundle is returned on rank 0 only (None on the other ranks).

    Raises:
        CompressionSettingsError: (a `ValueError`) settings out of range or that do not go together, named; checked
            before any adapter is read.
        AdapterReadError: adapters that cannot be read or cannot share a bundle.
    """
    options = CompressionSettings(
        rank=rank,
        sigma=sigma,
        clusters=clusters,
        target_error=target_error,
        method=method,
        budget=budget,
        target_error_every=target_error_every,
        cluster_counts=cluster_counts,
        cluster_sample=cluster_sample,
        max_iter=max_iter,
        tol=tol,
        stall_tol=stall_tol,
        max_clusters=max_clusters,
        max_cluster_iter=max_cluster_iter,
        seed=seed,
        device=device,
        dtype=dtype,
        compute_dtype=compute_dtype,
        max_batch_bytes=max_batch_bytes,
        check_base_model=check_base_model,
    )
    if settings is None:
        settings = options
    elif options.options_given:
        given = ", ".join(f"«{name}»" for name in sorted(options.options_given))
        raise CompressionSettingsError(f"give the settings as `settings` or as keyword arguments ({given}), not both.")
    source = _factor_source(adapters, settings.check_base_model)
    placement = Placement.of(settings, source)
    if settings.is_plan:
        return _compress_budget(source, settings, placement, progress)
    engine = Engine(source, settings, placement, progress=progress)
    result = engine.run()
    if result.modules is None:  # a process other than rank 0 under torch.distributed
        return None
    modules = {m: ModuleFactors(res.U, res.V, res.sigma) for m, res in result.modules.items()}
    baseline = None
    if settings.method == "jd" and engine.world == 1:
        # Whether the same bytes as per-adapter SVD would do better (unrelated adapters): the hint to use a budget.
        batches = canonical_batches(
            source, placement.device, placement.compute_dtype, max_batch_bytes=settings.max_batch_bytes
        )
        baseline = svd_baseline(source, stored_floats(modules.values()), batches)
    return _build_bundle(source, result, modules, settings, placement, engine.world, baseline)


def _compress_budget(
    source: FactorSource, settings: CompressionSettings, placement: Placement, progress: bool
) -> Optional[Bundle]:
    """`compress(..., budget=...)`: a budget plan (see `budget.compress_with_budget`)."""
    from .budget import compress_with_budget

    return compress_with_budget(source, settings, placement, progress=progress)


def _factor_source(adapters: Union[Sequence[AdapterLike], FactorSource], check_base_model: bool) -> FactorSource:
    if isinstance(adapters, FactorSource):
        return adapters
    return LoraFactorSource(as_adapters(adapters), check_base_model)


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _build_bundle(
    source: FactorSource,
    result: EngineResult,
    modules: dict[str, ModuleFactors],
    settings: CompressionSettings,
    placement: Placement,
    world_size: int,
    baseline: Optional[dict[str, Any]],
) -> Bundle:
    """The bundle of a fixed-shape run: its config (the most common rank as `r`, the others in `rank_pattern`) and
    its report."""
    method, sigma_type = settings.method, settings.sigma
    names = list(source.names)
    ranks = {m: f.U.shape[-1] for m, f in modules.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    config = JDLoraConfig(
        target_modules=list(modules),
        r=r,
        rank_pattern={m: k for m, k in ranks.items() if k != r},
        sigma_type=sigma_type,
        num_clusters=result.num_clusters,
        adapter_names=names,
        adapter_clusters=list(result.assignment),
        adapter_sources=_json_safe(list(source.sources)) if source.sources else [],
        base_model_name_or_path=source.base_model,
        task_type=source.task_type,
        fan_in_fan_out=source.fan_in_fan_out,
        inference_mode=True,
    )
    errors: dict[str, dict[str, float]] = {name: {} for name in names}
    for module, res in result.modules.items():
        for i, e in enumerate(res.errors.tolist()):
            if e == e:  # not NaN: the adapter has the module
                errors[names[i]][module] = e
    full_iters = [res.stats.get("jd_full", 0) for res in result.modules.values()]
    iterations: dict[str, Any] = {"cluster_passes": result.cluster_passes}
    if method == "jd":
        iterations["jd_full"] = {
            "max": max(full_iters, default=0),
            "mean": sum(full_iters) / max(len(full_iters), 1),
            "not_converged": sum(not res.stats.get("converged", True) for res in result.modules.values()),
            "stalled": sum(bool(res.stats.get("stalled", False)) for res in result.modules.values()),
        }
    if method == "jd" and sigma_type == "diag":
        diag_iters = [res.stats.get("jd_diag", 0) for res in result.modules.values()]
        iterations["jd_diag"] = {"max": max(diag_iters, default=0), "mean": sum(diag_iters) / max(len(diag_iters), 1)}
    report = compression_report(
        source,
        modules,
        errors,
        result.assignment,
        settings,
        placement,
        method="svd" if method == "svd" else f"jd-{sigma_type}",
        rank=settings.rank,
        sigma_type=sigma_type,
        num_clusters=result.num_clusters,
        seconds=result.seconds,
        world_size=world_size,
        clusters_requested=settings.clusters,
        iterations=iterations,
        cluster_search=result.cluster_search,
        svd_baseline=baseline,
    )
    return Bundle(config=config, modules=modules, report=report)


# ------------------------------------------------------------------------------------------------ shared helpers


def _check_against_bundle(bundle: Bundle, adapters: Sequence[LoraAdapter], check_base_model: bool = True) -> None:
    """The adapters' modules exist in the bundle with the same shapes, and they were made for its base model."""
    config = bundle.config
    for adapter in adapters:
        if check_base_model and adapter.base_model and config.base_model_name_or_path:
            if adapter.base_model != config.base_model_name_or_path:
                raise AdapterReadError(
                    f"adapter {adapter.name!r} was trained on {adapter.base_model!r}, the bundle serves "
                    f"{config.base_model_name_or_path!r} (pass check_base_model=False if they are the same weights)."
                )
        if adapter.fan_in_fan_out != config.fan_in_fan_out:
            raise AdapterReadError(
                f"adapter {adapter.name!r} has fan_in_fan_out={adapter.fan_in_fan_out}, the bundle "
                f"{config.fan_in_fan_out}: they were made for different layer types."
            )
        for module, (d_out, d_in, _) in adapter.shapes().items():
            if module not in bundle.modules:
                raise AdapterReadError(
                    f"adapter {adapter.name!r} has module {module!r}, which the bundle lacks: it cannot be added "
                    "without a refit (compress the collection again)."
                )
            if bundle.modules[module].shape != (d_out, d_in):
                raise AdapterReadError(
                    f"module {module!r} is {d_out}x{d_in} in adapter {adapter.name!r} but "
                    f"{bundle.modules[module].shape[0]}x{bundle.modules[module].shape[1]} in the bundle."
                )


def is_svd_bundle(bundle: Bundle) -> bool:
    """True for a per-adapter SVD bundle (a singleton cluster per adapter), where a new adapter gets its own cluster."""
    if bundle.report is not None and bundle.report.method is not None:
        return bundle.report.method == "svd"
    config = bundle.config
    clusters = config.adapter_clusters or [0] * config.num_adapters
    return config.num_adapters > 1 and config.sigma_type == "diag" and sorted(clusters) == list(range(len(clusters)))


def _own_cluster_modules(bundle: Bundle) -> set[str]:
    """Modules stored as per-adapter SVD (a singleton cluster per adapter, diagonal Σ), whole bundle or per module
    (budget plans mix them): a projected adapter gets its own truncated SVD there."""
    config, n = bundle.config, bundle.config.num_adapters
    report = bundle.report
    plan = report.plan if report is not None and report.plan else {}
    out = set()
    for module, f in bundle.modules.items():
        if module in plan:  # a budget plan says what it chose per module
            own = plan[module].get("kind") == "svd"
        elif config.pattern_key(config.cluster_pattern, module) is None and not (report and report.method == "budget"):
            own = is_svd_bundle(bundle)
        else:  # a plan's per-module layout (its most common choice is the default group): read the layout itself
            own = n > 1 and f.sigma.dim() == 2 and sorted(config.clusters_for(module)) == list(range(n))
        if own:
            out.add(module)
    return out


def _bases(factors: ModuleFactors, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """U [C, d_out, r], V [C, d_in, r] (columns) of a module, in the compute dtype."""
    return factors.U.to(device=device, dtype=dtype), factors.V.to(device=device, dtype=dtype).mT


# ------------------------------------------------------------------------------------------------ project


def project(
    bundle: Bundle,
    adapters: Sequence[AdapterLike],
    *,
    progress: bool = True,
    device: Union[str, torch.device, None] = None,
    compute_dtype: Optional[torch.dtype] = None,
    check_base_model: bool = True,
) -> Bundle:
    """Add adapters to a bundle without refitting it: Σ = Uᵀ ΔW V by least squares in the existing bases
    ((UᵀU)⁻¹ Uᵀ ΔW V (VᵀV)⁻¹, or the G⁻¹ solve for a diagonal core), in the cluster whose bases reconstruct the adapter
    best, summed over the modules that share one cluster assignment (all modules, unless the bundle has a per-module
    `cluster_pattern`). Where the bundle stores per-adapter SVD (a singleton cluster per adapter), each new adapter
    gets its own truncated-SVD cluster.

    The new adapters' modules must be modules of the bundle; modules they lack get Σ = 0. Returns a new bundle with
    the report updated (the new adapters are listed under "projected").
    """
    new = as_adapters(adapters)
    if not new:
        return bundle
    config = bundle.config
    source = LoraFactorSource(new, check_base_model=check_base_model)
    for name in source.names:
        if name in config.adapter_names:
            raise AdapterReadError(f"the bundle already has an adapter named {name!r}; remove it first or rename.")
    _check_against_bundle(bundle, new, check_base_model)
    device = _resolve_device(device)
    storage = next(iter(bundle.modules.values())).sigma.dtype
    compute = compute_dtype or (torch.float64 if storage == torch.float64 else torch.float32)
    n_new, n_old = len(new), config.num_adapters
    own = _own_cluster_modules(bundle)

    # Per module: candidate cores for every cluster ([C, N_new, ...]) and their errors ([C, N_new]); for own-cluster
    # modules a single candidate (each adapter's own basis) and the new bases.
    candidates: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    new_bases: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for modules, batch in canonical_batches(source, device, compute, progress, "project"):
        for j, module in enumerate(modules):
            f = bundle.modules[module]
            sub = batch.modules(torch.tensor([j], device=device))
            r, diag = f.U.shape[-1], f.sigma.dim() == 2
            if module in own:
                U, V, _ = truncated_svd(sub, r)  # [1, N_new, d_out, r'], r' = min(r, R)
                U = torch.nn.functional.pad(U, (0, r - U.shape[-1]))[0].to(storage)  # [N_new, d_out, r]
                V = torch.nn.functional.pad(V, (0, r - V.shape[-1]))[0].to(storage)  # [N_new, d_in, r]
                new_bases[module] = (U.cpu(), V.mT.contiguous().cpu())
                # Each new adapter in its own basis (as stored): a diagonal least-squares core.
                sigma, err = own_basis_cores(sub, U.to(compute).unsqueeze(0), V.to(compute).unsqueeze(0), storage)
                candidates[module] = (sigma.cpu(), err.double().cpu())  # [1, N_new, r], [1, N_new]
                continue
            U_all, V_all = _bases(f, compute, device)
            sigmas, errs = [], []
            for c in range(U_all.shape[0]):
                sigma, T, gram_u, gram_v = least_squares_sigma(sub, U_all[c : c + 1], V_all[c : c + 1], diag)
                stored = sigma_for_storage(sigma, sub.norm, storage)
                err = stored_errors(sub, stored, T, gram_u, gram_v)
                sigmas.append(stored[0].cpu())
                errs.append(err[0].double().cpu())
            candidates[module] = (torch.stack(sigmas), torch.stack(errs))
    present = {m: torch.tensor([m in a.modules for a in new], dtype=torch.bool) for m in candidates}

    # One choice per group of modules sharing an assignment: the cluster with the least error summed over them.
    def group_of(module: str) -> tuple:
        return ("own",) if module in own else tuple(config.clusters_for(module))

    totals: dict[tuple, torch.Tensor] = {}
    for module, (_, err) in candidates.items():
        if module in own:
            continue
        total = totals.setdefault(group_of(module), torch.zeros(n_new, err.shape[0], dtype=torch.float64))
        total += torch.where(present[module].view(-1, 1), err.T, 0.0)
    picks = {group: total.argmin(dim=1).tolist() for group, total in totals.items()}

    def chosen(module: str) -> list[int]:
        """Cluster id of each new adapter at `module`."""
        if module in own:
            return [bundle.modules[module].U.shape[0] + i for i in range(n_new)]
        return picks.get(group_of(module), [0] * n_new)

    modules_out = {}
    errors: dict[str, dict[str, float]] = {a.name: {} for a in new}
    for module, f in bundle.modules.items():
        r, diag = f.U.shape[-1], f.sigma.dim() == 2
        rows = torch.zeros((n_new, r) if diag else (n_new, r, r), dtype=f.sigma.dtype)
        U, V = f.U, f.V
        if module in candidates:
            sig, err = candidates[module]  # [C or 1, N_new, ...], [C or 1, N_new]
            pick = [0] * n_new if module in own else chosen(module)
            for i, adapter in enumerate(new):
                rows[i] = sig[pick[i], i]
                if present[module][i]:
                    errors[adapter.name][module] = float(err[pick[i], i])
        if module in own:
            d_out, d_in = f.shape
            zeros = (torch.zeros(n_new, d_out, r, dtype=f.U.dtype), torch.zeros(n_new, r, d_in, dtype=f.V.dtype))
            U_new, V_new = new_bases.get(module, zeros)
            U, V = torch.cat([U, U_new]), torch.cat([V, V_new])
        modules_out[module] = ModuleFactors(U, V, torch.cat([f.sigma, rows]))

    # The config: the default assignment and every cluster_pattern entry grow by the new adapters' clusters.
    default_modules = [m for m in bundle.modules if config.pattern_key(config.cluster_pattern, m) is None]
    default_clusters = list(config.adapter_clusters or [0] * n_old)
    num_clusters = config.num_clusters
    if default_modules:
        default_clusters += chosen(default_modules[0])
        num_clusters = max(num_clusters, max(default_clusters) + 1)
    else:
        default_clusters += [0] * n_new
    cluster_pattern = {}
    for key, assignment in config.cluster_pattern.items():
        members = [m for m in bundle.modules if config.pattern_key(config.cluster_pattern, m) == key]
        cluster_pattern[key] = list(assignment) + (chosen(members[0]) if members else [0] * n_new)
    first = chosen(default_modules[0]) if default_modules else chosen(next(iter(bundle.modules)))
    new_config = _replace_config(
        config,
        adapter_names=[*config.adapter_names, *source.names],
        adapter_clusters=default_clusters,
        num_clusters=num_clusters,
        cluster_pattern=cluster_pattern,
        adapter_sources=(list(config.adapter_sources) or [{} for _ in range(n_old)]) + _json_safe(source.sources),
    )
    entries = adapter_reports(errors, {a.name: int(first[i]) for i, a in enumerate(new)})
    for a in new:
        entries[a.name].params, entries[a.name].projected = a.num_params, True
    report = copy.deepcopy(bundle.report) if bundle.report is not None else BundleReport()
    report.add_adapters(entries, num_adapters=new_config.num_adapters, num_clusters=num_clusters)
    report.projected = [*report.projected, *source.names]
    new_bundle = Bundle(config=new_config, modules=modules_out, report=report, extra_files=dict(bundle.extra_files))
    _refresh_size(new_bundle, original_added=sum(a.num_params * dtype_bytes(a.dtype) for a in new))
    return new_bundle


def _replace_config(config: JDLoraConfig, **changes: Any) -> JDLoraConfig:
    data = config.to_dict()
    data.pop("peft_type", None)
    data.update(changes)
    known = set(JDLoraConfig.__dataclass_fields__)
    return JDLoraConfig(**{k: v for k, v in data.items() if k in known})


def _refresh_size(bundle: Bundle, original_added: int = 0, original_removed: int = 0) -> None:
    """The report's sizes after adapters were added or removed (bytes of their source LoRAs)."""
    storage = next(iter(bundle.modules.values())).sigma.dtype
    bundle.report.refresh_size(
        stored_floats(bundle.modules.values()),
        dtype_bytes(storage),
        dtype_name(storage),
        original_added=original_added,
        original_removed=original_removed,
    )


# ------------------------------------------------------------------------------------------------ remove


def _compact(assignment: Sequence[int], keep: Sequence[int]) -> tuple[list[int], list[int]]:
    """(the kept adapters' clusters renumbered 0…C'−1, the old ids of the clusters still used, in new order)."""
    kept = torch.tensor([assignment[i] for i in keep], dtype=torch.int64)
    renumbered, used = compact(kept, max(assignment) + 1)
    return renumbered.tolist(), used


def remove(bundle: Bundle, names: Sequence[str]) -> Bundle:
    """A copy of the bundle without the adapters `names` (clusters left empty are dropped, per module); report
    updated."""
    if isinstance(names, str):
        names = [names]
    config = bundle.config
    missing = [n for n in names if n not in config.adapter_names]
    if missing:
        raise KeyError(f"no adapters named {missing} in this bundle ({config.num_adapters} adapters).")
    drop = set(names)
    keep = [i for i, n in enumerate(config.adapter_names) if n not in drop]
    if not keep:
        raise ValueError("removing every adapter would leave an empty bundle.")
    keep_t = torch.tensor(keep)
    modules = {}
    for module, f in bundle.modules.items():
        _, used = _compact(config.clusters_for(module), keep)
        used_t = torch.tensor(used, dtype=torch.int64)
        modules[module] = ModuleFactors(f.U[used_t].clone(), f.V[used_t].clone(), f.sigma[keep_t].clone())
    adapter_clusters, used_default = _compact(list(config.adapter_clusters or [0] * config.num_adapters), keep)
    cluster_pattern = {key: _compact(list(a), keep)[0] for key, a in config.cluster_pattern.items()}
    default = config.default_adapter
    if default is not None:
        default_name = default if isinstance(default, str) else config.adapter_names[default]
        if default_name in drop:
            warnings.warn(
                f"the default adapter {default_name!r} was removed; rows without an id use the base model.",
                stacklevel=2,
            )
            default = None
        else:
            default = default_name
    sources = [config.adapter_sources[i] for i in keep] if config.adapter_sources else []
    new_config = _replace_config(
        config,
        adapter_names=[config.adapter_names[i] for i in keep],
        adapter_clusters=adapter_clusters,
        num_clusters=len(used_default),
        cluster_pattern=cluster_pattern,
        adapter_sources=sources,
        default_adapter=default,
    )
    if bundle.report is None:
        return Bundle(config=new_config, modules=modules, report=None, extra_files=dict(bundle.extra_files))
    report = copy.deepcopy(bundle.report)
    removed_bytes = 0
    size = report.size
    if size.bytes_original is not None and size.params_original:
        per_param = size.bytes_original / size.params_original
        removed = [report.per_adapter[n] for n in drop if n in report.per_adapter]
        removed_bytes = round(sum(int(entry.params or 0) for entry in removed) * per_param)
    kept_clusters = {config.adapter_names[i]: adapter_clusters[k] for k, i in enumerate(keep)}
    report.drop_adapters(list(names), kept_clusters, num_clusters=len(used_default))
    new_bundle = Bundle(config=new_config, modules=modules, report=report, extra_files=dict(bundle.extra_files))
    _refresh_size(new_bundle, original_removed=removed_bytes)
    return new_bundle


# ------------------------------------------------------------------------------------------------ evaluate


def evaluate(
    bundle: Bundle,
    adapters: Sequence[AdapterLike],
    *,
    progress: bool = False,
    device: Union[str, torch.device, None] = None,
) -> BundleReport:
    """Fidelity of the bundle for these adapters (matched by name): a report with `per_adapter` (mean and max error,
    cluster, {module: error}) and `overall`, the paper's squared relative error per module computed from factors in
    float64. A module the adapter has and the bundle lacks counts as error 1."""
    adapters = as_adapters(adapters)
    config = bundle.config
    slots = [config.resolve_adapter(a.name) for a in adapters]
    device = _resolve_device(device) if device is not None else torch.device("cpu")
    source = LoraFactorSource(adapters, check_base_model=False)
    errors: dict[str, dict[str, float]] = {a.name: {} for a in adapters}
    for modules, batch in canonical_batches(source, device, torch.float64, progress, "evaluate"):
        for j, module in enumerate(modules):
            sub = batch.modules(torch.tensor([j], device=device))
            if module not in bundle.modules:
                for a in adapters:
                    if module in a.modules:
                        errors[a.name][module] = 1.0
                continue
            f = bundle.modules[module]
            clusters = config.clusters_for(module)
            U_all, V_all = _bases(f, torch.float64, device)
            for c in sorted({clusters[s] for s in slots}):
                members = [i for i, s in enumerate(slots) if clusters[s] == c]
                part = sub.adapters(torch.tensor(members, device=device))
                _, T, gram_u, gram_v = least_squares_sigma(part, U_all[c : c + 1], V_all[c : c + 1], f.sigma.dim() == 2)
                stored = f.sigma[[slots[i] for i in members]].unsqueeze(0).to(device)
                err = stored_errors(part, stored, T, gram_u, gram_v)[0]
                for k, i in enumerate(members):
                    if module in adapters[i].modules:
                        errors[adapters[i].name][module] = float(err[k])
    default = config.adapter_clusters or [0] * config.num_adapters
    per_adapter = adapter_reports(errors, {a.name: int(default[s]) for a, s in zip(adapters, slots)})
    return BundleReport(per_adapter=per_adapter, overall=OverallFidelity.of(per_adapter))


__all__ = ["compress", "dist_info", "evaluate", "is_svd_bundle", "project", "remove"]
