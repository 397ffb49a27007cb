"""Reference data (ticker/core/reference.py, ticker/shell/reference.py): dimensions and brand
data come from a file, every error in it is one line naming the file and the line, and
without one the counts come from the stream alone."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest

from gmv import app
from gmv.cli import build_parser, main
from gmv.reference import SHIPPED_2020, demo_reference
from simulator.scenario import scenario_for_year
from ticker.core.dimensions import FESTIVAL_2020, Dimensions, Window
from ticker.core.errors import ConfigError
from ticker.core.feed import Feed
from ticker.core.reference import MAX_HEADER_BYTES, Reference, dump, parse
from ticker.core.state import AggregateState
from ticker.core.wire import BatchError, OrderBatch, decode, encode
from ticker.shell import checkpoint
from ticker.shell import reference as reference_file
from ticker.shell.mqtt import ReliablePublisher, watch_totals

ROOT = Path(__file__).resolve().parent.parent

HEADER = """format = "gmv-reference"
version = 1
label = "a shop of its own"
brands = 300000
brands_file = "brands.csv"
platforms = ["Web", "App", "Kiosk", "Phone"]
countries = [
    { code = "CN", name = "China" },
    { code = "US", name = "United States" },
    { code = "AU", name = "Australia" },
    { code = "CA", name = "Canada" },
    { code = "FR", name = "France" },
    { code = "DE", name = "Germany" },
    { code = "IT", name = "Italy" },
    { code = "JP", name = "Japan" },
    { code = "KR", name = "South Korea" },
    { code = "NZ", name = "New Zealand" },
    { code = "GB", name = "United Kingdom" },
    { code = "XX", name = "Other countries" },
    { code = "ES", name = "Spain" },
]
"""
BRANDS = 'id,name,country,first_time\n7,Maison Sept,FR,1\n299999,"Last, the Brand",ES,1\n42,,CN,0\n'


def write(tmp_path: Path, header: str = HEADER, brands: str | bytes = BRANDS,
          name: str = "brands.csv") -> Path:
    (tmp_path / name).write_bytes(brands.encode() if isinstance(brands, str) else brands)
    path = tmp_path / "ref.toml"
    path.write_text(header.replace('"brands.csv"', f'"{name}"'))
    return path


def refused(header: str = HEADER, brands: str = BRANDS) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(header.encode(), "ref.toml", brands.encode(), "brands.csv")
    message = str(caught.value)
    assert "\n" not in message
    return message


# ---------- the format ----------

def test_a_file_declares_dimensions_names_countries_and_first_time_brands(tmp_path):
    """13 countries, 4 platforms and 300,000 brands from the header; the CSV's brands with
    their country, flag and name (quoted commas and all), the rest of the home market."""
    ref = reference_file.load(write(tmp_path))
    dims = ref.dimensions
    assert (dims.n_brands, len(dims.countries), len(dims.platforms)) == (300_000, 13, 4)
    assert dims.countries[12] == ("ES", "Spain") and dims.platforms[3] == "Phone"
    assert ref.country[[7, 299_999, 42, 8]].tolist() == [4, 12, 0, 0]
    assert np.flatnonzero(ref.first_time).tolist() == [7, 299_999]
    assert [ref.brand_name(b) for b in (7, 299_999, 42, 300_000)] == \
        ["Maison Sept", "Last, the Brand", "CN brand 00042", "Brand 300000"]


def test_dump_and_parse_are_inverse_and_list_only_brands_off_the_default(tmp_path):
    ref = reference_file.load(write(tmp_path))
    header, brands = dump(ref, "brands.csv")
    again = parse(header.encode(), "h", brands.encode(), "b")
    assert again.dimensions == ref.dimensions and again.names == ref.names
    assert (again.country == ref.country).all() and (again.first_time == ref.first_time).all()
    assert brands.splitlines()[1:] == ["7,Maison Sept,FR,1", '299999,"Last, the Brand",ES,1']


def test_a_gzipped_brands_file_and_a_header_without_brands(tmp_path):
    """brands_file may be .csv.gz; without brands_file the first-time brands are unknown."""
    ref = reference_file.load(write(tmp_path, brands=gzip.compress(BRANDS.encode()),
                                    name="brands.csv.gz"))
    assert ref.first_time.sum() == 2
    bare = write(tmp_path, header=HEADER.replace('brands_file = "brands.csv"\n', ""))
    ref = reference_file.load(bare)
    assert ref.first_time is None and ref.dimensions.n_brands == 300_000


BAD_ROWS = [
    ("x,,US,0", "line 2: id='x': must be a brand id 0 to 299,999"),
    ("300000,,US,0", "line 2: id='300000': must be a brand id 0 to 299,999 (brands = 300,000"),
    ("-1,,US,0", "line 2: id='-1'"),
    ("7,,US,0\n7,,FR,0", "line 3: brand 7 is listed twice (first on line 2)"),
    ("7,,ZZ,0", "line 2: country='ZZ' is not one of the 13 countries in the header"),
    ("7,,US,yes", "line 2: first_time='yes': must be 0 or 1"),
    ("7,,CN,1", "line 2: first_time=1 for a brand of CN, the home market"),
    ("7,,US", "line 2: 3 fields, expected 4"),
    ("7, padded ,US,0", "line 2: name=' padded ': must be 1 to 100 characters"),
    ("7," + "n" * 101 + ",US,0", "line 2: name='nnnn"),
    ('7,"open,US,0', "line 2: not CSV"),
]


@pytest.mark.parametrize("row, message", BAD_ROWS, ids=[m.split(": ")[1][:20] for _, m in
                                                        BAD_ROWS])
def test_a_bad_brand_row_is_one_line_naming_the_file_and_the_line(row, message):
    assert refused(brands=f"id,name,country,first_time\n{row}\n").startswith(
        f"brands.csv, {message}")


BAD_HEADERS = [
    ('brands = 300000', 'brands = "many"', "brands='many': must be an integer from 1 to"),
    ('brands = 300000', 'brands = 10000001', "brands=10000001: must be an integer from 1 to "
                                             "10,000,000"),
    ('version = 1', 'version = 2', "format='gmv-reference', version=2: expected"),
    ('label =', 'colour = "red"\nlabel =', "unknown key 'colour'"),
    ('{ code = "ES", name = "Spain" }', '{ code = "US", name = "Spain" }',
     "countries[12]: code 'US' is declared twice"),
    ('{ code = "ES", name = "Spain" }', '{ code = "E S", name = "Spain" }',
     "countries[12]: code='E S'"),
    ('{ code = "ES", name = "Spain" }', '{ code = "ES" }', "countries[12]: must be"),
    ('platforms = ["Web", "App", "Kiosk", "Phone"]', 'platforms = []',
     "platforms: must be a list of 1 to 256 names"),
    ('platforms = [', 'platforms = [[', "not TOML"),
]


@pytest.mark.parametrize("old, new, message", BAD_HEADERS,
                         ids=[m[:24] for _, _, m in BAD_HEADERS])
def test_a_bad_header_is_one_line_naming_the_file(old, new, message):
    assert HEADER.count(old) == 1
    assert refused(header=HEADER.replace(old, new)).startswith(f"ref.toml: {message}")


def test_sizes_are_bounded_in_the_header_the_files_and_the_gzip(tmp_path, monkeypatch):
    """257 countries, a header past 1 MiB, a header that is not UTF-8, a missing brands file
    and a gzip that inflates past the bound are each refused by name."""
    many = "countries = [\n" + "".join(f'    {{ code = "C{i}", name = "Land {i}" }},\n'
                                       for i in range(257)) + "]\n"
    assert refused(header=HEADER.split("countries = [")[0] + many).startswith(
        "ref.toml: countries: must be a list of 1 to 256")
    with pytest.raises(ConfigError, match=r"^h: 1,048,577 bytes, a header has at most"):
        parse(b"#" * (MAX_HEADER_BYTES + 1), "h", None, "b")
    with pytest.raises(ConfigError, match=r"^h: not UTF-8 \(byte 0\)"):
        parse(b"\xff", "h", None, "b")
    path = write(tmp_path)
    (tmp_path / "brands.csv").unlink()
    with pytest.raises(ConfigError, match=r"brands\.csv \(brands_file of .*ref\.toml\): No such"):
        reference_file.load(path)
    bomb = write(tmp_path, brands=gzip.compress(b"0" * (1 << 16)), name="b.csv.gz")
    monkeypatch.setattr(reference_file, "MAX_BRANDS_BYTES", 1024)
    with pytest.raises(ConfigError, match=r"b\.csv\.gz: more than 1,024 bytes uncompressed"):
        reference_file.load(bomb)


# ---------- the shipped 2020 file ----------

def test_the_shipped_2020_file_is_what_the_script_generates():
    """data/reference-2020.toml and its brands CSV hold what scripts/reference_data.py
    writes from the 2020 scenario's catalog now."""
    spec = importlib.util.spec_from_file_location("reference_data",
                                                  ROOT / "scripts" / "reference_data.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    header, brands = script.render()
    assert SHIPPED_2020.read_text() == header, "run: .venv/bin/python scripts/reference_data.py"
    assert (SHIPPED_2020.parent / "reference-2020-brands.csv").read_text() == brands, \
        "run: .venv/bin/python scripts/reference_data.py"


def test_the_shipped_file_is_the_2020_catalog_names_and_all():
    """31,000 overseas brands, 2,600 first-time, each brand's country the catalog's, and
    the names the simulator gave ("US brand 00042")."""
    scenario = scenario_for_year(2020)
    ref = reference_file.load(SHIPPED_2020)
    catalog = scenario.catalog
    assert ref.dimensions.n_brands == 250_000 and (ref.country != 0).sum() == 31_000
    assert ref.first_time.sum() == 2_600 and (ref.first_time == catalog.first_time).all()
    assert (ref.country == catalog.country).all()
    assert all(ref.brand_name(b) == catalog.brand_name(b) for b in range(0, 250_000, 4999))
    # Another seed has other brands: the demo builds its reference in memory then.
    other = demo_reference(scenario_for_year(2020, seed=7))
    assert not (other.first_time == ref.first_time).all()


# ---------- what the stream says without a file ----------

def china_only(n_brands: int = 250_000) -> OrderBatch:
    """Every brand sells once, all from China (country 0), as an independent producer's."""
    brand = np.arange(n_brands, dtype=np.uint32)
    zeros = np.zeros(n_brands, np.uint8)
    return OrderBatch("shop", 0, 10, np.full(n_brands, 100, np.int64), brand, zeros, zeros)


def aggregate_args(*options: str):
    return build_parser().parse_args(["aggregate", "--broker", "mqtt://127.0.0.1:1", *options])


def test_a_china_only_stream_shows_no_first_time_overseas_brands():
    """What we saw: a producer selling only from China showed 2,600 first-time overseas
    brands and 1 overseas brand. Without a reference file the first-time count is unknown
    (null, hidden on the page); with the 2020 file it is 0, as is the overseas count, both
    from the stream."""
    args = aggregate_args()
    assert app._reference(args) is None
    limits = app._limits(FESTIVAL_2020, app._reference(args), args.brands)
    assert (limits.n_brands, limits.n_countries, limits.n_platforms) == (250_000, 256, 256)
    bare = AggregateState(limits, None)
    bare.apply(china_only())
    with_file = AggregateState(limits, reference_file.load(SHIPPED_2020).first_time)
    with_file.apply(china_only())
    for state, first_time in ((bare, None), (with_file, 0)):
        totals = state.snapshot()
        assert totals["brands_active"] == 250_000 and totals["brands_overseas_active"] == 0
        assert totals["brands_first_time_active"] == first_time
    # Five brands sell from abroad too: overseas counts them, first-time those flagged.
    flagged = np.flatnonzero(with_file.first_time)[:3]
    brand = np.concatenate([flagged, [0, 1]]).astype(np.uint32)
    abroad = OrderBatch("shop", 1, 11, np.full(5, 100, np.int64), brand,
                        np.ones(5, np.uint8), np.zeros(5, np.uint8))
    for state in (bare, with_file):
        state.apply(abroad)
    assert bare.snapshot()["brands_overseas_active"] == 5
    assert bare.snapshot()["brands_first_time_active"] is None
    assert with_file.snapshot()["brands_first_time_active"] == 3


def test_a_feed_shows_unknown_first_time_as_null_and_names_from_the_servers_file(tmp_path):
    """The view keeps null when any shard does not know; names come from the server's
    reference (brands, the 13th country, the 4th platform), 'Brand 42' without one."""
    ref = reference_file.load(write(tmp_path))
    state = AggregateState(app._limits(FESTIVAL_2020, ref), ref.first_time)
    state.apply(OrderBatch("shop", 0, 3, np.array([500, 300], np.int64),
                           np.array([299_999, 7], np.uint32), np.array([12, 4], np.uint8),
                           np.array([3, 0], np.uint8)))
    doc = orjson.dumps({"v": 1, "shard": "0", "window": FESTIVAL_2020.as_dict(),
                        **state.snapshot()})
    named = Feed(**app.screen_data(None, ref))
    named.accept_totals("0", doc)
    named.publish()
    view = named.view
    assert [b["name"] for b in view["top_brands"]] == ["Last, the Brand", "Maison Sept"]
    assert view["countries"][12] == {"code": "ES", "name": "Spain", "gmv_cents": 500,
                                     "orders": 1}
    assert view["platforms"][3]["name"] == "Phone" and view["brands_first_time_active"] == 2
    plain = Feed()
    plain.accept_totals("0", doc)
    plain.publish()
    assert [b["name"] for b in plain.view["top_brands"]] == ["Brand 299999", "Brand 7"]
    assert plain.view["countries"][12]["name"] == "Country 12"
    assert len(plain.view["countries"]) == 13 and len(plain.view["platforms"]) == 4
    # A second shard without a file (first-time unknown, 256 countries): the sum is unknown,
    # and the countries listed are the declared 12 and any with GMV.
    unknown = AggregateState(app._limits(FESTIVAL_2020), None)
    unknown.apply(china_only(10))
    two = Feed(expected_shards=2)
    for name, totals in (("0", state.snapshot()), ("1", unknown.snapshot())):
        two.accept_totals(name, orjson.dumps({"v": 1, "shard": name,
                                              "window": FESTIVAL_2020.as_dict(), **totals}))
    two.publish()
    assert two.view["brands_first_time_active"] is None and two.view["brands_active"] == 12
    assert len(two.view["countries"]) == 13 and len(unknown.snapshot()["country_orders"]) == 256


# ---------- dimensions past 2020's ----------

def test_ids_past_2020_are_accepted_when_the_file_declares_them(tmp_path):
    """Brand 299,999, country 12 and platform 3 are refused with the 2020 file and accepted
    with one that declares 300,000 brands, 13 countries and 4 platforms."""
    batch = OrderBatch("shop", 0, 1, np.array([100], np.int64), np.array([299_999], np.uint32),
                       np.array([12], np.uint8), np.array([3], np.uint8))
    payload = encode(batch)
    with pytest.raises(BatchError, match="unknown_id"):
        decode(payload, app._limits(FESTIVAL_2020, reference_file.load(SHIPPED_2020)))
    ref = reference_file.load(write(tmp_path))
    state = AggregateState(app._limits(FESTIVAL_2020, ref), ref.first_time)
    assert state.apply(decode(payload, state.limits))
    totals = state.snapshot()
    assert totals["country_gmv_cents"][12] == 100 and totals["platform_orders"][3] == 1
    assert totals["brands_first_time_active"] == 1
    with pytest.raises(ConfigError, match=r"^--brands=5: the reference file declares 300,000"):
        app._limits(FESTIVAL_2020, ref, 5)


def test_a_checkpoint_of_other_dimensions_is_refused_by_name(tmp_path):
    """A checkpoint saved with the 2020 file (12 countries) does not load with a file of 13
    countries: one line naming the array and the likely cause."""
    path = tmp_path / "agg.ckpt"
    old = AggregateState(app._limits(FESTIVAL_2020, reference_file.load(SHIPPED_2020)))
    checkpoint.save(path, checkpoint.export(old))
    ref = reference_file.load(write(tmp_path, header=HEADER.replace("300000", "250000"),
                                    brands=BRANDS.replace("299999", "249999")))
    with pytest.raises(ConfigError) as caught:
        checkpoint.load(path, app._limits(FESTIVAL_2020, ref))
    assert str(caught.value) == (
        f"--checkpoint={path}: gmv_by_country has shape (12,), the settings give (13,) "
        "(another --reference, or none where one was?)")


async def test_gmv_aggregate_takes_the_reference_file(mosquitto, topics, tmp_path):
    """`gmv aggregate --reference FILE` as a process applies a batch with ids only that file
    declares and counts its first-time brand."""
    path = write(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "gmv.cli", "aggregate", "--broker",
                             mosquitto.url, "--prefix", topics.prefix, "--no-checkpoint",
                             "--reference", str(path)])
    seen: list[dict] = []
    done = asyncio.Event()

    def receive(topic: str, payload: bytes, retained: bool = False) -> None:
        if "/totals/" in topic and payload:
            seen.append(orjson.loads(payload))
            if seen[-1]["orders"] == 1:
                done.set()

    batch = OrderBatch("shop", 0, 1, np.array([100], np.int64),
                       np.array([299_999], np.uint32), np.array([12], np.uint8),
                       np.array([3], np.uint8))
    watcher = asyncio.create_task(watch_totals(mosquitto, topics, receive))
    try:
        async with asyncio.timeout(20), ReliablePublisher(mosquitto) as publisher:
            while not done.is_set():  # until the aggregator has subscribed: seq 0 each time
                await publisher.send(f"{topics.prefix}/orders/shop/0", encode(batch))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), 0.3)
    finally:
        watcher.cancel()
        proc.terminate()
        proc.wait(10)
    totals = seen[-1]
    assert totals["rejected"] == {} and totals["brands_first_time_active"] == 1
    assert len(totals["country_gmv_cents"]) == 13 and totals["platform_gmv_cents"][3] == 100


