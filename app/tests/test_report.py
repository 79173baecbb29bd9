from flowerlab_app import report

HISTORY = {
    "run_id": "7",
    "num_rounds": 3,
    "status": "completed",
    "rounds": [
        {
            "round": 1,
            "accuracy": 0.1,
            "round_seconds": 40.0,
            "overhead_seconds": 10.0,
            "elapsed_seconds": 40.0,
            "idle_fraction": 0.25,  # (0 + 16 + 14) / (3 clients x 40 s)
            "clients": {
                "a": {"tier": "iot", "fit-seconds": 30.0, "samples-per-second": 20.0, "cpu-limit-cores": 0.5},
                "b": {"tier": "laptop", "fit-seconds": 14.0, "samples-per-second": 40.0, "cpu-limit-cores": 1.0},
                "c": {"tier": "laptop", "fit-seconds": 16.0, "samples-per-second": 36.0, "cpu-limit-cores": 1.0},
            },
        },
        {
            "round": 2,
            "accuracy": 0.875,
            "round_seconds": 20.0,
            "overhead_seconds": 6.0,
            "elapsed_seconds": 60.0,
            "idle_fraction": 0.175,  # (0 + 7) / (2 clients x 20 s)
            "clients": {
                "a": {"tier": "iot", "fit-seconds": 14.0, "samples-per-second": 40.0, "cpu-limit-cores": 0.5},
                "b": {"tier": "laptop", "fit-seconds": 7.0, "samples-per-second": 80.0, "cpu-limit-cores": 1.0},
            },
        },
    ],
}


def test_round_line_lists_tiers_slowest_first_with_their_mean():
    line = report.round_line(HISTORY["rounds"][0])
    assert line == (
        "round 1: accuracy 0.100, 40.0 s (overhead 10.0 s, idle 0.25); fit seconds per tier: iot 30.0, laptop 15.0"
    )


def test_round_line_names_the_budget_and_the_dropped_replies():
    rnd = {**HISTORY["rounds"][1], "budget_seconds": 6.5, "deadline_seconds": 18.0, "dropped": 1}
    assert report.round_line(rnd) == (
        "round 2: accuracy 0.875, 20.0 s (overhead 6.0 s, idle 0.17, budget 6.5 s, deadline 18.0 s, dropped 1); "
        "fit seconds per tier: iot 14.0, laptop 7.0"
    )


def test_time_to_accuracy_is_the_end_of_the_first_round_at_target():
    assert report.time_to_accuracy(HISTORY, 0.85) == 60.0
    assert report.time_to_accuracy(HISTORY, 0.1) == 40.0
    assert report.time_to_accuracy(HISTORY, 0.9) is None


def test_summary_has_status_final_accuracy_and_per_tier_figures():
    lines = report.summary(HISTORY)
    assert lines[0] == "run 7: completed, 2 of 3 rounds, straggler policy static"
    assert lines[1] == (
        "final accuracy 0.875 after 60 s; mean round 30.0 s, mean overhead 8.0 s, mean straggler idle fraction 0.212"
    )
    # iot: fits 30 and 14 (median 22), 30 samples/s median over a 0.5-core budget = 60 per core
    assert (
        lines[2]
        == "tier iot: fit 22.0 s per round (median; min 14.0, max 30.0), 30 samples/s, 60 samples/s per core of budget"
    )
    # laptop: fits 14, 16, 7 (median 14); samples/s 40, 36, 80 (median 40) over 1 core
    assert lines[3] == (
        "tier laptop: fit 14.0 s per round (median; min 7.0, max 16.0), 40 samples/s, 40 samples/s per core of budget"
    )


def test_failed_run_summary_names_the_error():
    lines = report.summary({**HISTORY, "status": "failed", "error": "InjectedFailure: as asked", "rounds": []})
    assert lines == ["run 7: failed, 0 of 3 rounds, straggler policy static", "error: InjectedFailure: as asked"]


def test_cli_waits_for_a_round_in_json(tmp_path, capsys):
    import json

    (tmp_path / "history.json").write_text(json.dumps({**HISTORY, "status": "running"}))
    report.main([str(tmp_path), "--round", "3", "--json"])
    assert json.loads(capsys.readouterr().out) == {"status": "running", "done": False, "num_rounds": 3, "lines": []}
    report.main([str(tmp_path), "--round", "2", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["done"] and out["lines"][0].startswith("round 2: accuracy 0.875")


def test_cli_without_history_says_so(tmp_path, capsys):
    report.main([str(tmp_path)])
    assert "no history yet" in capsys.readouterr().out


def test_a_run_whose_serverapp_died_is_failed_by_the_superlinks_word(tmp_path):
    import json
    import time

    run_dir = tmp_path / "7"
    run_dir.mkdir()
    history = {**HISTORY, "status": "running"}
    runs = {"polled_unix": time.time(), "runs": [{"run-id": "7", "status": "finished:failed"}]}
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    assert report.run_status(history, run_dir) == "failed"
    # A stale poll is not trusted, and the SuperLink never overrides a status the ServerApp wrote.
    (tmp_path / "runs.json").write_text(json.dumps({**runs, "polled_unix": time.time() - 600}))
    assert report.run_status(history, run_dir) == "running"
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    assert report.run_status({**HISTORY, "status": "completed"}, run_dir) == "completed"


def test_a_run_a_restarted_superlink_no_longer_knows_is_failed(tmp_path):
    import json
    import os
    import time

    run_dir = tmp_path / "8"
    run_dir.mkdir()
    (run_dir / "history.json").write_text("{}")
    written = time.time() - 60
    os.utime(run_dir / "history.json", (written, written))
    history = {**HISTORY, "status": "running"}
    (tmp_path / "runs.json").write_text(json.dumps({"polled_unix": time.time(), "runs": []}))
    assert report.run_status(history, run_dir) == "failed"
    # A poll from before the history was written proves nothing.
    (tmp_path / "runs.json").write_text(json.dumps({"polled_unix": written - 30, "runs": []}))
    os.utime(tmp_path / "runs.json", None)
    assert report.run_status(history, run_dir) == "running"


def test_cli_wait_returns_when_the_round_arrives(tmp_path, capsys):
    import json
    import threading
    import time

    (tmp_path / "history.json").write_text(json.dumps({**HISTORY, "status": "running", "rounds": []}))

    def write_round_two_later():
        time.sleep(1.5)
        (tmp_path / "history.json").write_text(json.dumps({**HISTORY, "status": "running"}))

    threading.Thread(target=write_round_two_later).start()
    started = time.monotonic()
    report.main([str(tmp_path), "--round", "2", "--wait", "30", "--json"])
    assert time.monotonic() - started < 10
    out = json.loads(capsys.readouterr().out)
    assert out["done"] and out["lines"][0].startswith("round 2:")
    # A failed run ends the wait at once, without the round.
    (tmp_path / "history.json").write_text(json.dumps({**HISTORY, "status": "failed"}))
    report.main([str(tmp_path), "--round", "3", "--wait", "30", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out == {"status": "failed", "done": False, "num_rounds": 3, "lines": []}
