"""Straggler policies: how a round copes with clients of unequal speed (run config `straggler-policy`).

static           Every client trains `local-epochs` over its partition; the round waits for the slowest
                 (FedAvg, the baseline).
deadline         Every client trains for the same time budget: as many steps as fit in it at its own
                 measured speed (`step_budget`), ending early when the budget runs out before those
                 steps do (a stall, a busy machine). The budget is `deadline-seconds`, or with 0 the median
                 over clients of the time each needs for `local-epochs` (`auto_budget`), from the speeds
                 measured (a query before round 1, then every round's training); a client without a
                 measured speed trains `local-epochs`.
                 Aggregation weighs each model by the samples it trained on (steps x batch size).
drop-stragglers  Every client trains `local-epochs`; the round closes `deadline-seconds` after it sent
                 its messages (0: the median client's reply time in the previous round times
                 1 + `deadline-slack`); replies that come later are discarded and counted.

Why weigh by samples trained under `deadline`: a slow client's model moved fewer steps away from the
global model, so weighing it like a fast one (FedAvg's data-size weights) pulls the average back
towards the start of the round. Weighing by samples trained makes every trained sample count once, as
in one centralised SGD run over the same work, and it is FedAvg's weighting when every client trains
the same number of epochs. FedNova's normalisation (each update divided by its steps, the sum scaled by
the effective steps) also removes the objective drift that this weighting causes on non-IID partitions,
where fast clients' data would count more; with IID partitions (the lab's default) the two agree to
first order.

Straggler idle fraction of a round: the sum over the clients whose replies were aggregated of
(slowest fit seconds - own fit seconds), divided by (clients x round seconds): the share of the
round's client time spent waiting for the slowest client. 0 when every client trains equally long.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from statistics import median

POLICIES = ("static", "deadline", "drop-stragglers")


class PolicyError(ValueError):
    """A straggler-policy setting is unknown or impossible."""


@dataclass(frozen=True)
class Policy:
    """The straggler policy of a run and its parameters."""

    name: str = "static"
    deadline_seconds: float = 0.0
    deadline_slack: float = 0.2

    def __post_init__(self):
        if self.name not in POLICIES:
            raise PolicyError(f"run config: key 'straggler-policy' is {self.name!r}; allowed: {', '.join(POLICIES)}")
        if not math.isfinite(self.deadline_seconds) or self.deadline_seconds < 0:
            raise PolicyError(
                f"run config: key 'deadline-seconds' is {self.deadline_seconds}; expected 0 (measured) or seconds > 0"
            )
        if not math.isfinite(self.deadline_slack) or not 0 <= self.deadline_slack <= 10:
            raise PolicyError(f"run config: key 'deadline-slack' is {self.deadline_slack}; expected 0 <= value <= 10")

    def train_budget(self, latest: Mapping[str, dict], local_epochs: int) -> float:
        """Seconds each client may train this round (deadline), 0 for no budget (train local-epochs)."""
        if self.name != "deadline":
            return 0.0
        return self.deadline_seconds or auto_budget(latest.values(), local_epochs)

    def reply_deadline(self, latest: Mapping[str, dict]) -> float | None:
        """Seconds after sending at which the round closes (drop-stragglers), None to wait for every reply."""
        if self.name != "drop-stragglers":
            return None
        if self.deadline_seconds:
            return self.deadline_seconds
        replies = [c["reply-seconds"] for c in latest.values() if c.get("reply-seconds")]
        return median(replies) * (1 + self.deadline_slack) if replies else None

    def weight_key(self) -> str:
        """The reply metric aggregation weighs by."""
        return "samples-trained" if self.name == "deadline" else "num-examples"


# A round that is not closed by its policy waits for a reply at most this factor times the slowest reply
# of the previous rounds, and at least REPLY_GUARD_MIN_SECONDS (run config key reply-timeout = 0).
REPLY_GUARD_FACTOR = 3.0
REPLY_GUARD_MIN_SECONDS = 120.0


def reply_guard(latest: Mapping[str, dict], fixed: float = 0.0) -> float | None:
    """Seconds after sending at which any round closes and counts the replies still missing.

    A SuperNode that restarts during a round keeps its node id (SuperNode authentication), so the
    SuperLink sees it online and never reports the message its previous process took as failed: without
    this bound the round would wait round-timeout for a reply that cannot come. `fixed` (reply-timeout)
    > 0 is used as it is; 0 means REPLY_GUARD_FACTOR x the slowest reply measured so far, at least
    REPLY_GUARD_MIN_SECONDS, and None (round-timeout) before any reply was measured (round 1).
    """
    if fixed > 0:
        return fixed
    replies = [c["reply-seconds"] for c in latest.values() if c.get("reply-seconds")]
    return max(REPLY_GUARD_MIN_SECONDS, REPLY_GUARD_FACTOR * max(replies)) if replies else None


def steps_per_epoch(examples: int, batch_size: int) -> int:
    return -(-examples // batch_size)


def step_budget(budget_seconds: float, seconds_per_step: float | None, default_steps: int) -> int:
    """Steps that fit in `budget_seconds` at `seconds_per_step`, at least one.

    Without a budget or a measured speed: `default_steps` (local-epochs over the partition).
    """
    if budget_seconds <= 0 or not seconds_per_step or seconds_per_step <= 0:
        return default_steps
    return max(1, math.floor(budget_seconds / seconds_per_step))


def needed_seconds(client: Mapping, local_epochs: int) -> float | None:
    """Seconds a client needs for `local-epochs` at its measured speed (None before it measured one)."""
    step = client.get("step-seconds")
    examples, batch = client.get("num-examples"), client.get("batch-size")
    if not step or not examples or not batch:
        return None
    return steps_per_epoch(int(examples), int(batch)) * local_epochs * float(step)


def auto_budget(clients: Iterable[Mapping], local_epochs: int) -> float:
    """The median over clients of the seconds each needs for `local-epochs` (0 before any measured)."""
    needed = [s for s in (needed_seconds(c, local_epochs) for c in clients) if s]
    return median(needed) if needed else 0.0


def aggregation_weights(entries: Iterable[Mapping], key: str) -> list[float]:
    """Normalised aggregation weights of the replies' `key` values (samples trained or examples)."""
    values = [float(e[key]) for e in entries]
    if any(v < 0 for v in values) or not values:
        raise PolicyError(f"aggregation weights need non-negative '{key}' values, got {values}")
    total = sum(values)
    if total == 0:
        return [1 / len(values)] * len(values)
    return [v / total for v in values]


def idle_seconds(fits: Mapping[str, float]) -> dict[str, float]:
    """Each client's seconds waiting for the slowest one: slowest fit - own fit."""
    slowest = max(fits.values(), default=0.0)
    return {name: slowest - fit for name, fit in fits.items()}


def idle_fraction(fits: Mapping[str, float], round_seconds: float) -> float | None:
    """Straggler idle fraction: sum(slowest - own fit) / (clients x round seconds)."""
    if not fits or round_seconds <= 0:
        return None
    return sum(idle_seconds(fits).values()) / (len(fits) * round_seconds)
