"""Reservations: what the transfer engine reserves ahead, hands out, and gives back."""

from __future__ import annotations

from client.reservations import Reservations


def _extents(sizes: list[int], first_handle: int = 1) -> list[dict[str, int]]:
    return [{"handle": first_handle + i, "segment": 0, "offset": 0, "size_bytes": s} for i, s in enumerate(sizes)]


def _handles(extents: list[dict[str, int]]) -> list[int]:
    return sorted(e["handle"] for e in extents)


def test_first_run_reserves_what_it_needs_then_the_profile_reserves_the_whole_layer() -> None:
    r = Reservations(idle_s=2.0)
    assert r.begin(0) == [] and r.plan([100, 200]) == [100, 200]  # no profile yet: just the batch
    r.add(_extents([100, 200]), now=0.0)
    assert r.take(100)["handle"] == 1 and r.take(200)["handle"] == 2
    assert r.begin(0) == [] and r.plan([300]) == [300]  # same run, a later batch
    r.add(_extents([300], 3), now=0.0)
    assert r.take(300) is not None
    assert r.begin(1) == [] and r.plan([50]) == [50]  # layer 1 begins: layer 0's profile is kept
    r.add(_extents([50], 4), now=0.0)
    r.take(50)
    assert r.end_run() == []
    # Next step: layer 0's first tensor reserves all of layer 0 in one request.
    r.begin(0)
    assert r.plan([100]) == [100, 200, 300]
    r.add(_extents([100, 200, 300], 10), now=1.0)
    assert [r.take(s)["handle"] for s in (100, 200, 300)] == [10, 11, 12]
    assert r.plan([200]) == [200]  # more than the profile: asked for, not assumed
    assert r.spare_bytes == 0


def test_untaken_spares_are_given_back_when_the_run_ends_and_the_profile_is_dropped() -> None:
    r = Reservations(idle_s=2.0)
    r.begin(0)
    r.plan([100, 100, 200])
    r.end_run()
    r.begin(0)
    assert r.plan([100]) == [100, 100, 200]
    r.add(_extents([100, 100, 200]), now=10.0)
    r.take(100)
    assert r.spare_bytes == 300
    assert _handles(r.begin(1)) == [2, 3]  # a new layer ends layer 0's run
    assert (r.spare_bytes, r.take(100)) == (0, None)
    r.end_run()
    r.begin(0)
    assert r.plan([100]) == [100]  # layer 0's shapes changed: no profile, no reserving ahead


def test_spares_expire_after_idle_s_inside_an_open_run() -> None:
    r = Reservations(idle_s=2.0)
    r.begin(0)
    r.plan([64])
    r.end_run()
    r.begin(0)
    r.add(_extents(r.plan([])), now=10.0)  # reserved at the start of the run, nothing taken yet
    assert r.seconds_to_expiry(11.0) == 1.0
    assert r.expired(11.5) == []
    assert _handles(r.expired(12.0)) == [1]
    assert (r.spare_bytes, r.seconds_to_expiry(12.0)) == (0, None)


def test_drain_returns_every_spare() -> None:
    r = Reservations(idle_s=2.0)
    r.add(_extents([64, 128, 128]), now=0.0)
    assert _handles(r.drain()) == [1, 2, 3]
    assert (r.spare_bytes, r.take(128)) == (0, None)
