"""The command line checks every number before any work starts, and ends errors in one line."""
import argparse

import pytest

from hybrid_lm import cli

RANGES = {cli.positive_int: ("1", ["0", "-3", "2.5", "x"]), cli.non_negative_int: ("0", ["-1", "x"]),
          cli.positive_float: ("1e-3", ["0", "-1", "nan", "inf"]),
          cli.non_negative_float: ("0", ["-0.5", "nan"]), cli.unit_float: ("1", ["-0.1", "1.5"])}


def commands(parser: argparse.ArgumentParser, name: str = "hybrid-lm"):
    """(name, parser) of every command and subcommand."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from commands(sub, f"{name} {sub_name}")


NUMERIC = [(name, action) for name, parser in commands(cli.build_parser()) for action in parser._actions
           if action.type in (int, float) or action.type in RANGES]


@pytest.mark.parametrize("name,action", NUMERIC, ids=[f"{n} {a.option_strings[0]}" for n, a in NUMERIC])
def test_every_number_has_a_range(name, action):
    assert action.type in RANGES, f"{name} {action.option_strings}: a bare {action.type.__name__} takes any value"
    good, bad = RANGES[action.type]
    action.type(good)
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError, match="expected"):
            action.type(text)


@pytest.mark.parametrize("argv", [
    ["pretrain", "--save-every", "0"], ["pretrain", "--log-every", "0"], ["pretrain", "--eval-every", "0"],
    ["pretrain", "--grad-accum", "0"], ["pretrain", "--max-steps", "0"], ["pretrain", "--max-steps", "-3"],
    ["pretrain", "--tokens", "0"], ["pretrain", "--batch-size", "0"], ["pretrain", "--lr", "-1"],
    ["distill", "--teacher", "t", "--kd-weight", "1.5"], ["agent", "sft", "--policy", "p", "--demos", "d",
                                                          "--save-every", "0"],
])
def test_bad_numbers_stop_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert "expected" in capsys.readouterr().err


def test_errors_end_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    assert cli.main(["distill", "--teacher", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hybrid-lm distill: error:" in err and "nowhere" in err and "no such" in err
    assert not (tmp_path / "out").exists()  # refused before anything was written
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(FileNotFoundError):
        cli.main(["distill", "--teacher", str(tmp_path / "nowhere")])
