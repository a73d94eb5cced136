"""``fastdit calibrate`` and ``fastdit generate --attention paro`` (CPU, offline tiny model)."""

import pytest

from fastdit import cli
from fastdit.methods.paro import ParoPlan

SMALL = ["--height", "64", "--width", "64", "--num-frames", "9", "--steps", "2"]
FAST = ["--guidance-scale", "1", "--dtype", "bfloat16"]


def test_calibrate_help_states_every_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["calibrate", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--prompt", "--steps", "--density", "--recall", "--buckets", "--block-size", "--output"):
        assert f"{flag} " in text, flag
    calibrate = cli.build_parser()._subparsers._group_actions[0].choices["calibrate"]
    for action in calibrate._actions:
        if action.option_strings and action.dest not in ("help", "recall"):
            assert "default" in action.help, action.option_strings


def test_calibrate_then_generate_with_the_plan(tmp_path, capsys):
    plan_path = tmp_path / "plan.safetensors"
    argv = ["calibrate", *SMALL, *FAST, "--buckets", "2", "--block-size", "64", "--recall", "0.9"]
    assert cli.main([*argv, "--prompt", "a cat", "--prompt", "a dog", "-o", str(plan_path)]) == 0
    stdout = capsys.readouterr().out
    for needle in ("fastdit calibrate", "grid (3, 4, 4)", "target recall 0.9", str(plan_path), "kB",
                   f"--attention paro --attention-opt plan={plan_path}"):
        assert needle in stdout, (needle, stdout)
    plan = ParoPlan.load(plan_path)
    assert plan.metadata["calibration"]["prompts"] == 2 and plan.metadata["num_steps"] == 2
    assert plan.metadata["calibration"]["collected_steps"] == [0, 1]
    assert "collecting block mass on 2 of 2 steps x 2 prompt(s)" in stdout

    video = tmp_path / "paro.mp4"
    generate = ["generate", *SMALL, *FAST, "--attention", "paro"]
    assert cli.main([*generate, "--attention-opt", f"plan={plan_path}", "-o", str(video)]) == 0
    stdout = capsys.readouterr().out
    assert "paro(quantize='int8'" in stdout and "density" in stdout and video.exists()

    # The plan is for 64x64 px: another size is bad input (exit 2), refused before generating
    # with the grids named.
    other = ["generate", "--steps", "1", *FAST, "--attention", "paro"]
    assert cli.main([*other, "--attention-opt", f"plan={plan_path}", "-o", str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err
    assert "calibrated for grid (3, 4, 4), not (5, 6, 10)" in err and "Traceback" not in err, err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["generate", "--attention", "paro"], "fastdit calibrate"),
        (["generate", "--attention", "paro", "--attention-opt", "plan=missing.safetensors"], "does not exist"),
        (["calibrate", "--steps", "2", "--buckets", "3"], "buckets=3 for steps=2"),
        (["calibrate", "--density", "0"], "(0, 1]"),
        (["calibrate", "--density", "0.3", "--recall", "0.9"], "not allowed with argument"),
        (["calibrate", "--height", "100"], "height=100"),
        (["calibrate", "--steps", "8", "--buckets", "4", "--calibration-steps", "3"], "[4, 8]"),
        (["calibrate", "--steps", "8", "--calibration-steps", "9"], "got 9"),
    ],
)
def test_bad_paro_command_lines_exit_2(tmp_path, capsys, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    try:
        rc = cli.main(argv)
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_calibration_steps_collect_only_the_spread_steps(tmp_path, capsys):
    plan_path = tmp_path / "plan.safetensors"
    argv = ["calibrate", *SMALL[:-1], "5", *FAST, "--buckets", "2", "--calibration-steps", "3"]
    assert cli.main([*argv, "-o", str(plan_path)]) == 0
    assert "on 3 of 5 steps x 1 prompt(s)" in capsys.readouterr().out
    calibration = ParoPlan.load(plan_path).metadata["calibration"]
    assert calibration["collected_steps"] == [0, 2, 4]
    assert calibration["calls_per_bucket"] == [2 * 2, 1 * 2]  # steps 0, 2 | 4; 2 layers each


def test_spread_steps():
    from fastdit.methods.paro.calibrate import spread_steps

    assert spread_steps(50, 10) == [0, 5, 11, 16, 22, 27, 33, 38, 44, 49]
    assert spread_steps(50, 50) == list(range(50))
    assert spread_steps(7, 1) == [0]
    for count in (0, 51, 2.5, True):
        with pytest.raises(ValueError, match="calibration steps"):
            spread_steps(50, count)
