"""Multi-role scripts: a YAML list of segments, each with its own portrait, prompt and audio.

```yaml
segments:            # or just a top-level list
  - image: alice.png
    audio: alice.wav
    prompt: A woman in a red jacket talks in a bright studio.
  - image: bob.jpg
    audio: bob.mp3
    prompt: A man with glasses answers calmly.
    seed: 7          # optional, defaults to --seed
    transition: 6    # optional cross-fade into this segment, in frames (default 0: a clean cut)
```
Relative paths are relative to the script file. The file is UTF-8 (a byte-order mark is fine), any line
ending. docs/offline.md documents the format.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from liveavatar.offline.inputs import InputError, InputProblems, read_text, unknown_key

KNOWN_KEYS = {"image", "audio", "prompt", "seed", "transition"}


@dataclass(frozen=True)
class ScriptSegment:
    image: Path
    audio: Path
    prompt: str = ""
    seed: int | None = None
    transition: int = 0


def load_script(path: str | Path, check_files: bool = True) -> list[ScriptSegment]:
    """The script's segments; InputProblems listing every problem of every segment (unknown keys, missing
    entries, bad numbers and, with `check_files`, files that do not exist)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"script not found: {path}")
    try:
        data = yaml.safe_load(read_text(path, "script"))
    except yaml.YAMLError as exc:
        raise InputError(f"script {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    entries = data.get("segments") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise InputError(f"script {path} must hold a non-empty list of segments")
    problems: list[str] = []
    segments = [_segment(entry, i + 1, path.parent, problems, check_files) for i, entry in enumerate(entries)]
    if problems:
        raise InputProblems(f"script {path}", problems)
    return [s for s in segments if s is not None]


def _segment(entry: object, number: int, base: Path, problems: list[str], check_files: bool) -> ScriptSegment | None:
    where = f"segment {number}"
    if not isinstance(entry, dict):
        problems.append(f"{where} must be a mapping with image, audio and prompt")
        return None
    found = len(problems)
    problems += [f"{where}: unknown key {unknown_key(key, KNOWN_KEYS)}" for key in entry if key not in KNOWN_KEYS]
    for key in ("image", "audio"):
        if not entry.get(key):
            problems.append(f"{where} has no {key}")
        elif check_files and not (base / str(entry[key])).is_file():
            problems.append(f"{where}: {key} not found: {base / str(entry[key])}")
    try:
        seed = None if entry.get("seed") is None else int(entry["seed"])
        transition = int(entry.get("transition") or 0)
    except (TypeError, ValueError):
        problems.append(f"{where}: seed and transition must be whole numbers")
        return None
    if transition < 0:
        problems.append(f"{where}: transition must be >= 0 frames")
    if len(problems) > found:
        return None
    return ScriptSegment(
        image=base / str(entry["image"]),
        audio=base / str(entry["audio"]),
        prompt=str(entry.get("prompt") or ""),
        seed=seed,
        transition=transition,
    )
