import json

import pytest

from flowerlab_app import experiment


def history(run_id: str, policy: str, accuracies: list[float], round_seconds: float, fits: dict) -> dict:
    """A stored history: every round the same length and the same fit seconds per client."""
    rounds = []
    for i, accuracy in enumerate(accuracies, start=1):
        slowest = max(fits.values())
        rounds.append(
            {
                "round": i,
                "accuracy": accuracy,
                "round_seconds": round_seconds,
                "overhead_seconds": round_seconds - slowest,
                "elapsed_seconds": i * round_seconds,
                "idle_fraction": sum(slowest - f for f in fits.values()) / (len(fits) * round_seconds),
                "dropped": 0,
                "clients": {
                    name: {
                        "tier": name.split("-")[0],
                        "fit-seconds": fit,
                        "idle-seconds": slowest - fit,
                        "steps": int(fit * 10),
                        "samples-per-second": 100.0,
                    }
                    for name, fit in fits.items()
                },
            }
        )
    return {"run_id": run_id, "num_rounds": len(rounds), "status": "completed", "policy": policy, "rounds": rounds}


def test_plan_runs_seed_by_seed_every_policy(run_config):
    runs = experiment.plan_runs(["static", "deadline"], [1, 2], {"num-server-rounds": 3}, run_config)
    assert [r["key"] for r in runs] == ["static-seed1", "deadline-seed1", "static-seed2", "deadline-seed2"]
    assert runs[1]["config"] == {"num-server-rounds": 3, "straggler-policy": "deadline", "training-seed": 1}


@pytest.mark.parametrize(
    ("policies", "seeds", "config", "message"),
    [
        (["static", "fastest"], [1], {}, "policies: fastest; allowed: static, deadline, drop-stragglers"),
        ([], [1], {}, "policies: none given"),
        (["static"], [0], {}, "seeds: \\[0\\]; expected distinct integers >= 1"),
        (["static"], [1, 1], {}, "expected distinct"),
        (["static", "static"], [1], {}, "each at most once"),
        (["static"], [1], {"rounds": 3}, "unknown key\\(s\\) rounds"),
        (["deadline"], [1], {"deadline-seconds": -2.0}, "deadline, seed 1: run config: key 'deadline-seconds' is -2.0"),
    ],
)
def test_bad_plans_are_refused_before_anything_runs(run_config, policies, seeds, config, message):
    with pytest.raises(experiment.ExperimentError, match=message):
        experiment.plan_runs(policies, seeds, config, run_config)


def test_a_plan_is_kept_on_a_second_call_and_another_plan_is_refused(tmp_path, run_config):
    runs = experiment.plan_runs(["static"], [1], {}, run_config)
    directory = experiment.experiment_dir(tmp_path, "exp")
    _, written = experiment.plan(directory, runs, 0.85)
    assert written
    saved = json.loads((directory / "experiment.json").read_text())
    saved["runs"][0].update(run_id="5", status="completed")
    (directory / "experiment.json").write_text(json.dumps(saved))
    kept, written = experiment.plan(directory, runs, 0.85)
    assert not written and kept["runs"][0]["status"] == "completed"  # nothing lost on a re-run
    with pytest.raises(experiment.ExperimentError, match="exists at .* with another plan"):
        experiment.plan(directory, experiment.plan_runs(["deadline"], [1], {}, run_config), 0.85)
    with pytest.raises(experiment.ExperimentError, match="experiment name"):
        experiment.experiment_dir(tmp_path, "../up")


def test_run_all_skips_completed_runs_and_names_unknown_ones(tmp_path, run_config):
    directory = experiment.experiment_dir(tmp_path, "exp")
    runs = experiment.plan_runs(["static"], [1], {}, run_config)
    experiment.plan(directory, runs, 0.85)
    saved = json.loads((directory / "experiment.json").read_text())
    saved["runs"][0].update(run_id="5", status="completed")
    (directory / "experiment.json").write_text(json.dumps(saved))
    lines = []
    experiment.run_all(directory, tmp_path, "lab", tmp_path, 1, out=lines.append)
    assert lines == ["static-seed1: completed before (run 5), kept"]
    with pytest.raises(experiment.ExperimentError, match="no run 'deadline-seed1'; its runs: static-seed1"):
        experiment.run_all(directory, tmp_path, "lab", tmp_path, 1, out=lines.append, only="deadline-seed1")


