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
Relative paths are relative to the script file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from liveavatar.offline.inputs import InputError

KNOWN_KEYS = {"image", "audio", "prompt", "seed", "transition"}


@dataclass(frozen=True)
class ScriptSegment:
    image: Path
    audio: Path
    prompt: str = ""
    seed: int | None = None
    transition: int = 0


def load_script(path: str | Path) -> list[ScriptSegment]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"script not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(f"script {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    entries = data.get("segments") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise InputError(f"script {path} must hold a non-empty list of segments")
    return [_segment(entry, i + 1, path.parent) for i, entry in enumerate(entries)]


def _segment(entry: object, number: int, base: Path) -> ScriptSegment:
    where = f"script segment {number}"
    if not isinstance(entry, dict):
        raise InputError(f"{where} must be a mapping with image, audio and prompt")
    unknown = set(entry) - KNOWN_KEYS
    if unknown:
        raise InputError(f"{where} has unknown keys: {', '.join(sorted(map(str, unknown)))}")
    for key in ("image", "audio"):
        if not entry.get(key):
            raise InputError(f"{where} has no {key}")
    try:
        seed = None if entry.get("seed") is None else int(entry["seed"])
        transition = int(entry.get("transition") or 0)
    except (TypeError, ValueError):
        raise InputError(f"{where}: seed and transition must be whole numbers") from None
    if transition < 0:
        raise InputError(f"{where}: transition must be >= 0 frames")
    return ScriptSegment(
        image=base / str(entry["image"]),
        audio=base / str(entry["audio"]),
        prompt=str(entry.get("prompt") or ""),
        seed=seed,
        transition=transition,
    )
