"""The prepared GPU run: one command that proves and measures the kernels and GPU serving, stage by stage.

    bash benchmarks/gpu_check.sh RESULTS_DIR               # on the GPU machine (one H200): about 6 minutes at most
    bash benchmarks/gpu_check.sh RESULTS_DIR --dry-run     # the CPU rehearsal: Triton interpreter, tiny shapes

Stages, each a subprocess with its own time budget and log; a stage that fails or runs out of time does not stop the
others, and the whole run keeps to --time-limit (later stages keep a minimum reserved):

    env      the packages the run will use (the image's own first, wheels carried in .gpu_wheels/ only for what is
             missing or outside pyproject's ranges), GPU name, torch / triton / CUDA versions, a smoke run
    tests    the kernel tests on CUDA (tests/test_kernels*.py with the compiled kernels: CUDA graphs, serving shapes)
    checks   the kernels against float64 on the serving shapes: fp16 / bf16, full / diagonal Σ, 1-8 clusters
    kernels  benchmarks/kernels.py --preset gpu-check: ms per layer against torch.mm, one LoRA, per-adapter LoRA
    serving  benchmarks/serving.py --device cuda --dtype bfloat16 on a random-weight Llama 4096 wide
    tune     the launch knobs one at a time, then the best together (until the time limit)

Writes into RESULTS_DIR (at most 8 files, two folders deep: what a device run can bring back):

    summary.md        markdown for docs/benchmarks.md (§Kernels, §Serving (GPU)), the targets, tests, checks, tuning
    results.json      every number, every stage's command, status, seconds, exit code, and the environment
    logs/<stage>.log  each stage's output

Needs only the standard library (and `packaging`, when present, to compare versions): it starts even where torch
does not import, and says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WHEELS = REPO / ".gpu_wheels"
# Importable modules of the project: their folders, as pyproject's wheel target lists them.
PROJECT_MODULES = {
    "peft_jdlora": REPO / "peft_jdlora",
    "jdlora_kernels": REPO / "kernels" / "torch-ext" / "jdlora_kernels",
    "jdlora_hub": REPO / "hub_tools" / "jdlora_hub",
}
# Beyond pyproject's dependencies, what the stages import: triton (the kernels extra), pytest and accelerate.
EXTRA_REQUIREMENTS = ("triton>=3.2", "pytest>=8", "accelerate>=1.0")
MAX_RESULT_FILES = 8


@dataclasses.dataclass
class Stage:
    name: str
    budget_s: Optional[float]  # None: whatever time is left
    min_s: float  # reserved for it while earlier stages run; below this it is skipped
    what: str


STAGES = (
    Stage("env", 45, 10, "packages, GPU and versions, smoke run"),
    Stage("tests", 100, 40, "kernel tests on the device"),
    Stage("checks", 45, 15, "kernels vs float64 on serving shapes"),
    Stage("kernels", 80, 30, "kernel timings per layer"),
    Stage("serving", 110, 40, "generate / prefill tokens/s, 4096-wide Llama"),
    Stage("tune", None, 15, "launch knobs, one at a time"),
)


# ---------------------------------------------------------------------------------------------- packages


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclasses.dataclass
class CarriedWheel:
    name: str  # canonical
    version: str
    path: Path
    requires: list[str]  # Requires-Dist lines
    compatible: bool  # its tags fit this interpreter


def read_wheels(folder: Path) -> dict[str, CarriedWheel]:
    """The wheels in `folder` by canonical name (one version each: a second one is an error of the folder)."""
    wheels: dict[str, CarriedWheel] = {}
    if not folder.is_dir():
        return wheels
    try:
        from packaging.tags import sys_tags
        from packaging.utils import parse_wheel_filename

        supported = set(sys_tags())
    except ImportError:  # no packaging: trust the folder (it is made for the GPU image's Python)
        parse_wheel_filename, supported = None, None
    for path in sorted(folder.glob("*.whl")):
        if parse_wheel_filename is not None:
            name, version, _, tags = parse_wheel_filename(path.name)
            name, version, compatible = canonical(name), str(version), bool(tags & supported)
        else:
            parts = path.name.split("-")
            name, version, compatible = canonical(parts[0]), parts[1], True
        with zipfile.ZipFile(path) as archive:
            metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            lines = archive.read(metadata).decode("utf-8", "replace").splitlines()
        requires = [line.split(":", 1)[1].strip() for line in lines if line.startswith("Requires-Dist:")]
        if name in wheels:
            raise ValueError(f"{folder} holds two wheels of {name}: {wheels[name].path.name} and {path.name}.")
        wheels[name] = CarriedWheel(name, version, path, requires, compatible)
    return wheels


def installed_versions() -> dict[str, str]:
    """Distributions this interpreter sees (the image's own), by canonical name."""
    versions: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata.get("Name")
        if name:
            versions.setdefault(canonical(name), dist.version)
    return versions


def project_requirements() -> list[str]:
    """pyproject's [project].dependencies plus what the stages import (EXTRA_REQUIREMENTS)."""
    text = (REPO / "pyproject.toml").read_text()
    try:
        import tomllib

        dependencies = tomllib.loads(text)["project"]["dependencies"]
    except ImportError:  # Python 3.10: the array is simple enough to read without a TOML parser
        block = re.search(r"^dependencies\s*=\s*\[(.*?)\]", text, re.S | re.M).group(1)
        dependencies = re.findall(r'"([^"]+)"', block)
    return [*dependencies, *EXTRA_REQUIREMENTS]


@dataclasses.dataclass
class PackagePlan:
    carried: dict[str, CarriedWheel]  # chosen from .gpu_wheels
    image: dict[str, str]  # kept from the image: name -> version
    problems: list[str]  # requirements nothing satisfies
    warnings: list[str]  # image packages whose own requirements a carried version breaks


def plan_packages(
    requirements: Sequence[str],
    installed: dict[str, str],
    wheels: dict[str, CarriedWheel],
    prefer_carried: bool = False,
    installed_requires: Optional[Callable[[str], list[str]]] = None,
) -> PackagePlan:
    """Which packages come from the image and which from the carried wheels.

    The image's version of a requirement is kept when it satisfies every requirement on it met so far; otherwise
    (or always, with `prefer_carried`) a compatible carried wheel that satisfies them is chosen, and its own
    requirements join the walk. Without `packaging`, presence is all that is checked.
    """
    try:
        from packaging.requirements import Requirement
        from packaging.version import Version
    except ImportError:
        Requirement = None
    seen: dict[str, list[Any]] = {}
    plan = PackagePlan(carried={}, image={}, problems=[], warnings=[])
    queue = list(requirements)

    def fits(version: str, reqs: list[Any]) -> bool:
        if Requirement is None:
            return True
        return all(req.specifier.contains(Version(version), prereleases=True) for req in reqs)

    while queue:
        text = queue.pop(0)
        if Requirement is None:
            name, req = canonical(re.split(r"[<>=!~;\[ ]", text, maxsplit=1)[0]), text
        else:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            name = canonical(req.name)
        reqs = seen.setdefault(name, [])
        reqs.append(req)
        if name in plan.carried:
            if not fits(plan.carried[name].version, reqs):
                plan.problems.append(f"{text}: the carried {name} {plan.carried[name].version} does not satisfy it")
            continue
        have = installed.get(name)
        wheel = wheels.get(name)
        usable = wheel is not None and wheel.compatible and fits(wheel.version, reqs)
        if have is not None and fits(have, reqs) and not (prefer_carried and usable):
            plan.image[name] = have
            continue
        if usable:
            plan.image.pop(name, None)
            plan.carried[name] = wheel
            queue.extend(wheel.requires)
            continue
        carried = f"{wheel.path.name}{'' if wheel.compatible else ' (not for this Python)'}" if wheel else "none"
        plan.problems.append(f"{text}: the image has {have or 'nothing'}; carried: {carried}")
    if installed_requires is not None and Requirement is not None:
        for name in plan.image:
            for text in installed_requires(name):
                req = Requirement(text)
                if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                    continue
                dep = canonical(req.name)
                if dep in plan.carried and not fits(plan.carried[dep].version, [req]):
                    plan.warnings.append(f"the image's {name} wants {text}, the run uses {plan.carried[dep].version}")
    return plan


def requires_of_installed(name: str) -> list[str]:
    try:
        return importlib.metadata.requires(name) or []
    except importlib.metadata.PackageNotFoundError:
        return []


def unpack(wheels: Sequence[CarriedWheel], target: Path) -> None:
    """Wheels unpacked into `target` (a folder for PYTHONPATH): what `pip install --target` does for these wheels,
    without needing pip there."""
    target.mkdir(parents=True, exist_ok=True)
    for wheel in wheels:
        with zipfile.ZipFile(wheel.path) as archive:
            archive.extractall(target)


def link_project(target: Path) -> None:
    """The project's modules as installed (peft_jdlora, jdlora_kernels, jdlora_hub), linked from the working tree."""
    target.mkdir(parents=True, exist_ok=True)
    for name, source in PROJECT_MODULES.items():
        link = target / name
        try:
            link.symlink_to(source, target_is_directory=True)
        except OSError:  # a filesystem without symlinks
            shutil.copytree(source, link, ignore=shutil.ignore_patterns("__pycache__"))


# ---------------------------------------------------------------------------------------------- running stages


@dataclasses.dataclass
class StageRun:
    status: str  # ok | failed | timeout | skipped
    seconds: float
    rc: Optional[int]
    timeout_s: Optional[float]
    command: list[str]
    log: str
    note: str = ""


def run_command(command: list[str], env: dict[str, str], timeout: float, log_path: Path) -> tuple[Optional[int], bool]:
    """Run `command` (cwd: the repository) with output to `log_path`; on timeout the whole process group is ended.
    Returns (exit code, timed out)."""
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        proc = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            return proc.wait(timeout=max(1.0, timeout)), False
        except subprocess.TimeoutExpired:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=5)
                    break
                except subprocess.TimeoutExpired:
                    continue
            log.write(f"\n[gpu_check] stopped after {timeout:.0f} s (the stage's time budget)\n")
            return proc.returncode, True


