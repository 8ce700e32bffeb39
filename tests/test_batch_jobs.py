"""`liveavatar batch`: isolated failures, resumable re-runs, summary and log, manifest formats."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from liveavatar.media_io import default_portrait_path
from liveavatar.offline import batch
from liveavatar.offline.inputs import InputError
from liveavatar.offline.mux import probe

ASSETS = Path(__file__).parent / "assets"


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    batch.add_arguments(parser)
    return batch.run(parser.parse_args(list(argv)))


def write_manifest(folder: Path) -> Path:
    image = default_portrait_path()
    manifest = folder / "jobs.csv"
    (folder / "garbled.wav").write_bytes(b"RIFF\x00\x00 not really a wave file")  # found only by decoding it
    manifest.write_text(
        "name,image,audio,prompt,num_clip\n"
        f"alpha,{image},{ASSETS / 'speech_en_16k_b.wav'},A woman talks in a studio.,1\n"
        f"broken,{image},{folder / 'garbled.wav'},Nobody speaks here at all.,1\n"
        f"gamma,{image},{ASSETS / 'speech_en_16k.wav'},An astronaut explains the mission.,1\n"
    )
    return manifest


def test_one_undecodable_file_fails_alone_and_a_rerun_skips_the_done_jobs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = write_manifest(tmp_path)
    out = tmp_path / "videos"
    args = ("--backend", "preview", "--size", "256*256", "--infer_frames", "24", "-o", str(out))
    assert cli(str(manifest), *args) == 1
    assert sorted(p.name for p in out.glob("*.mp4")) == ["alpha.mp4", "gamma.mp4"]
    assert probe(out / "alpha.mp4")["frames"] == 24
    log = (out / "batch.log").read_text()
    assert "job broken failed: cannot decode audio" in log and log.count(" ERROR ") == 1
    summary = (out / "batch_summary.tsv").read_text().splitlines()
    assert summary[0].split("\t")[:4] == ["job", "seconds", "fps", "status"]
    assert [line.split("\t")[3] for line in summary[1:]] == ["done", "failed", "done"]
    assert "2 done, 0 skipped, 1 failed" in capsys.readouterr().out

    done_at = (out / "alpha.mp4").stat().st_mtime_ns
    assert cli(str(manifest), *args) == 1  # the broken job still fails
    rerun = [line.split("\t")[3] for line in (out / "batch_summary.tsv").read_text().splitlines()[1:]]
    assert rerun == ["skipped", "failed", "skipped"]
    assert (out / "alpha.mp4").stat().st_mtime_ns == done_at


def test_yaml_manifest_with_defaults_and_a_folder_of_jobs(tmp_path: Path) -> None:
    yaml_manifest = tmp_path / "jobs.yaml"
    yaml_manifest.write_text(
        "defaults: {prompt: A person talks to the camera., num_clip: 1}\n"
        f"jobs:\n  - {{image: {default_portrait_path()}, audio: {ASSETS / 'speech_en_16k_b.wav'}, output: one.mp4}}\n"
    )
    jobs = batch.load_jobs(yaml_manifest)
    assert jobs[0]["name"] == "one" and jobs[0]["num_clip"] == 1 and jobs[0]["prompt"].startswith("A person")

    folder = tmp_path / "folder"
    (folder / "intro").mkdir(parents=True)
    (folder / "intro" / "face.png").write_bytes(default_portrait_path().read_bytes())
    (folder / "intro" / "voice.wav").write_bytes((ASSETS / "speech_en_16k_b.wav").read_bytes())
    (folder / "intro" / "prompt.txt").write_text("A calm introduction.")
    (folder / "outro.wav").write_bytes((ASSETS / "speech_en_16k_b.wav").read_bytes())
    (folder / "outro.png").write_bytes(default_portrait_path().read_bytes())
    jobs = batch.load_jobs(folder)
    assert [(j["name"], Path(j["image"]).name, Path(j["audio"]).name) for j in jobs] == [
        ("intro", "face.png", "voice.wav"),
        ("outro", "outro.png", "outro.wav"),
    ]
    assert jobs[0]["prompt"] == "A calm introduction."
    assert (
        cli(
            str(folder),
            "--backend",
            "preview",
            "--size",
            "128*128",
            "--num_clip",
            "1",
            "--infer_frames",
            "12",
            "-o",
            str(tmp_path / "out"),
        )
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "out").glob("*.mp4")) == ["intro.mp4", "outro.mp4"]


def test_bad_manifests_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "odd.csv").write_text("name,image,colour\nx,a.png,red\n")
    with pytest.raises(InputError, match="unknown column 'colour'"):
        batch.load_jobs(tmp_path / "odd.csv")
    assert cli(str(tmp_path / "none.csv"), "--backend", "preview", "-o", str(tmp_path / "o")) == 2
    assert "manifest not found" in capsys.readouterr().err
