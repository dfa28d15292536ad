"""Every command's --help: plain text, each option with its default, the CRYPTOPI_* variables it reads."""

import re

import pytest

from appliance.__main__ import build_parser
from appliance.settings import Settings
from tests.conftest import REPO

COMMANDS = ["up", "ingest", "healthcheck", "check-config", "backfill", "import-csv", "export", "replay"]
VARIABLES = {f"CRYPTOPI_{name.upper()}" for name in Settings.model_fields}


def help_of(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args([*argv, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def listed(text: str) -> dict[str, str]:
    """The environment variables section: variable -> its text (wrapped lines joined)."""
    section = text.split("environment variables:\n", 1)[1]
    out: dict[str, str] = {}
    for line in section.splitlines():
        if m := re.match(r"  (CRYPTOPI_[A-Z0-9_]+)\s+(.*)", line):
            variable = m.group(1)
            out[variable] = m.group(2)
        elif line.startswith(" " * 6):
            out[variable] += " " + line.strip()
    return out


@pytest.mark.parametrize("command", COMMANDS)
def test_help_is_plain_text_listing_the_variables_read(
    capsys: pytest.CaptureFixture[str], command: str
) -> None:
    text = help_of(capsys, command)
    assert not re.search(r"``|:(meth|class|func):|\*\*", text), "no reST markup"
    variables = listed(text)
    assert variables, "every command names the settings it reads"
    assert set(variables) <= VARIABLES
    assert all("(default: " in t or "(required)" in t for t in variables.values()), variables


def test_up_and_check_config_list_every_variable_with_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("up", "check-config"):
        variables = listed(help_of(capsys, command))
        assert set(variables) == VARIABLES
    assert variables["CRYPTOPI_PRODUCTS"].endswith("(default: BTC-USD,ETH-USD)")
    assert variables["CRYPTOPI_MQTT_URL"].endswith("(default: unset)")
    assert variables["CRYPTOPI_HTTP_PORT"] == "Port the API and dashboard listen on (default: 8000)"


def test_each_command_names_only_what_it_reads(capsys: pytest.CaptureFixture[str]) -> None:
    assert set(listed(help_of(capsys, "healthcheck"))) == {"CRYPTOPI_HTTP_HOST", "CRYPTOPI_HTTP_PORT"}
    assert set(listed(help_of(capsys, "replay"))) == {"CRYPTOPI_LOG_LEVEL", "CRYPTOPI_LOG_FORMAT"}
    assert "CRYPTOPI_COINBASE_WS_URL" in listed(help_of(capsys, "ingest"))
    assert "CRYPTOPI_COINBASE_WS_URL" not in listed(help_of(capsys, "backfill"))


def test_options_show_their_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    flat = " ".join(help_of(capsys, "backfill").split())
    assert "--granularity GRANULARITY candle length in seconds (default: 3600)" in flat
    assert "--product PRODUCT a Coinbase product id, e.g. BTC-USD (required)" in flat
    flat = " ".join(help_of(capsys, "replay").split())
    assert "--port PORT port of the feed and REST (default: 8765)" in flat
    assert "--trades-per-candle MIN,MAX trades generated per candle of a --candles tape (default: 4,10)" in (
        flat
    )
    assert "(default: None)" not in flat
    assert "(default: False)" not in flat


def test_the_readme_configuration_table_has_every_variable() -> None:
    readme = (REPO / "README.md").read_text()
    table = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    missing = [v for v in sorted(VARIABLES) if f"`{v}`" not in table]
    assert missing == []