class Run:
    """One gpu_check run: the stage loop, the results folder and the summary."""

    def __init__(self, args: argparse.Namespace, stages: Sequence[Stage] = STAGES) -> None:
        self.args = args
        self.stages = [s for s in stages if not args.stages or s.name in args.stages]
        self.out: Path = args.out
        self.logs = self.out / "logs"
        self.work = Path()  # made by run(), once the results folder is accepted
        self.started = time.time()
        self.deadline = self.started + args.time_limit
        self.python = args.python
        self.env = self.base_env()
        self.results: dict[str, Any] = {
            "schema": 1,
            "dry_run": args.dry_run,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "time_limit_s": args.time_limit,
            "command": [sys.executable, *sys.argv],
            "repository": git_state(),
            "environment": {},
            "stages": {},
        }

    def base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false"
        )
        # The interpreter for the rehearsal; compiled kernels on the GPU (tests/conftest.py defaults it to 1).
        env["TRITON_INTERPRET"] = "1" if self.args.dry_run else "0"
        if self.args.dry_run:
            env.setdefault("OMP_NUM_THREADS", "1")
        return env

    # -------------------------------------------------------------- stage commands

    def stage_json(self, name: str) -> Path:
        return self.work / f"{name}.json"

    def command(self, name: str) -> list[str]:
        py, dry = self.python, self.args.dry_run
        flag = ["--dry-run"] if dry else []
        if name == "env":
            return [py, "benchmarks/gpu_check_stages.py", "probe", "--json", str(self.stage_json(name)), *flag]
        if name == "tests":
            files = ["tests/test_kernels.py", "tests/test_kernels_integration.py", "tests/test_kernels_gpu_compile.py"]
            # The rehearsal runs the GPU-only tests (skipped on the CPU) and a few fast ones, not the 40 s suite.
            select = ["-k", "(gpu or cuda or dense) and not compile"] if dry else []
            junit = ["--junitxml", str(self.work / "tests.xml")]
            # Compiling the kernels' specialisations is most of the time: pytest-xdist (in the GPU image) spreads it.
            workers = ["-n", "6"] if not dry and "pytest-xdist" in installed_versions() else []
            return [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", *workers, *files, *select, *junit]
        if name == "checks":
            return [py, "benchmarks/gpu_check_stages.py", "checks", "--json", str(self.stage_json(name)), *flag]
        if name == "kernels":
            grid = ["--dry-run"] if dry else ["--preset", "gpu-check"]
            return [py, "benchmarks/kernels.py", *grid, "--out", str(self.stage_json(name))]
        if name == "serving":
            if dry:
                shape = ["--device", "cpu", "--dtype", "float32", "--model", "tiny", "--layers", "2", "--batch", "4"]
                shape += ["--prompt-len", "4", "--new-tokens", "2", "--resident", "4,8", "--skip-peft-above", "4"]
                shape += ["--repeats", "1", "--threads", "1"]
            else:
                shape = ["--device", "cuda", "--dtype", "bfloat16", "--model", "llama-4096", "--layers", "8"]
                shape += ["--batch", "64", "--prompt-len", "32", "--new-tokens", "16", "--resident", "64,1000"]
                shape += ["--skip-peft-above", "64", "--repeats", "3", "--threads", "8"]
            return [py, "benchmarks/serving.py", *shape, "--svd-rank", "2", "--out", str(self.stage_json(name))]
        if name == "tune":
            stop = ["--deadline", str(self.deadline - 5)]
            return [py, "benchmarks/gpu_check_stages.py", "tune", "--json", str(self.stage_json(name)), *stop, *flag]
        raise KeyError(name)

    def stage_env(self, name: str) -> dict[str, str]:
        env = dict(self.env)
        if name == "serving" and self.args.dry_run:
            env["PEFT_JDLORA_BACKEND"] = "triton"  # the kernels, as "auto" picks them on a GPU
        return env

    # -------------------------------------------------------------- the loop

    def prepare_output(self) -> None:
        if self.out.exists() and any(self.out.iterdir()):
            if not self.args.overwrite:
                raise SystemExit(
                    f"{self.out} is not empty: give an empty or new folder, or --overwrite to replace a previous "
                    "run's summary.md, results.json and logs/ there."
                )
            unexpected = [p.name for p in self.out.iterdir() if p.name not in ("summary.md", "results.json", "logs")]
            if unexpected:
                raise SystemExit(f"{self.out} holds files that are not a gpu_check result ({unexpected[:5]}): refused.")
            shutil.rmtree(self.logs, ignore_errors=True)
        self.logs.mkdir(parents=True, exist_ok=True)

    def time_for(self, index: int) -> float:
        """Seconds stage `index` may take: its budget, within what is left after the later stages' reserves."""
        stage = self.stages[index]
        budget = None if stage.budget_s is None else stage.budget_s * (2 if self.args.dry_run else 1)  # interpreter
        left = self.deadline - time.time()
        reserve = 0.0
        for later in self.stages[index + 1 :]:  # only for the later stages that can still fit
            if reserve + later.min_s <= left:
                reserve += later.min_s
        return left - reserve if budget is None else min(budget, left - reserve)

    def run(self) -> int:
        self.prepare_output()
        self.work = Path(tempfile.mkdtemp(prefix="jdlora-gpu-check-"))
        try:
            return self.run_stages()
        finally:
            shutil.rmtree(self.work, ignore_errors=True)

    def run_stages(self) -> int:
        link_project(self.work / "src")  # the env stage puts the carried wheels in front of it
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.work / "src"), os.environ.get("PYTHONPATH")]))
        self.write()
        for index, stage in enumerate(self.stages):
            allowed = self.time_for(index)
            log = self.logs / f"{stage.name}.log"
            log.write_text(f"[gpu_check] stage {stage.name}: {stage.what}; time budget {allowed:.0f} s\n")
            start = time.time()
            try:
                if allowed < stage.min_s:
                    result = StageRun("skipped", 0.0, None, None, [], f"logs/{log.name}", "no time left")
                    with open(log, "a") as handle:
                        handle.write("[gpu_check] skipped: no time left\n")
                elif stage.name == "env":
                    result = self.run_env(stage, allowed, log)
                else:
                    result = self.run_stage(stage, allowed, log)
            except Exception as err:  # a bug of this script in one stage must not cost the others
                with open(log, "a") as handle:
                    handle.write(f"[gpu_check] the stage could not run: {err!r}\n")
                note = f"{type(err).__name__}: {err}"
                result = StageRun(
                    "failed", round(time.time() - start, 1), None, round(allowed), [], f"logs/{log.name}", note
                )
            collected = self.collect(stage.name)
            if stage.name == "tests" and collected:
                counts = ", ".join(f"{collected[k]} {k}" for k in ("passed", "failed", "errors", "skipped"))
                result.note = f"{result.note}; {counts}" if result.note else counts
            self.results["stages"][stage.name] = dataclasses.asdict(result) | {"result": collected}
            print(
                f"[gpu_check] {stage.name:8s} {result.status:8s} {result.seconds:6.1f} s"
                + (f" (of {result.timeout_s:.0f})" if result.timeout_s else "")
                + (f"  {result.note}" if result.note else ""),
                flush=True,
            )
            self.write()
        self.results["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.results["wall_s"] = round(time.time() - self.started, 1)
        self.write()
        print(render_summary(self.results))
        return 0 if all(s["status"] == "ok" for s in self.results["stages"].values()) else 1

    def run_stage(self, stage: Stage, allowed: float, log: Path) -> StageRun:
        command = self.command(stage.name)
        start = time.time()
        rc, timed_out = run_command(command, self.stage_env(stage.name), allowed, log)
        status = "timeout" if timed_out else ("ok" if rc == 0 else "failed")
        return StageRun(status, round(time.time() - start, 1), rc, round(allowed), command, f"logs/{log.name}")

    def run_env(self, stage: Stage, allowed: float, log: Path) -> StageRun:
        """Choose the packages, lay out PYTHONPATH, then probe; if the mix fails, probe again with every carried
        wheel (when that is a different set)."""
        start = time.time()
        site, src = self.work / "site", self.work / "src"
        environment = self.results["environment"]
        try:
            wheels = read_wheels(self.args.wheels)
        except (ValueError, OSError, zipfile.BadZipFile) as err:
            wheels = {}
            environment["wheels_error"] = str(err)
        installed = installed_versions()
        requirements = project_requirements()
        attempts = [self.args.prefer_carried] if self.args.prefer_carried else [False, True]
        status, rc, note = "failed", None, ""
        tried: list[set[str]] = []
        for prefer_carried in attempts:
            plan = plan_packages(requirements, installed, wheels, prefer_carried, requires_of_installed)
            if set(plan.carried) in tried:
                break  # the same set again: nothing new to try
            tried.append(set(plan.carried))
            shutil.rmtree(site, ignore_errors=True)
            unpack(list(plan.carried.values()), site)
            paths = [str(site), str(src), *filter(None, [os.environ.get("PYTHONPATH")])]
            self.env["PYTHONPATH"] = os.pathsep.join(paths)
            environment.update(
                packages={
                    **{name: {"version": v, "source": "image"} for name, v in sorted(plan.image.items())},
                    **{
                        name: {"version": w.version, "source": f"carried ({w.path.name})"}
                        for name, w in plan.carried.items()
                    },
                },
                problems=plan.problems,
                warnings=plan.warnings,
                prefer_carried=prefer_carried,
                wheels_folder=str(self.args.wheels),
                wheels_available=sorted(f"{w.name} {w.version}" for w in wheels.values()),
                pythonpath=paths,
            )
            with open(log, "a") as handle:
                handle.write(f"[gpu_check] packages ({'carried first' if prefer_carried else 'image first'}):\n")
                for name, info in environment["packages"].items():
                    handle.write(f"    {name} {info['version']} from {info['source']}\n")
                for line in plan.problems + plan.warnings:
                    handle.write(f"    ! {line}\n")
            rc, timed_out = run_command(self.command("env"), self.env, allowed - (time.time() - start), log)
            if timed_out:
                status, note = "timeout", "probe ran out of time"
                break
            if rc == 0:
                status = "ok"
                note = "carried wheels: " + (", ".join(sorted(plan.carried)) or "none")
                break
            note = "the probe failed with the image's packages" if not prefer_carried else "the probe failed"
        return StageRun(
            status, round(time.time() - start, 1), rc, round(allowed), self.command("env"), f"logs/{log.name}", note
        )

    def collect(self, name: str) -> Any:
        """The stage's own JSON (also what a stage stopped at its time limit left), or the parsed junit report."""
        if name == "tests":
            return parse_junit(self.work / "tests.xml")
        path = self.stage_json(name)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            return {"unreadable": str(err)}

    def write(self) -> None:
        atomic_write(self.out / "results.json", json.dumps(self.results, indent=2, default=str) + "\n")
        atomic_write(self.out / "summary.md", render_summary(self.results))


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def git_state() -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}
    if commit.returncode != 0:
        return {"commit": None}
    return {"commit": commit.stdout.strip(), "modified_files": len(dirty.stdout.splitlines())}


