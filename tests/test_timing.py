"""costeff.inference.timing.time_interleaved with a fake clock: interleaving order, per-unit
division, median over rounds (a round that lost the CPU does not move it)."""
import pytest

from costeff.inference.timing import time_interleaved


def test_interleaved_median_per_unit():
    now = [0.0]
    order = []
    # per-call cost in fake seconds; round 2 of "slow" is hit by an outside load spike
    costs = {"fast": [1.0] * 5, "slow": [4.0, 4.0, 400.0, 4.0, 4.0]}
    calls = {"fast": 0, "slow": 0}

    def block(name, units):
        def run():
            order.append(name)
            i = calls[name]
            calls[name] += 1
            now[0] += costs[name][i - 1] * units if i else 0.0  # the warm-up call (i == 0) costs nothing
            return units
        return run

    stats = time_interleaved({"fast": block("fast", 2), "slow": block("slow", 8)}, rounds=5 - 1, warmup=1, clock=lambda: now[0])
    assert order == ["fast", "slow"] + ["fast", "slow"] * 4  # warm-up, then interleaved round by round
    assert stats["fast"]["median"] == 1.0 and stats["fast"]["units"] == 2 and stats["fast"]["rounds"] == 4
    assert stats["slow"]["median"] == 4.0 and stats["slow"]["min"] == 4.0  # the 400 s round is an outlier


def test_bad_blocks():
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        time_interleaved({"a": lambda: 1}, rounds=0)
    with pytest.raises(ValueError, match="did no work"):
        time_interleaved({"a": lambda: 0}, rounds=1, warmup=0)


def test_settle_pauses_before_every_block_untimed(monkeypatch):
    """settle_s sleeps before each timed block, outside the clock readings."""
    from costeff.inference import timing

    now = [0.0]
    sleeps = []
    monkeypatch.setattr(timing.time, "sleep", lambda s: (sleeps.append(s), now.__setitem__(0, now[0] + 100.0)))

    def clock():
        return now[0]

    def work():
        now[0] += 1.0
        return 1

    out = timing.time_interleaved({"a": work, "b": work}, rounds=3, clock=clock, settle_s=0.2)
    assert sleeps == [0.2] * 6  # 3 rounds x 2 candidates; the warm-up is not paused
    assert out["a"]["median"] == 1.0 and out["b"]["median"] == 1.0  # the pauses are not timed
