"""`liveavatar batch`: many generate jobs from a manifest (CSV/YAML) or a folder, resumable and fault-isolated.

Manifest columns / keys per job: `image`, `audio`, `prompt`, or `script` for a multi-role job; optional
`name`, `output`, `size`, `seed`, `num_clip`, `infer_frames`. Paths are relative to the manifest. A YAML
manifest is a list of jobs or `{defaults: {...}, jobs: [...]}`. A folder holds one job per sub-folder
(an image, an audio file, optional prompt.txt or script.yaml) or `name.png` + `name.wav` (+ `name.txt`)
pairs. The model loads once for all jobs; a job whose output exists is skipped, so a re-run resumes.
Every problem that can be found before running (see `check_jobs`) is reported together and nothing
runs; a job that fails while running fails alone. The formats, with examples: docs/offline.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from liveavatar.offline.generate import add_generation_arguments, setup_logging

log = logging.getLogger(__name__)

JOB_KEYS = {"name", "image", "audio", "prompt", "script", "output", "size", "seed", "num_clip", "infer_frames"}
NUMERIC_KEYS = {"seed": int, "num_clip": int, "infer_frames": int}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", help="CSV or YAML manifest, or a folder of jobs")
    parser.add_argument(
        "-o", "--output", default="outputs", help="folder for the videos, summary and log (default: outputs)"
    )
    add_generation_arguments(parser, "batch")


@dataclass
class JobOutcome:
    name: str
    status: str  # done, skipped, failed
    seconds: float = 0.0
    fps: float = 0.0
    message: str = ""


def load_jobs(source: str | Path) -> list[dict[str, Any]]:
    """Read the jobs with absolute paths and a unique `name` each; InputProblems lists every problem of
    the manifest itself (unknown columns, numbers that are not numbers) at once."""
    from liveavatar.offline.inputs import InputProblems

    jobs, problems = read_jobs(source)
    if problems:
        raise InputProblems(f"manifest {source}", problems)
    return jobs


def read_jobs(source: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The jobs (as `load_jobs`; a field in error is left out) and the manifest's problems. A manifest
    that cannot be read at all raises InputError."""
    from liveavatar.offline.inputs import InputError, unknown_key

    source = Path(source)
    problems: list[str] = []
    if source.is_dir():
        jobs = _folder_jobs(source)
    elif not source.is_file():
        raise InputError(f"manifest not found: {source}")
    elif source.suffix.lower() == ".csv":
        jobs = _csv_jobs(source, problems)
    elif source.suffix.lower() in (".yaml", ".yml"):
        jobs = _yaml_jobs(source, problems)
    else:
        raise InputError(f"manifest {source} must be a .csv, .yaml/.yml file or a folder")
    if not jobs and not problems:
        raise InputError(f"no jobs found in {source}")
    base = source if source.is_dir() else source.parent
    names: set[str] = set()
    for number, job in enumerate(jobs, 1):
        name = str(
            job.get("name") or Path(job.get("output") or job.get("audio") or job.get("script") or f"job{number}").stem
        )
        if name in names:
            name = f"{name}_{number}"
        names.add(name)
        where = f"job {number} ({name})"
        problems += [f"{where}: unknown field {unknown_key(key, JOB_KEYS)}" for key in job if key not in JOB_KEYS]
        for key in ("image", "audio", "script"):
            if job.get(key):
                job[key] = str(base / str(job[key]))
        for key, cast in NUMERIC_KEYS.items():
            if job.get(key) not in (None, ""):
                try:
                    job[key] = cast(job[key])
                except (TypeError, ValueError):
                    problems.append(f"{where}: {key} must be a whole number, got {job.pop(key)!r}")
        job["name"] = name
    return jobs, problems


