"""Every command in the README and docs/ runs as written, unless it is listed below with the reason it cannot.

Commands are read from the ```bash fences (continuation lines joined); each one is either run, as the
documented text through bash, in a folder holding the small inputs it names, or matched by one of
`SKIPPED`'s rules. A command that is neither fails the suite, so an example cannot drift from the code.
Example files the docs show in a fence named after them (```yaml roles.yaml) are written from the docs
themselves. `liveavatar` and `python3` on the PATH are this checkout's (not whatever is installed).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import urllib.request
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import wait_http
from PIL import Image
from processes import free_port, stop_process

from liveavatar.media_io import decode_audio, default_portrait_path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_FENCES = ("bash", "sh", "shell", "console")

SKIPPED: list[tuple[str, str]] = [
    # (regular expression matched against the command, why the suite does not run it)
    (
        r"^make serve$",
        "installs, then serves until Ctrl-C: its `liveavatar serve` is run below and by the server tests",
    ),
    (r"^make test$", "is the whole suite itself"),
    (r"^bash docker/install\.sh", "installs into the environment the tests run in (which it made)"),
    (r"--arch 14b|--gpus [2-9]|bench/gpu_suite\.sh|bench/gpu_acceptance\.py|nvidia-smi", "needs NVIDIA GPUs"),
    (r"--ckpt[-_]dir", "needs the 14B checkpoints (≈ 50 GB) and a GPU"),
    (r"^(sudo|curl) |^docker run --rm --gpus", "changes the host system (drivers, packages, firewall, Docker)"),
    (r"^docker ", "needs a Docker engine (the Docker files are checked by tests/test_docker_files_*.py)"),
    (r"^python3 -m pip install|^hf download", "downloads from the network"),
    (r"^git clone <", "a placeholder for where the reader got this repository"),
    (r"^\$EDITOR ", "interactive"),
    (r"^chmod -R a\+rX /srv/", "a host folder the deploy guide creates with sudo"),
    (r"^ray |serve\.delete", "needs a Ray cluster of several hosts (tests/test_cluster_*.py run one on loopback)"),
]


def documented_commands() -> Iterator[tuple[str, str]]:
    """(doc name, command) for each command line in the shell fences, comments dropped."""
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for lang, _, body in fences(text):
            if lang not in SHELL_FENCES:
                assert lang or not re.search(r"^\s*(liveavatar|python3?|bash|make) ", body, re.M), (
                    f"{doc.name}: a command in a ```{lang} fence; label it ```bash so this test runs it"
                )
                continue
            for line in re.sub(r"\\\n\s*", " ", body).splitlines():
                command = re.sub(r"\s+#(\s.*)?$", "", line).strip()
                if command and not command.startswith("#"):
                    yield doc.name, command


def fences(text: str) -> list[tuple[str, str, str]]:
    """(language, file name or "", body) of each fenced block; ```yaml roles.yaml names its file."""
    return re.findall(r"^```(\w*)[ \t]*(\S*)[^\n]*\n(.*?)^```", text, re.S | re.M)


def example_files() -> dict[str, str]:
    """file name -> content of every fence the docs name after a file."""
    files = {}
    for doc in DOCS:
        files.update({name: body for _, name, body in fences(doc.read_text(encoding="utf-8")) if name})
    return files


COMMANDS = list(documented_commands())


def write_wav(path: Path, samples: np.ndarray, rate: int = 16_000) -> None:
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


def toml_example(doc: str, title: str) -> str:
    """The ```toml fence of `doc` that starts with `# <title>`."""
    text = (ROOT / "docs" / doc).read_text(encoding="utf-8")
    return next(b for lang, _, b in fences(text) if lang == "toml" and b.startswith(f"# {title}"))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the small inputs the commands name, and this checkout's `liveavatar` on the PATH."""
    work = tmp_path_factory.mktemp("docs")
    for name in ("me.png", "alice.png"):
        shutil.copy(default_portrait_path(), work / name)
    Image.open(default_portrait_path()).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(work / "bob.jpg")
    speech = decode_audio(ROOT / "tests/assets/speech_en_16k.wav").samples
    write_wav(work / "hello.wav", speech[16_000 : 16_000 * 3])  # two seconds are enough to check a command
    write_wav(work / "alice.wav", speech[16_000 : 16_000 * 2])
    write_wav(work / "bob.wav", speech[16_000 * 4 : 16_000 * 5])
    for name, content in example_files().items():
        (work / name).write_text(content, encoding="utf-8")
    (work / "deploy").mkdir()
    (work / "deploy/server.toml").write_text(toml_example("configuration.md", "server.toml"))
    (work / "docker").mkdir()
    shutil.copy(ROOT / "docker/.env.example", work / "docker/.env.example")
    bin_dir = work / "bin"
    bin_dir.mkdir()
    for name, target in (("liveavatar", f'"{sys.executable}" -m server.cli'), ("python3", f'"{sys.executable}"')):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec {target} "$@"\n')
        (bin_dir / name).chmod(0o755)
    return work


