"""The `leases` request's paging fields, validated at the edge like every other op's."""

import pytest

from metering_protocol.errors import BadRequest
from metering_protocol.messages import (
    DEFAULT_LEASES_PAGE,
    MAX_LEASES_PAGE,
    Leases,
    parse_request,
)


def test_paging_fields_are_optional():
    req = parse_request({"id": 1, "op": "leases"})
    assert isinstance(req, Leases)
    assert (req.product, req.limit, req.after) == (None, None, None)
    req = parse_request({"id": 1, "op": "leases", "limit": None, "after": None})
    assert (req.limit, req.after) == (None, None)


def test_paging_fields_parse():
    req = parse_request(
        {"id": 2, "op": "leases", "product": "CAD", "limit": MAX_LEASES_PAGE, "after": "L0a"}
    )
    assert (req.product, req.limit, req.after) == ("CAD", MAX_LEASES_PAGE, "L0a")
    assert parse_request({"id": 2, "op": "leases", "limit": 1}).limit == 1


def test_the_default_page_fits_a_default_frame():
    # A typical lease view is ~250 bytes on the wire; the default page must leave room for
    # longer names before the byte cap (handlers.MAX_LEASES_PAGE_BYTES) has to cut it.
    assert DEFAULT_LEASES_PAGE * 250 < 56 * 1024 <= 65536
    assert DEFAULT_LEASES_PAGE <= MAX_LEASES_PAGE


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"limit": "10"}, "limit: Expected `int | null`, got `str`"),
        ({"limit": 10.5}, "limit: Expected `int | null`, got `float`"),
        ({"limit": 10.0}, "limit: Expected `int | null`, got `float`"),
        ({"limit": True}, "limit: Expected `int | null`, got `bool`"),
        ({"limit": [1]}, "limit: Expected `int | null`, got `array`"),
        ({"limit": {}}, "limit: Expected `int | null`, got `object`"),
        ({"limit": 0}, "limit: Expected `int` >= 1"),
        ({"limit": -5}, "limit: Expected `int` >= 1"),
        ({"limit": MAX_LEASES_PAGE + 1}, f"limit: Expected `int` <= {MAX_LEASES_PAGE}"),
        ({"after": 7}, "after: Expected `str | null`, got `int`"),
        ({"after": False}, "after: Expected `str | null`, got `bool`"),
        ({"after": ""}, "after: Expected `str` of length >= 1"),
        ({"after": "L" * 129}, "after: Expected `str` of length <= 128"),
    ],
)
def test_bad_paging_fields_name_the_field(fields, needle):
    with pytest.raises(BadRequest) as err:
        parse_request({"id": 9, "op": "leases", **fields})
    assert err.value.message == needle
    assert err.value.to_wire()["code"] == "bad_request"
    assert err.value.to_wire()["retryable"] is False
