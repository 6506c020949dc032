"""`scaleserve quantize / generate / adapter` as a user runs them."""

import subprocess
import sys
from pathlib import Path

import pytest

from scaleserve.server.cli import main

SCRIPT = Path(sys.executable).with_name("scaleserve")


def test_quantize_then_generate_with_adapter(tmp_path, capsys, make_hf_checkpoint):

    src = make_hf_checkpoint(tmp_path / "hf", "qwen2")
    assert main(["quantize", str(src), str(tmp_path / "q"), "--method", "bcq", "--group-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "SQNR vs bf16" in out and "base fingerprint:" in out and "MiB int4" in out
    assert main(["adapter", "identity", str(tmp_path / "q"), str(tmp_path / "id.safetensors"),
                 "--kind", "alphatuning"]) == 0
    assert main(["adapter", "inspect", str(tmp_path / "id.safetensors")]) == 0
    assert '"kind": "alphatuning"' in capsys.readouterr().out
    args = ["generate", str(tmp_path / "q"), "--prompt", "Once upon a time", "--max-new-tokens", "6"]
    assert main(args) == 0
    base = capsys.readouterr().out
    assert main(args + ["--adapter", str(tmp_path / "id.safetensors")]) == 0
    assert capsys.readouterr().out == base  # the identity adapter changes nothing
    assert main(args + ["--temperature", "0.9", "--top-p", "0.9", "--seed", "7"]) == 0
    first = capsys.readouterr().out
    assert main(args + ["--temperature", "0.9", "--top-p", "0.9", "--seed", "7"]) == 0
    assert capsys.readouterr().out == first  # seeded sampling is reproducible


@pytest.mark.parametrize("argv,msg", [
    (["quantize", "/nonexistent/model", "/tmp/x"], "does not exist"),
    (["generate", "/nonexistent/model", "--prompt", "hi"], "does not exist"),
])
def test_bad_input_exits_2_with_message(argv, msg, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


def test_bad_group_size_is_rejected(tmp_path, capsys):
    assert main(["quantize", str(tmp_path), str(tmp_path / "o"), "--group-size", "48"]) == 2
    assert "group size must be one of" in capsys.readouterr().err


def test_adapter_for_another_base(tmp_path, make_tiny_model, capsys):
    a, b = make_tiny_model("llama", "rtn", 32), make_tiny_model("llama", "rtn", 64)
    assert main(["adapter", "identity", str(a), str(tmp_path / "a.safetensors"), "--kind", "peqa"]) == 0
    assert main(["generate", str(b), "--prompt", "x", "--adapter", str(tmp_path / "a.safetensors")]) == 2
    assert "adapter was made for base" in capsys.readouterr().err


def test_adapter_inspect_of_a_directory_or_nothing(tmp_path, capsys):
    """A directory is not an adapter file (it said "does not exist"); a missing path does not exist."""
    assert main(["adapter", "inspect", str(tmp_path)]) == 2
    assert "is a directory, not an adapter file" in capsys.readouterr().err
    assert main(["adapter", "inspect", str(tmp_path / "missing.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_console_script(tmp_path):
    r = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "quantize" in r.stdout and "serve" in r.stdout


def test_serve_with_a_bad_model_dir_exits_2_with_message(tmp_path):
    """`scaleserve serve --model` naming no model: one clear line and exit 2, as the other commands do, not
    uvicorn's startup traceback (exit 3)."""
    empty, foreign = tmp_path / "empty", tmp_path / "foreign"
    empty.mkdir()
    foreign.mkdir()
    (foreign / "scaleserve.json").write_text('{"format": "something-else", "format_version": 1}')
    for model, msg in ((tmp_path / "nonexistent", "does not exist"), (empty, "no scaleserve.json"),
                       (foreign, "is not scaleserve-int4")):
        r = subprocess.run([str(SCRIPT), "serve", "--model", str(model), "--port", "0", "--device", "cpu"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, (r.returncode, r.stderr)


@pytest.mark.parametrize("extra,msg", [
    (["--prompt", ""], "the prompt is empty"),
    (["--prompt", "hi", "--max-new-tokens", "-3"], "--max-new-tokens must be at least 0"),
    (["--prompt", "hi", "--max-new-tokens", "100000"], "context of 256 tokens"),
    (["--prompt", "hi", "--temperature", "-1"], "--temperature must be at least 0"),
    (["--prompt", "hi", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--prompt", "hi", "--top-k", "-1"], "--top-k must be at least 0"),
])
def test_generate_bad_arguments_exit_2_with_message(tiny_model_dir, extra, msg, capsys):
    """Out-of-range generate flags are one clear line (exit 2): an empty prompt was an IndexError traceback,
    a negative --max-new-tokens 'the KV cache needs at least 2 blocks', one past the context allocated a KV
    cache for all of it and generated past the model's positions, and a negative temperature ran silently."""
    assert main(["generate", str(tiny_model_dir), "--device", "cpu", *extra]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err, err


def test_serve_prefix_caching_flag_and_environment(monkeypatch):
    """--prefix-caching / --no-prefix-caching reach the setting, over SCALESERVE_PREFIX_CACHING; off by default."""
    from scaleserve.server.cli import build_parser
    from scaleserve.server.main import settings_from_args

    def setting(*argv):
        return settings_from_args(build_parser().parse_args(["serve", *argv])).prefix_caching

    assert setting() is False and setting("--prefix-caching") is True
    monkeypatch.setenv("SCALESERVE_PREFIX_CACHING", "true")
    assert setting() is True and setting("--no-prefix-caching") is False