def environment(work: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PATH": f"{work / 'bin'}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT), **extra}


def run_documented(command: str, work: Path, cwd: Path | None = None, **env: str) -> str:
    done = subprocess.run(
        ["bash", "-c", command],
        cwd=cwd or work,
        env=environment(work, **env),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, f"`{command}` exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def port_is_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def serve_documented(command: str, work: Path, port: int, **env: str) -> subprocess.Popen[str]:
    """Start a documented `liveavatar serve` command; it is up once /healthz answers on `port`."""
    proc = subprocess.Popen(
        ["bash", "-c", f"exec {command}" if command.startswith("liveavatar") else command],
        cwd=work,
        env=environment(work, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout=120)
    except TimeoutError:
        stop_process(proc, timeout=10)
        pytest.fail(f"`{command}` did not start:\n{proc.communicate()[0]}")
    return proc


def check_generate(command: str, work: Path) -> None:
    from liveavatar.offline.mux import probe

    (work / "hello.mp4").unlink(missing_ok=True)
    out = run_documented(command, work)
    assert "prompt is very short" not in out, "the preview ignores the prompt, so it must not judge it"
    info = probe(work / "hello.mp4")
    assert info["frames"] == 50 and (info["width"], info["height"]) == (512, 512)  # the preview's own size


def check_batch(command: str, work: Path) -> None:
    from liveavatar.offline import batch

    shutil.rmtree(work / "outputs", ignore_errors=True)
    manifest = command.split()[2]
    jobs = batch.load_jobs(work / manifest)
    out = run_documented(command, work)
    assert f"{len(jobs)} done" in out
    for job in jobs:
        assert (work / "outputs" / (job.get("output") or job["name"] + ".mp4")).is_file()
    assert f"{len(jobs)} skipped" in run_documented(command, work), "a re-run skips the finished jobs"


def check_video(name: str, frames: int):
    """A check that the command writes `name` with this many frames."""

    def check(command: str, work: Path) -> None:
        from liveavatar.offline.mux import probe

        (work / name).unlink(missing_ok=True)
        run_documented(command, work)
        assert probe(work / name)["frames"] == frames

    return check


def check_bench(command: str, work: Path) -> None:
    out = run_documented(command, work)
    assert "tiny @ 128*128" in out and "steady fps" in out and "unknown" not in out


def check_serve(port: int | None = None, **env: str):
    """A check that starts the serve command (on `port`, or a free one given by LIVEAVATAR_PORT)."""

    def check(command: str, work: Path) -> None:
        fixed = port
        if fixed is not None and not port_is_free(fixed):
            pytest.skip(f"port {fixed}, which the command names, is taken on this machine")
        listen = fixed if fixed is not None else free_port()
        extra = env if fixed is not None else {**env, "LIVEAVATAR_PORT": str(listen)}
        proc = serve_documented(command, work, listen, **extra)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{listen}/", timeout=10) as page:
                assert page.status == 200
        finally:
            stop_process(proc, timeout=10)

    return check


def check_push_client(command: str, work: Path) -> None:
    if not port_is_free(8080):
        pytest.skip("port 8080, which the command names, is taken on this machine")
    server = serve_documented("liveavatar serve", work, 8080, LIVEAVATAR_PORT="8080")
    try:
        out = run_documented(command, work, cwd=ROOT)
    finally:
        stop_process(server, timeout=10)
    assert "server backend: preview" in out and "finished" in out


def check_capacity(command: str, work: Path) -> None:
    out = run_documented(command, work, cwd=ROOT)
    assert "hosts" in out and ("| 384*256 | 4 | 1 | 330 |" in out or '"hosts": 50' in out)


def check_print_config(command: str, work: Path) -> None:
    import json

    config = json.loads(run_documented(command, work))
    assert config["cluster"] == "auto" and config["replicas_max"] == 16 and config["replica_ports"]


def check_secret(command: str, work: Path) -> None:
    assert len(run_documented(command, work).strip()) >= 40


def check_env_file(command: str, work: Path) -> None:
    run_documented(command, work)
    env_file = work / "docker/.env"
    assert env_file.read_text() == (ROOT / "docker/.env.example").read_text()
    assert env_file.stat().st_mode & 0o777 == 0o600


RUN = {
    'liveavatar generate --backend preview --image me.png --audio hello.wav --prompt "a friendly tutor" -o hello.mp4': (
        check_generate
    ),
    "liveavatar batch jobs.csv -o outputs/ --backend preview": check_batch,
    "liveavatar batch jobs.yaml -o outputs/ --backend preview": check_batch,
    "liveavatar generate --backend preview --image alice.png --audio alice.wav -o alice.mp4": check_video(
        "alice.mp4", 25
    ),
    # two one-second roles, the first padded to whole blocks (3 × 12 frames), then 25 frames
    "liveavatar generate --backend preview --script roles.yaml -o dialogue.mp4": check_video("dialogue.mp4", 36 + 25),
    "liveavatar bench --arch tiny --blocks 6 --device cpu": check_bench,
    "liveavatar serve --backend liveavatar --random-weights tiny --size 128*128 --motion-frames 5": check_serve(),
    "liveavatar serve --host 0.0.0.0 --port 8443 --max-sessions 2": check_serve(port=8443),
    "LIVEAVATAR_TURN_SECRET=... liveavatar serve --config deploy/server.toml": check_serve(),
    "python3 examples/push_client.py --url ws://127.0.0.1:8080/ws tests/assets/speech_en_16k.wav": check_push_client,
    'python3 -c "import secrets; print(secrets.token_urlsafe(32))"': check_secret,
    "cp docker/.env.example docker/.env && chmod 600 docker/.env": check_env_file,
    "python3 bench/capacity.py --sessions 200 --gpus-per-host 8": check_capacity,
    "python3 bench/capacity.py --size 704*384 --steps 4 --gpus-per-session 2 --sessions 200 --json": check_capacity,
    "liveavatar serve --config front.toml --print-config": check_print_config,
}


def skip_reason(command: str) -> str | None:
    return next((why for pattern, why in SKIPPED if re.search(pattern, command)), None)


def test_every_documented_command_is_run_or_skipped_with_a_reason() -> None:
    assert len(COMMANDS) > 20
    for doc, command in COMMANDS:
        runs, why = command in RUN, skip_reason(command)
        assert runs or why, f"{doc}: `{command}` is neither run by this test nor listed in SKIPPED"
        assert not (runs and why), f"{doc}: `{command}` is both run and skipped ({why})"
    documented = {command for _, command in COMMANDS}
    assert not set(RUN) - documented, f"no longer in the docs: {set(RUN) - documented}"


@pytest.mark.parametrize("command", [c for c in dict.fromkeys(c for _, c in COMMANDS) if c in RUN])
def test_documented_command_runs(command: str, workspace: Path) -> None:
    RUN[command](command, workspace)


def test_nothing_cites_a_file_outside_the_repository() -> None:
    """Code, --help texts and docs cite docs/model.md, whose sections exist, never the private spec."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    sections = set(re.findall(r"^### (§[\d.]+) ", (ROOT / "docs/model.md").read_text(encoding="utf-8"), re.M))
    for name in tracked:
        if (
            not name.endswith((".py", ".md", ".js", ".html", ".sh", ".toml", ".yaml"))
            or name == "tests/test_docs_commands.py"
        ):
            continue
        text = (ROOT / name).read_text(encoding="utf-8")
        for outside in ("spec §", "../shared", "design.md", "shared/spec", "spec/"):
            assert outside not in text, f"{name} cites {outside!r}, which a clone of this repository does not have"
        for cited in re.findall(r"model\.md\)? (§[\d.]+(?:, §[\d.]+)*)", text):
            for section in re.findall(r"§\d+(?:\.\d+)*", cited):
                assert section in sections, f"{name} cites docs/model.md {section}, which has no such section"
