"""A SQLite server's time across a restart while a step of this host's clock is absorbed
(metering_server/siteclock.py): taken up from the state dir, less what the other servers of
the file absorbed while it was down."""

from __future__ import annotations

import json
import time

import pytest


@pytest.mark.asyncio
@pytest.mark.parametrize(("down_s", "left_s"), [(0.0, -30.0), (400.0, -10.0), (1000.0, 0.0)])
async def test_a_kept_step_is_taken_up_less_what_was_absorbed_meanwhile(
    make_server, tmp_path, down_s, left_s
):
    """Found by a review: a lag kept from long ago was taken up whole, and the server was as
    far from the others of the file (which had absorbed it meanwhile) as that."""
    state = tmp_path / "srv-l"
    state.mkdir()
    kept = {"lag_s": -30.0, "at": time.time() - down_s}  # 30 s behind the host's clock
    (state / "site-clock.json").write_text(json.dumps(kept))
    server = await make_server(name="srv-l")
    assert server.clock() - time.time() == pytest.approx(left_s, abs=0.5)
