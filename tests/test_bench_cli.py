"""`liveavatar bench` on the tiny config writes a complete result file, and `liveavatar engines`
builds and lists ONNX graphs through the application's export targets."""

import json

from server.cli import main


def test_bench_tiny_writes_json_result(tmp_path, capsys):
    out = tmp_path / "result.json"
    args = ["bench", "--arch", "tiny", "--size", "128*128", "--blocks", "2", "--warmup", "1", "--no-vae", "--json", str(out)]
    assert main(args) == 0
    result = json.loads(out.read_text())
    for key in ("steady_fps", "block_latency_ms", "audio_encoder_ms", "dit_step_ms", "vae_ms", "peak_gib_per_rank", "engine", "gpu", "commit"):
        assert key in result
    assert result["steady_fps"] > 0 and sorted(result["dit_step_ms"]) == ["0", "1", "2", "3"]
    assert "steady fps" in capsys.readouterr().out


def test_bench_balanced_pipeline_on_two_cpu_ranks_cuts_a_step_and_decodes(tmp_path):
    out = tmp_path / "balanced.json"
    args = ["bench", "--arch", "tiny", "--size", "128*128", "--blocks", "3", "--warmup", "1", "--device", "cpu",
            "--gpus", "2", "--balance", "--decode-cost", "1.0", "--json", str(out)]
    assert main(args) == 0
    result = json.loads(out.read_text())
    first, second = result["spans_per_rank"]
    assert first[-1][0] == second[0][0] and first[-1][2] == second[0][1], "step 2 is cut between the ranks"
    assert result["balanced"] and result["vae_ms"] > 0 and sorted(result["dit_step_ms"]) == ["0", "1", "2", "3"]


def test_engines_build_and_list(tmp_path, capsys):
    cache = str(tmp_path / "cache")
    assert main(["engines", "build", "--arch", "tiny", "--size", "128*128", "--cache", cache]) == 0
    assert main(["engines", "list", "--cache", cache]) == 0
    listing = capsys.readouterr().out
    assert "dit_block_step" in listing and "vae_decode_step" in listing
