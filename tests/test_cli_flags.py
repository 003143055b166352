"""Flags every subcommand of a tool shares: `-v` is taken before the command and after it (the README's
"`-v` shows them" for `arc2face-export onnx ... -v` was refused as an unrecognised argument)."""
from __future__ import annotations

import pytest

from arc2face_export.cli import build_parser as export_parser
from arc2face_ref.train.cli import build_parser as train_parser
from arc2face_rt.cli import build_parser as rt_parser

CASES = [
    (export_parser, ["onnx", "--model-dir", "m", "--out", "o"]),
    (rt_parser, ["cache", "list"]),                       # a subcommand of a subcommand
    (rt_parser, ["info", "--engines", "e"]),
    (train_parser, ["fit", "--model-dir", "m", "--data", "d", "--out", "o"]),
]


@pytest.mark.parametrize("build, argv", CASES, ids=["export-onnx", "rt-cache-list", "rt-info", "train-fit"])
def test_verbose_is_taken_before_and_after_the_command(build, argv):
    p = build()
    assert p.parse_args(argv).verbose is False
    assert p.parse_args(["-v", *argv]).verbose is True
    assert p.parse_args([*argv, "-v"]).verbose is True
    assert p.parse_args([*argv, "--verbose"]).verbose is True
