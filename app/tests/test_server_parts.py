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
        return [m for m in messages]

    def pull_messages(self, ids):
        self.pulls += 1
        return [
            SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in self.schedule.get(self.pulls, [])
        ]


def test_fast_grid_polls_until_every_reply_and_delegates_the_rest():
    grid = FakeGrid({1: ["a"], 3: ["b"]})
    fast = server_app.FastPollGrid(grid, poll=0.01)
    replies = fast.send_and_receive(["a", "b"], timeout=5)
    assert [r.metadata.reply_to_message_id for r in replies] == ["a", "b"]
    assert grid.pulls == 3
    assert fast.run_id == 5


def test_fast_grid_stops_at_the_timeout_with_what_came():
    grid = FakeGrid({1: ["a"]})
    replies = server_app.FastPollGrid(grid, poll=0.01).send_and_receive(["a", "b"], timeout=0.1)
    assert len(replies) == 1


def test_weighted_mean_skips_entries_without_value_or_weight():
    entries = [{"acc": 0.5, "n": 10}, {"acc": 1.0, "n": 30}, {"acc": 0.0}, {"n": 5}]
    assert server_app.weighted_mean(entries, "acc", "n") == pytest.approx(0.875)
    assert server_app.weighted_mean([], "acc", "n") is None
