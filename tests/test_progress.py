from train.progress import format_progress, last_progress, parse_progress_line


def test_progress_lines_round_trip():
    line = format_progress("train", 10, 100, loss=0.12345678, lr=1e-4, s_per_step=0.51234, eta_s=46.1)
    assert line.startswith("PROGRESS {")
    rec = parse_progress_line("2026-11-28T10:00:00Z " + line)  # log prefixes are tolerated
    assert rec == {
        "phase": "train",
        "step": 10,
        "total": 100,
        "loss": 0.123457,
        "lr": 0.0001,
        "s_per_step": 0.5123,
        "eta_s": 46.1,
    }


def test_other_lines_are_ignored():
    for text in (
        "",
        "dataset: 8 images used",
        "PROGRESS {broken",
        'PROGRESS {"phase": "nope", "step": 1, "total": 2}',
        'PROGRESS {"phase": "train", "step": "1", "total": 2}',
        "PROGRESS [1, 2]",
    ):
        assert parse_progress_line(text) is None
    log = "\n".join(
        [format_progress("cache", 1, 2), "noise", format_progress("train", 3, 9, loss=1.0), "tail"]
    )
    assert last_progress(log)["step"] == 3
    assert last_progress("nothing here") is None
