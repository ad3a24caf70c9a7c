"""model.settings.overridden / parse_variant: what lets a benchmark compare settings in one
process (tools/bench_decode.py --variants). The override reaches every module that reads SETTINGS,
is undone on exit (also after an exception), and bad names or values change nothing."""
import pytest

from model.ops.moe import route
from model.settings import SETTINGS, Settings, overridden, parse_variant


def test_override_reaches_the_modules_and_is_undone():
    before = (SETTINGS.fused_router, SETTINGS.fused_conv)
    with overridden(fused_router=not before[0], fused_conv=not before[1]) as s:
        assert s is SETTINGS
        assert route.SETTINGS.fused_router is (not before[0])   # the object the kernels' code reads
        assert SETTINGS.fused_conv is (not before[1])
    assert (SETTINGS.fused_router, SETTINGS.fused_conv) == before


def test_override_is_undone_after_an_exception():
    before = SETTINGS.int4_moe_rows
    with pytest.raises(RuntimeError, match="inside"):
        with overridden(int4_moe_rows=not before):
            raise RuntimeError("inside")
    assert SETTINGS.int4_moe_rows is before


@pytest.mark.parametrize("changes, message", [
    (dict(fused_ruter=True), r"unknown setting\(s\) \['fused_ruter'\]"),
    (dict(interpret=False), r"unknown setting\(s\) \['interpret'\]"),   # Triton reads it at import
    (dict(fused_conv=1), r"settings must be bool, got \{'fused_conv': 1\}"),
])
def test_bad_overrides_change_nothing(changes, message):
    before = Settings(**{f: getattr(SETTINGS, f) for f in Settings.__dataclass_fields__})
    with pytest.raises(ValueError, match=message):
        with overridden(pdl=not SETTINGS.pdl, **changes):
            pass
    assert Settings(**{f: getattr(SETTINGS, f) for f in Settings.__dataclass_fields__}) == before


def test_parse_variant():
    assert parse_variant("default") == {}
    assert parse_variant(" fused_router+int4_moe_rows=0 ") == {"fused_router": True, "int4_moe_rows": False}
    assert parse_variant("pdl=off+fused_conv=yes") == {"pdl": False, "fused_conv": True}
    with pytest.raises(ValueError, match="unknown setting 'interpret'"):
        parse_variant("interpret")
    with pytest.raises(ValueError, match=r"'fused_conv=' needs a value"):
        parse_variant("fused_conv=")
