"""The reference data of a simulated scenario, and the 2020 file that ships in data/.

The simulator's catalog decides each brand's country and first-time flag; the aggregator and
the screen server learn them only from a reference (ticker/core/reference.py), so the demo
hands them the scenario's: the shipped file for the 2020 catalog (seed 2020), the same thing
built in memory for another seed. scripts/reference_data.py writes the shipped file from
`scenario_reference`, and tests/test_reference.py checks that it still does.
"""

from __future__ import annotations

from pathlib import Path

from simulator.scenario import Scenario, scenario_for_year
from ticker.core.dimensions import COUNTRIES, PLATFORMS, Dimensions
from ticker.core.reference import Reference
from ticker.shell import reference as reference_file

DATA = Path(__file__).resolve().parent.parent / "data"
SHIPPED_2020 = DATA / "reference-2020.toml"
SHIPPED_2020_BRANDS = "reference-2020-brands.csv"


def scenario_reference(scenario: Scenario) -> Reference:
    """The scenario's catalog as reference data (simulated brands have no names)."""
    catalog = scenario.catalog
    return Reference(Dimensions(COUNTRIES, PLATFORMS, catalog.n_brands),
                     f"simulated brands: {catalog.n_brands:,} brands, seed {scenario.seed}",
                     catalog.country.astype("uint8"), catalog.first_time.astype(bool), {})


def _brand_figures(scenario: Scenario) -> tuple:
    return scenario.seed, scenario.n_brands, scenario.n_overseas, scenario.n_first_time


def demo_reference(scenario: Scenario | None) -> Reference | None:
    """What the demo's aggregator and screen use: the shipped 2020 file when the scenario's
    brands are the 2020 catalog's (every year's scenario at seed 2020 has the same brands),
    else the scenario's built in memory; None for a recording (its brands are unknown)."""
    if scenario is None:
        return None
    if _brand_figures(scenario) == _brand_figures(scenario_for_year(2020)):
        return reference_file.load(SHIPPED_2020)
    return scenario_reference(scenario)
