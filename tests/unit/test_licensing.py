import pytest

from metering_protocol.errors import UnknownProduct
from metering_server.licensing import Catalogue, Pool, decide


def test_enforce_denies_at_capacity_meter_flags_overuse():
    enforce, meter = Pool("A", "1", 2, "enforce"), Pool("B", "1", 2, "meter")
    assert decide(enforce, 1).granted and not decide(enforce, 2).granted
    assert decide(meter, 1).overuse is False
    assert decide(meter, 2).granted and decide(meter, 2).overuse
    assert not decide(Pool("Z", "1", 0, "enforce"), 0).granted


def test_catalogue_exact_version_wins_over_star_and_names_ignore_case():
    exact, star = Pool("CLOCK.EXE", "4.00", 5, "enforce"), Pool("CLOCK.EXE", "*", 1, "meter")
    cat = Catalogue([star, exact])
    assert cat.find("clock.exe", "4.00") is exact
    assert cat.find("Clock.Exe", "5.1") is star
    with pytest.raises(UnknownProduct):
        cat.find("PAINT", "1")
    with pytest.raises(UnknownProduct):
        Catalogue([exact]).find("CLOCK.EXE", "3.00")
