"""server/graph_tune.py: the coordinate descent over the MMA GEMV's configs, the pins files it reads and writes, and
where it starts. The timing itself needs a GPU (the engine test below); here a step's time is a function of the pins."""

from __future__ import annotations

import json

import pytest
import torch

from scaleserve.kernels import int4_mma_gemv as mg
from scaleserve.server import graph_tune

CONFIGS = mg.PIN_CONFIGS
A, B = (4096, 4096, 2, 128), (12288, 4096, 2, 128, 1)


def fake_step(costs: dict, calls: list):
    """ms of a step = 2 + the pins' costs per shape (config index -> µs), + 5 µs where A and B both take config 0."""
    def step_ms(pins):
        calls.append(dict(pins))
        us = sum(costs[shape][CONFIGS.index(cfg)] for shape, cfg in pins.items())
        if pins[A] == CONFIGS[0] and pins[B] == CONFIGS[0]:
            us += 5
        return 2 + us / 1000
    return step_ms


def test_descend_finds_each_shapes_best_config_with_the_others_held():
    costs = {A: [10, 3, 7] + [20] * (len(CONFIGS) - 3), B: [0, 30, 2] + [20] * (len(CONFIGS) - 3)}
    calls, rows = [], []
    pins, before, after = graph_tune.descend({A: CONFIGS[0], B: CONFIGS[1]}, CONFIGS, fake_step(costs, calls),
                                             rounds=3, report=rows.append)
    assert pins == {A: CONFIGS[1], B: CONFIGS[0]}  # (A moves first, so B at 0 no longer pays the pair's 5 µs)
    assert before == pytest.approx(2.040) and after == pytest.approx(2.003)
    assert [r["round"] for r in rows] == [0, 0, 1, 1]  # round 1 changed nothing more: no round 2
    assert rows[0]["shape"] == list(A) and rows[0]["best"] == CONFIGS[1] and rows[0]["was_ms"] == pytest.approx(2.040)
    assert len(calls) == 1 + 4 * len(CONFIGS) + 1


def test_descend_keeps_a_pick_that_is_within_the_noise():
    costs = {A: [10, 9] + [20] * (len(CONFIGS) - 2), B: [0] + [20] * (len(CONFIGS) - 1)}
    pins, _, _ = graph_tune.descend({A: CONFIGS[0], B: CONFIGS[1]}, CONFIGS, fake_step(costs, []), rounds=1,
                                    noise_ms=0.002)
    assert pins[A] == CONFIGS[0]  # 1 µs better: noise
    assert pins[B] == CONFIGS[0]  # 20 - 5 = 15 µs better


def test_pins_files_round_trip_and_name_what_is_wrong(tmp_path):
    pins = {A: CONFIGS[2], B: CONFIGS[0]}
    path = mg.pins_file(tmp_path, "NVIDIA H100 80GB HBM3")
    assert path.name == "NVIDIA_H100_80GB_HBM3.json"
    mg.write_pins(path, pins, device="NVIDIA H100 80GB HBM3")
    assert mg.read_pins(path) == pins
    assert json.loads(path.read_text())["device"] == "NVIDIA H100 80GB HBM3"
    for body, message in [("not json", "not a pins file"), ('{"pins": 3}', "not a pins file"),
                          ('{"pins": {"1,2,3": {}}}', "'1,2,3' is not N,K,mode,group_size"),
                          ('{"pins": {"1,2,3,4,2": {}}}', "is not N,K,mode,group_size"),
                          ('{"pins": {"64,128,2,128": {"BLOCK_N": 48}}}', "not a config of the MMA GEMV's")]:
        path.write_text(body)
        with pytest.raises(ValueError, match=message):
            mg.read_pins(path)


def test_load_or_tune_reads_a_saved_file_and_retunes_a_broken_one(tmp_path, caplog):
    """A later start reads what an earlier one tuned; a start whose shapes the file lacks (another model on the same
    GPU) tunes and keeps both; a broken file is tuned again and replaced."""
    path = tmp_path / "kernel-pins" / "GPU.json"
    tuned = []

    def tune(shape=A):
        def run():
            tuned.append(shape)
            return {shape: CONFIGS[len(tuned)]}
        return run

    assert graph_tune.load_or_tune(path, {A}, tune()) == ({A: CONFIGS[1]}, "tuned")
    assert graph_tune.load_or_tune(path, {A}, tune()) == ({A: CONFIGS[1]}, "read")
    assert tuned == [A]
    assert graph_tune.load_or_tune(path, {B}, tune(B)) == ({A: CONFIGS[1], B: CONFIGS[2]}, "tuned")
    assert mg.read_pins(path) == {A: CONFIGS[1], B: CONFIGS[2]}
    path.write_text('{"pins": {"64,128": {}}}')
    assert graph_tune.load_or_tune(path, {A}, tune()) == ({A: CONFIGS[3]}, "tuned")
    assert "tuning again" in caplog.text and mg.read_pins(path) == {A: CONFIGS[3]}


def test_the_descent_starts_from_what_each_looked_up_shape_runs_now(monkeypatch):
    """A pinned shape starts at its pin, another at the autotuner's pick; a shape neither has (never launched
    through the autotuner) is left out."""
    monkeypatch.setattr(mg, "LOOKED_UP", {A, B, (64, 64, 2, 128)})
    monkeypatch.setitem(mg.PINNED, A, CONFIGS[3])
    monkeypatch.setattr(graph_tune, "autotuned_picks", lambda: {A: CONFIGS[0], B: CONFIGS[4]})
    assert graph_tune.current_picks(torch.device("cpu")) == {A: CONFIGS[3], B: CONFIGS[4]}


def test_serve_flag_reaches_the_setting():
    import argparse

    from scaleserve.server.cli import build_parser
    from scaleserve.server.main import settings_from_args

    args = build_parser().parse_args(["serve", "--tune-decode-graph"])
    assert isinstance(args, argparse.Namespace) and settings_from_args(args).tune_decode_graph is True
    assert settings_from_args(build_parser().parse_args(["serve"])).tune_decode_graph is False
