"""Pure parts of the ServerApp: reply polling, weighted means, the round record."""

from types import SimpleNamespace

import pytest

from flowerlab_app import server_app


class FakeGrid:
    """Replies arrive on the given pulls (1-based pull number -> message ids answered)."""

    def __init__(self, schedule: dict[int, list[str]]):
        self.schedule = schedule
        self.pulls = 0
        self.run_id = 5

    def push_messages(self, messages):
        return [m.id for m in messages]

    def pull_messages(self, ids):
        self.pulls += 1
        return [
            SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in self.schedule.get(self.pulls, [])
        ]


def messages(*ids: str) -> list:
    """Messages with these ids, to nodes 101, 102, ... in order."""
    return [SimpleNamespace(id=i, metadata=SimpleNamespace(dst_node_id=101 + n)) for n, i in enumerate(ids)]


def test_fast_grid_polls_until_every_reply_and_delegates_the_rest():
    grid = FakeGrid({1: ["a"], 3: ["b"]})
    fast = server_app.FastPollGrid(grid, poll=0.01)
    replies = fast.send_and_receive(messages("a", "b"), timeout=5)
    assert [r.metadata.reply_to_message_id for r in replies] == ["a", "b"]
    assert grid.pulls == 3
    assert fast.run_id == 5
    assert fast.unanswered == [] and fast.sent_to == {"a": 101, "b": 102}


def test_fast_grid_stops_at_the_timeout_with_what_came_and_names_the_unanswered_nodes():
    grid = FakeGrid({1: ["a"]})
    fast = server_app.FastPollGrid(grid, poll=0.01)
    replies = fast.send_and_receive(messages("a", "b", "c"), timeout=0.1)
    assert len(replies) == 1
    assert fast.unanswered == [102, 103]


def test_fast_grid_closes_a_round_early_and_hands_late_replies_to_the_round():
    grid = FakeGrid({1: ["a"], 30: ["b"]})
    fast = server_app.FastPollGrid(grid, poll=0.01)
    late = []
    fast.on_late = lambda rnd, msg, seconds: late.append((rnd, msg.metadata.reply_to_message_id))
    fast.close_at(4, 0.1)
    assert len(fast.send_and_receive(messages("a", "b"))) == 1
    assert fast.unanswered == [102] and set(fast.late) == {"b"}
    fast.send_and_receive(messages("x"), timeout=0.5)  # "b" answers during the next exchange
    assert late == [(4, "b")]


def test_recorder_names_missing_and_failed_clients_by_node(tmp_path):
    run = SimpleNamespace(num_server_rounds=2, straggler_policy="static")
    rec = server_app.Recorder(7, run, {}, tmp_path)
    rec.node_names = {101: "client-a"}
    rec.start_round(2, nodes=3)
    rec.add_missing([101], [(102, "5: node unavailable")])
    assert rec.current["missing"] == ["client-a"] and rec.current["dropped"] == 1
    assert rec.current["failed"] == [{"client": "node 102", "error": "5: node unavailable"}]
    assert (rec.dropped, rec.failed) == (1, 1)


def test_node_names_are_kept_beside_the_runs(tmp_path):
    """A client that replied in an earlier run is named in this run's errors before it replied here."""
    run = SimpleNamespace(num_server_rounds=2, straggler_policy="static")
    first = server_app.Recorder(7, run, {}, tmp_path)
    first.start_round(1, nodes=1)
    reply = SimpleNamespace(
        has_error=lambda: False,
        metadata=SimpleNamespace(src_node_id=101, reply_to_message_id="m1"),
        content={"device": {"client": "client-a", "tier": "iot", "host": "h"}, "metrics": {"fit-seconds": 1.0}},
    )
    first.add_clients([reply], key="")
    later = server_app.Recorder(8, run, {}, tmp_path)
    assert later.client_of(101) == "client-a" and later.client_of(102) == "node 102"


def test_weighted_mean_skips_entries_without_value_or_weight():
    entries = [{"acc": 0.5, "n": 10}, {"acc": 1.0, "n": 30}, {"acc": 0.0}, {"n": 5}]
    assert server_app.weighted_mean(entries, "acc", "n") == pytest.approx(0.875)
    assert server_app.weighted_mean([], "acc", "n") is None


class CountingGrid:
    """get_node_ids answers the next count of `counts` (the last one from then on)."""

    def __init__(self, counts):
        self.counts = list(counts)

    def get_node_ids(self):
        n = self.counts.pop(0) if len(self.counts) > 1 else self.counts[0]
        return list(range(n))


def test_waiting_for_nodes_reports_every_new_count_then_starts():
    seen = []
    grid = CountingGrid([3, 2, 2, 3])
    assert server_app.wait_for_nodes(grid, 3, timeout=5, poll=0.01, when=" round 2", counted=seen.append) == 3
    assert seen == [3]  # enough at once: nothing to wait for
    seen.clear()
    grid = CountingGrid([2, 2, 1, 3])
    assert server_app.wait_for_nodes(grid, 3, timeout=5, poll=0.01, when=" round 2", counted=seen.append) == 3
    assert seen == [2, 1, 3]


def test_waiting_for_nodes_gives_up_at_the_timeout_naming_the_keys():
    seen = []
    with pytest.raises(server_app.NodesMissing, match="only 2 of the 3 expected SuperNodes.*'node-wait-timeout'"):
        server_app.wait_for_nodes(CountingGrid([2]), 3, timeout=0.05, poll=0.01, when=" round 4", counted=seen.append)
    assert seen == [2]
