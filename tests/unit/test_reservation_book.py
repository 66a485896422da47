"""Reservations: what the transfer engine reserves ahead, hands out, and gives back."""

from __future__ import annotations

from client.reservations import Reservations


def _extents(sizes: list[int], first_handle: int = 1) -> list[dict[str, int]]:
    return [{"handle": first_handle + i, "segment": 0, "offset": 0, "size_bytes": s} for i, s in enumerate(sizes)]


def test_first_run_reserves_what_it_needs_then_the_profile_reserves_the_whole_layer() -> None:
    r = Reservations(idle_s=2.0)
    assert r.plan(0, [100, 200]) == [100, 200]  # no profile yet: just the batch
    r.add(_extents([100, 200]), now=0.0)
    assert r.take(100)["handle"] == 1 and r.take(200)["handle"] == 2
    assert r.plan(0, [300]) == [300]  # same run, later batch
    r.add(_extents([300], 3), now=0.0)
    assert r.take(300) is not None
    assert r.plan(1, [50]) == [50]  # layer 1 begins: layer 0's profile is recorded
    r.add(_extents([50], 4), now=0.0)
    r.take(50)
    r.end_run()
    # Next step: layer 0's first tensor reserves all of layer 0 in one request.
    assert r.plan(0, [100]) == [100, 200, 300]
    r.add(_extents([100, 200, 300], 10), now=1.0)
    assert [r.take(s)["handle"] for s in (100, 200, 300)] == [10, 11, 12]
    assert r.plan(0, [200]) == [200]  # more than the profile: asked for, not assumed
    assert r.spare_bytes == 0


def test_spares_are_reused_by_size_and_expire_after_idle_s() -> None:
    r = Reservations(idle_s=2.0)
    r.plan(0, [100, 100, 200])
    r.end_run()
    assert r.plan(0, [100]) == [100, 100, 200]
    r.add(_extents([100, 100, 200]), now=10.0)
    r.take(100)
    assert r.spare_bytes == 300
    assert r.plan(5, [200, 100]) == []  # covered by the spares: no request at all
    assert r.seconds_to_expiry(11.0) == 1.0
    assert r.expired(11.5) == []
    assert [e["handle"] for e in r.expired(12.0)] == [2, 3]
    assert (r.spare_bytes, r.seconds_to_expiry(12.0), r.take(100)) == (0, None, None)


def test_drain_returns_every_spare() -> None:
    r = Reservations(idle_s=2.0)
    r.add(_extents([64, 128, 128]), now=0.0)
    assert sorted(e["handle"] for e in r.drain()) == [1, 2, 3]
    assert (r.spare_bytes, r.take(128)) == (0, None)
