"""``sfvideo curves``: the event files of a (resumed) run become one PNG and one CSV; bad input is one line."""

import csv

import pytest
from torch.utils.tensorboard import SummaryWriter

from sfvideo.cli import main
from sfvideo.curves import smooth


def _write(folder, points, tag="train/loss"):
    w = SummaryWriter(str(folder))
    for step, value in points:
        w.add_scalar(tag, value, step)
    w.close()


def test_a_resumed_run_is_merged_by_step_the_later_session_winning(tmp_path):
    run = tmp_path / "version_0"
    _write(run / "a", [(0, 4.0), (1, 3.0), (2, 2.5)])
    _write(run / "b", [(2, 2.0), (3, 1.0)])  # the resumed session re-logs step 2
    main(["curves", str(run), "--out", str(tmp_path / "loss.png")])
    assert (tmp_path / "loss.png").stat().st_size > 0
    rows = list(csv.reader((tmp_path / "loss.csv").open()))
    assert rows == [["step", "train/loss"], ["0", "4.0"], ["1", "3.0"], ["2", "2.0"], ["3", "1.0"]]


def test_smoothing_is_the_debiased_ema():
    assert smooth([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])  # debiased: a constant stays put
    # w = 0.5: s1 = 0.5, s2 = 0.25 + 1.5 = 1.75; debiased by 1 - w^i: 0.5 / 0.5 = 1, 1.75 / 0.75 = 7/3
    assert smooth([1.0, 3.0], 0.5) == pytest.approx([1.0, 7 / 3])


def test_bad_input_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit, match="no TensorBoard event files"):
        main(["curves", str(tmp_path), "--out", str(tmp_path / "x.png")])
    _write(tmp_path / "run", [(0, 1.0)])
    with pytest.raises(SystemExit, match="no scalar 'train/nope'; the run logs \\['train/loss'\\]"):
        main(["curves", str(tmp_path / "run"), "--tags", "train/nope", "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit, match="must be a .png"):
        main(["curves", str(tmp_path / "run"), "--out", str(tmp_path / "x.jpg")])
