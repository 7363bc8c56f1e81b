import pytest

from metering_protocol.errors import Denied
from tests.conftest import hello


@pytest.mark.asyncio
async def test_checkout_denied_then_checkin_frees_seat(make_server):
    server = await make_server(products=[{"name": "A", "version": "1", "seats": 1}])
    a = await hello(server.address("unix"), client="ws-a")
    b = await hello(server.address("unix"), client="ws-b")
    got = await a.request("checkout", timeout=5, product="A", version="1")
    with pytest.raises(Denied) as denied:
        await b.request("checkout", timeout=5, product="A", version="1")
    assert denied.value.fields == {"in_use": 1, "seats": 1}
    assert (await a.request("checkin", timeout=5, lease=got["lease"]))["released"] is True
    again = await b.request("checkout", timeout=5, product="A", version="1")
    assert again["in_use"] == 1
    await a.close()
    await b.close()
