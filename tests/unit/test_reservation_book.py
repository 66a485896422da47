"""Reservations: what the transfer engine reserves ahead, hands out, and gives back."""

from __future__ import annotations

from client.reservations import Reservations


def _extents(sizes: list[int], first_handle: int = 1) -> list[dict[str, int]]:
    return [{"handle": first_handle + i, "slab": 0, "offset": 0, "size_bytes": s} for i, s in enumerate(sizes)]


def _handles(extents: list[dict[str, int]]) -> list[int]:
    return sorted(e["handle"] for e in extents)


def _run(r: Reservations, layer_id: int, sizes: list[int]) -> list[int]:
    """One run of a layer whose tensors all arrive in one batch; returns what it reserved."""
    r.begin(layer_id)
    wanted = r.plan(sizes)
    r.add(_extents(wanted, 100), now=0.0)
    for size in sizes:
        assert r.take(size) is not None
    return wanted


def test_a_repeated_profile_reserves_the_whole_layer_at_its_first_tensor() -> None:
    r = Reservations(idle_s=2.0)
    assert _run(r, 0, [100, 200, 300]) == [100, 200, 300]  # no profile: just the batch
    assert r.end_run() == []
    assert _run(r, 0, [100, 200, 300]) == [100, 200, 300]  # seen once: not yet trusted
    r.end_run()
    r.begin(0)
    assert r.plan([100]) == [100, 200, 300]  # seen twice alike: the whole layer, in one request
    r.add(_extents([100, 200, 300], 10), now=1.0)
    assert r.take(100)["handle"] == 10
    assert r.plan([300]) == [] and r.take(300)["handle"] == 12  # later tensors: no request
    assert r.plan([200, 200]) == [200]  # more than the profile: asked for, not assumed
    assert r.spare_bytes == 200


def test_changing_shapes_never_reserve_ahead() -> None:
    r = Reservations(idle_s=2.0)
    for sizes in ([100], [200], [100], [300]):
        assert _run(r, 0, sizes) == sizes
        r.end_run()


def test_untaken_spares_are_given_back_when_the_run_ends() -> None:
    r = Reservations(idle_s=2.0)
    for _ in range(2):
        _run(r, 0, [100, 100, 200])
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
    assert r.plan([100]) == [100]  # layer 0's shapes changed: nothing reserved ahead


def test_spares_expire_after_idle_s_inside_an_open_run() -> None:
    r = Reservations(idle_s=2.0)
    for _ in range(2):
        _run(r, 0, [64])
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