def stored_experiment(tmp_path) -> tuple:
    directory = tmp_path / "experiments" / "exp"
    plan = {
        "name": "exp",
        "target": 0.85,
        "runs": [
            {"key": "static-seed1", "policy": "static", "seed": 1, "run_id": "1", "status": "completed"},
            {"key": "deadline-seed1", "policy": "deadline", "seed": 1, "run_id": "2", "status": "completed"},
            {"key": "static-seed2", "policy": "static", "seed": 2, "run_id": "3", "status": "completed"},
            {"key": "deadline-seed2", "policy": "deadline", "seed": 2, "run_id": "4", "status": "completed"},
        ],
    }
    experiment.save(directory, plan)
    # static: rounds of 20 s, fits 8/4/2 -> idle (0 + 4 + 6) / (3 x 20) = 1/6; 0.85 at round 3 (60 s) or 4 (80 s)
    # deadline: rounds of 13 s, fits 3/3/3 -> idle 0; 0.85 at round 3 (39 s) in both seeds
    fits_static = {"iot-a": 8.0, "phone-b": 4.0, "laptop-c": 2.0}
    fits_deadline = {"iot-a": 3.0, "phone-b": 3.0, "laptop-c": 3.0}
    stored = {
        "static-seed1": history("1", "static", [0.1, 0.5, 0.9, 0.95], 20.0, fits_static),
        "deadline-seed1": history("2", "deadline", [0.2, 0.6, 0.86, 0.94], 13.0, fits_deadline),
        "static-seed2": history("3", "static", [0.1, 0.5, 0.8, 0.96], 20.0, fits_static),
        "deadline-seed2": history("4", "deadline", [0.2, 0.7, 0.9, 0.95], 13.0, fits_deadline),
    }
    for key, h in stored.items():
        (directory / "runs" / key).mkdir(parents=True)
        (directory / "runs" / key / "history.json").write_text(json.dumps(h))
    return directory, plan, stored


def test_comparison_by_hand(tmp_path):
    _, plan, stored = stored_experiment(tmp_path)
    comparison = experiment.compare(plan, stored)
    static, deadline = comparison["policies"]["static"], comparison["policies"]["deadline"]
    assert static["time_to_target"] == {"mean": 70.0, "min": 60.0, "max": 80.0, "missing": 0}
    assert deadline["time_to_target"] == {"mean": 39.0, "min": 39.0, "max": 39.0, "missing": 0}
    assert deadline["speedup_vs_static"] == pytest.approx(70 / 39)
    assert static["idle_fraction"]["mean"] == pytest.approx(1 / 6)
    assert deadline["idle_fraction"]["mean"] == 0.0
    assert static["final_accuracy"]["mean"] == pytest.approx(0.955)
    assert comparison["runs"]["deadline-seed1"]["steps"]["iot-a"] == [30, 30, 30, 30]


def test_report_from_stored_histories(tmp_path):
    directory, _, _ = stored_experiment(tmp_path)
    experiment.build_report(directory)
    for key in ("static-seed1", "deadline-seed2"):
        for png in ("accuracy.png", "fit_seconds.png", "idle_seconds.png"):
            assert (directory / "runs" / key / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (directory / "accuracy_vs_time.png").read_bytes()[:4] == b"\x89PNG"
    md = (directory / "report.md").read_text()
    assert "| deadline | 2 | 39 | 1.79x | 0.945 (0.940–0.950) | 13.0 | 0.000 | 0 |" in md
    assert "| static | 2 | 70 (60–80) | 1.00x | 0.955 (0.950–0.960) | 20.0 | 0.167 | 0 |" in md
    assert "![idle seconds](runs/static-seed1/idle_seconds.png)" in md
    html = (directory / "report.html").read_text()
    assert "<img src='accuracy_vs_time.png'" in html and "<td>deadline</td>" in html
    summary = json.loads((directory / "summary.json").read_text())
    assert summary["policies"]["deadline"]["speedup_vs_static"] == pytest.approx(70 / 39)
    lines = experiment.summary_lines(summary)
    assert lines[1].startswith("deadline: 0.85 accuracy after 39 s, final accuracy 0.945 (0.940–0.950)")
    assert lines[1].endswith("straggler idle fraction 0.000; 1.79x sooner than static")


def test_a_target_never_reached_is_said_so():
    comparison = {
        "target": 0.85,
        "policies": {
            "static": {
                "seeds": 1,
                "time_to_target": {"mean": None, "min": None, "max": None, "missing": 1},
                "final_accuracy": {"mean": 0.5, "min": 0.5, "max": 0.5, "missing": 0},
                "mean_round_seconds": {"mean": 10.0, "min": 10.0, "max": 10.0, "missing": 0},
                "idle_fraction": {"mean": 0.1, "min": 0.1, "max": 0.1, "missing": 0},
                "dropped": {"mean": 0, "min": 0, "max": 0, "missing": 0},
                "speedup_vs_static": None,
            }
        },
    }
    assert experiment.summary_lines(comparison) == [
        "static: 0.85 accuracy not reached, final accuracy 0.500, mean round 10.0 s, straggler idle fraction 0.100"
    ]


def test_report_without_histories_says_to_run_first(tmp_path, run_config):
    directory = experiment.experiment_dir(tmp_path, "exp")
    experiment.plan(directory, experiment.plan_runs(["static"], [1], {}, run_config), 0.85)
    with pytest.raises(experiment.ExperimentError, match="no run of experiment exp has a history yet"):
        experiment.build_report(directory)