def check_jobs(args: argparse.Namespace, jobs: list[dict[str, Any]], out_dir: Path) -> list[str]:
    """Every problem that can be found before a run: settings (sizes, numbers), missing input files, scripts,
    and two jobs writing one output. Jobs whose output exists are skipped by the run, so their inputs may be gone."""
    from liveavatar.media_io import IMAGE_SUFFIXES
    from liveavatar.offline.generate import resolve_settings
    from liveavatar.offline.inputs import InputError, InputProblems
    from liveavatar.offline.script import load_script

    problems: list[str] = []
    writers: dict[Path, list[str]] = {}
    for number, job in enumerate(jobs, 1):
        where = f"job {number} ({job['name']})"
        ns = job_arguments(args, job, out_dir)
        output = Path(ns.output).resolve()
        writers.setdefault(output, []).append(where)
        found: list[str] = []
        if output.suffix.lower() != ".mp4":
            found.append(f"output {ns.output} must end in .mp4")
        try:
            resolve_settings(ns)
        except InputError as exc:
            found.append(str(exc))
        done = output.is_file()
        if ns.script:
            if ns.image or ns.audio:
                found.append("a script job names its images and audio in the script, not in the manifest")
            try:
                load_script(ns.script, check_files=not done)
            except InputProblems as exc:
                found += [f"{ns.script}: {p}" for p in exc.problems]
            except InputError as exc:
                found.append(str(exc))
        elif not ns.audio:
            found.append("no audio (or script)")
        elif not done:
            found += [
                f"{key} not found: {value}"
                for key, value in (("image", ns.image), ("audio", ns.audio))
                if value and not Path(value).is_file()
            ]
            if ns.image and Path(ns.image).suffix.lower() not in IMAGE_SUFFIXES:
                found.append(f"image {ns.image} must be a JPG, PNG or WebP file")
        problems += [f"{where}: {p}" for p in found]
    problems += [
        f"{', '.join(who[:-1])} and {who[-1]} {'both' if len(who) == 2 else 'all'} write {path}"
        for path, who in writers.items()
        if len(who) > 1
    ]
    return problems


def _csv_jobs(path: Path, problems: list[str]) -> list[dict[str, Any]]:
    import csv
    import io

    from liveavatar.offline.inputs import read_text, unknown_key

    reader = csv.DictReader(io.StringIO(read_text(path, "manifest"), newline=""))
    columns = [c.strip() for c in reader.fieldnames or [] if c]
    problems += [f"unknown column {unknown_key(c, JOB_KEYS)}" for c in columns if c not in JOB_KEYS]
    return [{k.strip(): (v or "").strip() for k, v in row.items() if k and k.strip() in JOB_KEYS} for row in reader]