def parse_junit(path: Path) -> Optional[dict[str, Any]]:
    if not path.is_file():
        return None
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures, skipped = [], []
    for suite in suites:
        for case in suite.iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name')}"
            failure = case.find("failure")
            error = case.find("error")
            skip = case.find("skipped")
            if failure is not None or error is not None:
                node = failure if failure is not None else error
                counts["failed" if failure is not None else "errors"] += 1
                failures.append({"test": name, "message": (node.get("message") or "")[:500]})
            elif skip is not None:
                counts["skipped"] += 1
                skipped.append({"test": name, "reason": (skip.get("message") or "")[:200]})
            else:
                counts["passed"] += 1
    return {**counts, "failures": failures, "skipped_tests": skipped}


# ---------------------------------------------------------------------------------------------- summary


def fmt_ratio(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.2f}×"


def kernel_ms(row: dict[str, Any]) -> float:
    return row["ms_graph"] if row.get("ms_graph") is not None else row["ms_eager"]


def kernels_section(result: Optional[dict[str, Any]]) -> list[str]:
    if not result or not result.get("rows"):
        return ["No kernel timings (see logs/kernels.log)."]
    env = result["environment"]
    by_shape: dict[tuple, dict[str, dict]] = {}
    for row in result["rows"]:
        by_shape.setdefault((row["phase"], row["tokens"], row["distinct_adapters"]), {})[row["method"]] = row
    timed = "CUDA-graph replay" if env.get("graphs") else "eager calls"
    lines = [
        f"`benchmarks/kernels.py --preset {env.get('preset')}` on {env['gpu']} (torch {env['torch']}, "
        f"triton {env['triton']}, CUDA {env.get('cuda')}): {env['dtype']}, d_in = d_out = {env['d_in']}, "
        f"r = {env['rank']}, a bundle of "
        f"{env['bundle_adapters']} adapters in {env['clusters']} cluster(s); milliseconds per layer, median of "
        f"{env['iters']} {timed}. Every path was checked against float64 before timing.",
        "",
        "| phase | tokens | distinct | torch.mm | one LoRA | per-adapter LoRA | JD full Σ | JD diag Σ | JD dense "
        "| JD full / one LoRA | JD diag / one LoRA | JD full / torch.mm | JD full / per-adapter "
        "| layer: mm+JD / mm+LoRA | layer: folded / mm+LoRA |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def ms(rows, name):
        return kernel_ms(rows[name]) if name in rows else None

    def ratio(rows, a, b):
        x, y = ms(rows, a), ms(rows, b)
        return x / y if x is not None and y else None

    for (phase, tokens, distinct), rows in by_shape.items():
        cells = [phase, str(tokens), str(distinct)]
        cells += [
            "–" if ms(rows, m) is None else f"{ms(rows, m):.4f}"
            for m in ("mm", "single", "per_adapter", "jd_full", "jd_diag", "jd_dense_full")
        ]
        cells += [
            fmt_ratio(ratio(rows, a, b))
            for a, b in (
                ("jd_full", "single"),
                ("jd_diag", "single"),
                ("jd_full", "mm"),
                ("jd_full", "per_adapter"),
                ("layer_jd_full", "layer_single"),
                ("layer_fold_full", "layer_single"),
            )
        ]
        lines.append("| " + " | ".join(cells) + " |")
    decode = [k for k in by_shape if k[0] == "decode"]
    if decode:
        target = max(decode, key=lambda k: (k[2], k[1]))  # the most distinct adapters in decode
        rows = by_shape[target]
        for sigma in ("full", "diag"):
            value = ratio(rows, f"jd_{sigma}", "single")
            if value is not None:
                verdict = "met" if value <= 1.10 else "NOT met"
                lines.append(
                    f"\nTarget (decode, {target[2]} distinct adapters, T = {target[1]}): JD {sigma} Σ / one-LoRA "
                    f"shrink+expand = {value:.2f}× (target ≤ 1.10×: {verdict}); / torch.mm = "
                    f"{fmt_ratio(ratio(rows, f'jd_{sigma}', 'mm'))}."
                )
    return lines


def serving_section(result: Optional[dict[str, Any]]) -> list[str]:
    if not result or not result.get("rows"):
        return ["No serving numbers (see logs/serving.log)."]
    a = result["args"]
    lines = [
        f"`benchmarks/serving.py --device {result['device']} --dtype {a.get('dtype')} --model {a.get('model')} "
        f"--layers {a['layers']}` on {result['machine']}: a batch of {a['batch']} rows, each its own adapter where the "
        f"resident set allows, prompt {a['prompt_len']} tokens, {a['new_tokens']} greedy new tokens, LoRA r = "
        f"{a['rank']} on q_proj/v_proj (random values), {result['dtype']}; each row timed interleaved with the base "
        f"model (median of {a['repeats']}).",
        "",
        "| method | resident adapters | distinct in batch | generate tok/s | vs base | prefill tok/s | vs base | "
        "adapter memory |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['method']} | {row['resident']} | {row['distinct_in_batch']} | {row['decode_tokens_per_s']:.1f} "
            f"| {row['decode_vs_base']:.3f}× | {row['prefill_tokens_per_s']:.1f} | {row['prefill_vs_base']:.3f}× "
            f"| {row['adapter_bytes'] / 2**20:.2f} MiB |"
        )
    jd = [r for r in result["rows"] if r["method"] == "JD-LoRA adapter_ids"]
    peft = [r for r in result["rows"] if r["method"] == "PEFT adapter_names"]
    if jd:
        top = max(jd, key=lambda r: r["resident"])
        verdict = "met" if top["decode_vs_base"] >= 0.95 else "NOT met"
        lines.append(
            f"\nTarget: {top['resident']} resident adapters, {top['distinct_in_batch']} distinct in the batch: "
            f"generate at {top['decode_vs_base']:.3f}× the base model (target ≥ 0.95×: {verdict})."
        )
        if peft:
            most = max(peft, key=lambda r: r["distinct_in_batch"])
            speedup = top["decode_tokens_per_s"] / most["decode_tokens_per_s"]
            verdict = "met" if speedup >= 10 else "NOT met"
            lines.append(
                f"Against PEFT `adapter_names=` with {most['resident']} adapters ({most['distinct_in_batch']} "
                f"distinct): {speedup:.2f}× its generate tokens/s (target ≥ 10×: {verdict})."
            )
    return lines


def tests_section(result: Optional[dict[str, Any]]) -> list[str]:
    if not result:
        return ["No test report (see logs/tests.log)."]
    lines = [
        f"{result['passed']} passed, {result['failed']} failed, {result['errors']} errors, {result['skipped']} skipped."
    ]
    lines += [
        f"- FAILED `{f['test']}`: {f['message'].splitlines()[0] if f['message'] else ''}" for f in result["failures"]
    ]
    reasons: dict[str, int] = {}
    for skip in result["skipped_tests"]:
        reasons[skip["reason"]] = reasons.get(skip["reason"], 0) + 1
    lines += [f"- skipped ({count}): {reason}" for reason, count in reasons.items()]
    return lines


def checks_section(result: Optional[dict[str, Any]]) -> list[str]:
    if not result or not result.get("rows"):
        return ["No checks (see logs/checks.log)."]
    rows = result["rows"]
    failed = [r for r in rows if not r.get("ok")]
    shapes = result.get("shapes", {})
    limits = ", ".join(f"{k} {v:.0e}" for k, v in result.get("limits", {}).items())
    slack = ", ".join(f"{k} {v}×" for k, v in result.get("torch_error_slack", {}).items())
    lines = [
        f"{len(rows) - len(failed)} of {len(rows)} kernel paths within tolerance of float64 (d = {shapes.get('d_in')}, "
        f"r = {shapes.get('rank')}, {shapes.get('adapters')} adapters; relative error below {limits}, and at most "
        f"{slack} PyTorch's own error in the same dtype, plus 1e-3)."
    ]
    worst: dict[str, float] = {}
    for row in rows:
        if "rel_err" in row:
            worst[row["dtype"]] = max(worst.get(row["dtype"], 0.0), row["rel_err"])
    lines += [f"- largest relative error, {dtype}: {err:.2e}" for dtype, err in sorted(worst.items())]
    for row in failed[:20]:
        where = ", ".join(f"{k} {row[k]}" for k in ("dtype", "sigma", "clusters", "batch", "path") if k in row)
        lines.append(f"- FAILED {where}: {row.get('rel_err', row.get('error'))}")
    return lines


def tune_section(result: Optional[dict[str, Any]]) -> list[str]:
    if not result or not result.get("rows"):
        return ["No tuning numbers (see logs/tune.log)."]
    lines = ["| shape | knob | value | ms | vs default |", "|---|---|---|---:|---:|"]
    default: dict[tuple, float] = {}
    for row in result["rows"]:
        shape = (row["phase"], row["tokens"], row["distinct"])
        if row["knob"] == "default" and row["value"] == "-" and "ms" in row:
            default[shape] = row["ms"]
    # The best value of each knob; the alternative paths each on their own row. Layer-level paths (base GEMM
    # included) compare with the layer of the default kernels, the rest with the default launch.
    best: dict[tuple, dict[str, Any]] = {}
    layer_jd: dict[tuple, float] = {}
    for row in result["rows"]:
        shape = (row["phase"], row["tokens"], row["distinct"])
        if "ms" not in row or row["knob"] == "default":
            continue
        if row["method"] == "layer_jd_full":
            layer_jd[shape] = row["ms"]
        key = (*shape, row["knob"] if row["knob"] != "path" else f"path {row['value']}")
        if key not in best or row["ms"] < best[key]["ms"]:
            best[key] = row
    for (phase, tokens, distinct, knob), row in best.items():
        shape = (phase, tokens, distinct)
        base = layer_jd.get(shape) if row["method"].startswith("layer_") else default.get(shape)
        vs = f"{row['ms'] / base:.2f}×" if base else "–"
        label = f"{phase} T={tokens} A={distinct}"
        lines.append(f"| {label} | {knob} ({row['method']}) | {row['value']} | {row['ms']:.4f} | {vs} |")
    errors = [r for r in result["rows"] if "error" in r]
    if errors:
        lines.append(f"\n{len(errors)} configurations did not run (e.g. {errors[0]['knob']}={errors[0]['value']}: "
                     f"{errors[0]['error'][:120]}).")  # fmt: skip
    if not result.get("complete"):
        lines.append("\nThe sweep stopped at the time limit: the rows above are what it finished.")
    return lines


def render_summary(results: dict[str, Any]) -> str:
    stages = results.get("stages", {})
    probe = (stages.get("env") or {}).get("result") or {}
    env = results.get("environment", {})
    gpu = probe.get("gpu") or ("CPU rehearsal (no GPU)" if results.get("dry_run") else "no GPU seen")
    packages = probe.get("packages", {})
    version = lambda name: (packages.get(name) or {}).get("version", "?")  # noqa: E731
    title = (
        "GPU check (dry run: CPU, Triton interpreter, tiny shapes — not a measurement)"
        if results["dry_run"]
        else "GPU check"
    )
    lines = [
        f"# {title}",
        "",
        f"{gpu}; torch {version('torch')}, triton {version('triton')}, "
        f"CUDA {(probe.get('cuda') or {}).get('torch_cuda')}, Python {probe.get('python', '?')}; "
        f"transformers {version('transformers')}, peft {version('peft')}; "
        f"started {results['started']}, {results.get('wall_s', '…')} s of {results['time_limit_s']} s; "
        f"commit {str((results.get('repository') or {}).get('commit'))[:12]}.",
    ]
    carried = [f"{n} {i['version']}" for n, i in env.get("packages", {}).items() if i["source"].startswith("carried")]
    lines.append(f"Carried wheels used: {', '.join(carried) if carried else 'none (the image had everything)'}.")
    for line in env.get("problems", []) + env.get("warnings", []):
        lines.append(f"- package problem: {line}")
    lines += ["", "| stage | status | seconds | budget | log |", "|---|---|---:|---:|---|"]
    for name, stage in stages.items():
        note = f" ({stage['note']})" if stage.get("note") else ""
        budget = stage.get("timeout_s") or "–"
        lines.append(f"| {name} | {stage['status']}{note} | {stage['seconds']} | {budget} | {stage['log']} |")
    sections = (
        ("Kernels", "kernels", kernels_section),
        ("Serving (GPU)", "serving", serving_section),
        ("Kernel tests on the device", "tests", tests_section),
        ("Kernel checks against float64", "checks", checks_section),
        ("Launch knobs (tuning sweep)", "tune", tune_section),
    )
    for title, name, section in sections:
        if name in stages:
            lines += ["", f"## {title}", "", *section(stages[name].get("result"))]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="results folder (new or empty)")
    parser.add_argument("--dry-run", action="store_true", help="CPU rehearsal: Triton interpreter, tiny shapes")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds for the whole run (360; 600 dry)")
    parser.add_argument("--stages", nargs="+", choices=[s.name for s in STAGES], help="run only these stages")
    parser.add_argument("--wheels", type=Path, default=DEFAULT_WHEELS, help="carried wheels (default .gpu_wheels/)")
    parser.add_argument("--prefer-carried", action="store_true", help="use every carried wheel, not the image's")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the stages (default: this one)")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous run's results in OUT")
    args = parser.parse_args(argv)
    if args.time_limit is None:
        args.time_limit = 600.0 if args.dry_run else 360.0
    return args


def main(argv: Optional[list[str]] = None) -> int:
    return Run(parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