@pytest.mark.parametrize("command", ["aggregate", "serve", "demo"])
def test_a_bad_reference_file_exits_2_with_one_line_before_the_broker(tmp_path, capsys,
                                                                      command):
    """A missing or broken file ends `gmv aggregate`, `gmv serve` and `gmv demo` with exit 2
    and one line naming the file and the line, before any broker is touched."""
    broker = [] if command == "demo" else ["--broker", "mqtt://127.0.0.1:1"]
    missing = str(tmp_path / "none.toml")
    assert main([command, *broker, "--reference", missing]) == 2
    assert capsys.readouterr().err == f"gmv: error: {missing}: No such file or directory\n"
    broken = write(tmp_path, brands=BRANDS + "7,,US,0\n")
    assert main([command, *broker, "--reference", str(broken), "--port", "0"][
        :None if command != "aggregate" else -2]) == 2
    assert capsys.readouterr().err == (f"gmv: error: {tmp_path / 'brands.csv'}, line 5: "
                                       "brand 7 is listed twice (first on line 2)\n")


def test_reference_sizes_of_dimensions_are_checked():
    with pytest.raises(ValueError, match="n_brands=0"):
        Dimensions(n_brands=0)
    with pytest.raises(ValueError, match="country: must be uint8"):
        Reference(Dimensions(), "", np.zeros(3, np.uint8), None, {})