def _yaml_jobs(path: Path, problems: list[str]) -> list[dict[str, Any]]:
    import yaml

    from liveavatar.offline.inputs import InputError, read_text

    try:
        data = yaml.safe_load(read_text(path, "manifest"))
    except yaml.YAMLError as exc:
        raise InputError(f"manifest {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    defaults: dict[str, Any] = {}
    if isinstance(data, dict):
        defaults, data = data.get("defaults") or {}, data.get("jobs")
    if not isinstance(data, list) or not all(isinstance(j, dict) for j in data) or not isinstance(defaults, dict):
        raise InputError(f"manifest {path} must hold a list of jobs (or defaults: and jobs:)")
    return [{**defaults, **job} for job in data]


def _folder_jobs(folder: Path) -> list[dict[str, Any]]:
    from liveavatar.media_io import IMAGE_SUFFIXES
    from liveavatar.offline.inputs import AUDIO_SUFFIXES, read_text

    def first(files: list[Path], suffixes: tuple[str, ...]) -> Path | None:
        return next((f for f in sorted(files) if f.suffix.lower() in suffixes), None)

    jobs: list[dict[str, Any]] = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = list(sub.iterdir())
        script = first(files, (".yaml", ".yml"))
        job: dict[str, Any] = {"name": sub.name}
        if script:
            job["script"] = str(script)
        else:
            job["image"] = str(first(files, IMAGE_SUFFIXES) or sub / "missing-image.png")
            job["audio"] = str(first(files, AUDIO_SUFFIXES) or sub / "missing-audio.wav")
            prompt = sub / "prompt.txt"
            job["prompt"] = read_text(prompt, "prompt").strip() if prompt.is_file() else ""
        jobs.append(job)
    for audio in sorted(p for p in folder.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES):
        image = first([p for p in folder.iterdir() if p.stem == audio.stem], IMAGE_SUFFIXES)
        prompt = audio.with_suffix(".txt")
        jobs.append(
            {
                "name": audio.stem,
                "audio": str(audio),
                "image": str(image or audio.with_suffix(".png")),
                "prompt": read_text(prompt, "prompt").strip() if prompt.is_file() else "",
            }
        )
    return jobs


def job_arguments(args: argparse.Namespace, job: dict[str, Any], out_dir: Path) -> argparse.Namespace:
    """The batch-wide flags with this job's own fields on top, shaped like `generate`'s arguments."""
    ns = argparse.Namespace(**vars(args))
    ns.image, ns.audio, ns.script = job.get("image") or None, job.get("audio") or None, job.get("script") or None
    ns.prompt = job.get("prompt") if not ns.script else None
    for key in ("size", "seed", "num_clip", "infer_frames"):
        if job.get(key) not in (None, ""):
            setattr(ns, key, job[key])
    output = Path(job["output"]) if job.get("output") else Path(job["name"] + ".mp4")
    ns.output = str(output if output.is_absolute() else out_dir / output)
    return ns


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from liveavatar.media_io import MediaError
    from liveavatar.offline.generate import build_segments, resolve_settings
    from liveavatar.offline.inputs import InputError, InputProblems
    from liveavatar.offline.render import OutputError, render

    setup_logging(args.verbose)
    out_dir = Path(args.output)
    try:
        base = resolve_settings(args)
        jobs, problems = read_jobs(args.manifest)
        problems += check_jobs(args, jobs, out_dir)
        if problems:
            raise InputProblems(str(args.manifest), problems)
    except InputError as exc:
        print(f"liveavatar batch: error: {exc}", file=sys.stderr)
        return 2
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(out_dir / "batch.log")
    except OSError as exc:
        print(f"liveavatar batch: error: cannot write {out_dir}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    generator = None
    outcomes: list[JobOutcome] = []
    summary = out_dir / "batch_summary.tsv"
    try:
        log.info("batch of %d jobs from %s into %s", len(jobs), args.manifest, out_dir)
        for number, job in enumerate(tqdm(jobs, desc="batch", unit="job", disable=not sys.stderr.isatty()), 1):
            log.info("job %d/%d: %s", number, len(jobs), job["name"])
            ns = job_arguments(args, job, out_dir)
            if Path(ns.output).is_file():
                log.info("job %s: %s exists, skipped", job["name"], ns.output)
                outcomes.append(JobOutcome(job["name"], "skipped"))
                continue
            began = time.perf_counter()
            try:
                settings = resolve_settings(ns)
                segments = build_segments(ns, settings)
                if generator is None:
                    generator = base.create_generator()
                result = render(
                    generator,
                    segments,
                    settings.size,
                    ns.output,
                    settings.max_frames(),
                    progress=sys.stderr.isatty(),
                    label=job["name"],
                    online_decode=settings.online_decode,
                )
                outcomes.append(JobOutcome(job["name"], "done", result.seconds, result.fps))
            except (InputError, MediaError, OutputError, ValueError) as exc:
                log.error("job %s failed: %s", job["name"], exc)
                outcomes.append(JobOutcome(job["name"], "failed", time.perf_counter() - began, message=str(exc)))
            except Exception as exc:  # one broken job must not stop the others
                log.exception("job %s failed", job["name"])
                outcomes.append(JobOutcome(job["name"], "failed", time.perf_counter() - began, message=repr(exc)))
        table = summary_table(outcomes)
        log.info("summary\n%s", table)
        print(table)
        summary.write_text(
            "job\tseconds\tfps\tstatus\tmessage\n"
            + "".join(f"{o.name}\t{o.seconds:.2f}\t{o.fps:.2f}\t{o.status}\t{o.message}\n" for o in outcomes)
        )
    except OSError as exc:
        print(f"liveavatar batch: error: cannot write {summary}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    failed = sum(o.status == "failed" for o in outcomes)
    return 1 if failed else 0


def summary_table(outcomes: list[JobOutcome]) -> str:
    rows = [("job", "seconds", "fps", "status")]
    rows += [(o.name, f"{o.seconds:.1f}", f"{o.fps:.1f}", o.status) for o in outcomes]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    counts = {s: sum(o.status == s for o in outcomes) for s in ("done", "skipped", "failed")}
    return "\n".join(lines + [", ".join(f"{n} {s}" for s, n in counts.items())])