@pytest.mark.parametrize("minutes", [15_840, 10**6])
def test_totals_with_256_countries_and_platforms_fit_the_servers_bound_at_worst(minutes):
    """An aggregator without a file reports 256 countries and 256 platforms: with every
    figure as long as the bounds allow its totals message still passes the server's bound."""
    from ticker.core.feed import MAX_MESSAGE_BYTES, parse_totals
    from ticker.core.wire import MAX_TOTAL

    state = AggregateState(app._limits(Window(FESTIVAL_2020.start, minutes, "long")))
    state.latest_minute = minutes - 1
    spread = MAX_TOTAL // 1440 if minutes == 15_840 else MAX_TOTAL // minutes
    state.gmv_by_minute[-1440:] = state.orders_by_minute[-1440:] = spread
    if minutes > 15_840:
        state.gmv_by_minute[:] = spread  # the curve's buckets as long as they get
    state.gmv_by_brand[:10] = 10**15
    state.big_brand_minutes = [minutes - 1] * 1000
    state.gmv_cents = state.orders = MAX_TOTAL
    for column in (state.gmv_by_country, state.orders_by_country, state.gmv_by_platform,
                   state.orders_by_platform):
        column[:] = MAX_TOTAL // 256
    window = {**FESTIVAL_2020.as_dict(), "minutes": minutes}
    payload = orjson.dumps({"v": 1, "shard": "0", "window": window, **state.snapshot()})
    assert len(payload) < 70_000 < MAX_MESSAGE_BYTES, len(payload)
    parse_totals("0", orjson.loads(payload))
