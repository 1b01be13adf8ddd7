import ipaddress

import pytest

from sdnsup.cidrs import parse_cidrs
from sdnsup.errors import EX_USAGE, ConfigError

N = ipaddress.ip_network


def test_comma_list_both_families():
    s = parse_cidrs(["10.10.10.0/24,10.10.20.0/24", "fd00::/64"])
    assert s.v4 == {N("10.10.10.0/24"), N("10.10.20.0/24")}
    assert s.v6 == {N("fd00::/64")}


def test_file_with_comments(tmp_path):
    f = tmp_path / "cidrs.txt"
    f.write_text("# office\n10.1.0.0/16  # hq\n\n10.2.0.0/16\n")
    assert parse_cidrs([f"@{f}"]).v4 == {N("10.1.0.0/16"), N("10.2.0.0/16")}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("10.10.10.1/24", "host bits set (did you mean 10.10.10.0/24?)"),
        ("10.10.10.0/33", "is not a CIDR"),
        ("banana", "is not a CIDR"),
        ("0.0.0.0/0", "--allow-default"),
        ("::/0", "--allow-default"),
        ("10.0.0.0/24,10.0.0.0/24", "duplicates -r"),
        ("10.0.0.0/8,10.1.0.0/16", "10.1.0.0/16 overlaps 10.0.0.0/8"),
        ("", "no CIDRs given"),
    ],
)
def test_bad_input_is_a_usage_error(spec, message):
    with pytest.raises(ConfigError) as info:
        parse_cidrs([spec])
    assert message in str(info.value)
    assert info.value.exit_code == EX_USAGE


def test_allow_default():
    assert parse_cidrs(["0.0.0.0/0"], allow_default=True).v4 == {N("0.0.0.0/0")}


def test_all_problems_reported_with_line_numbers(tmp_path):
    f = tmp_path / "c"
    f.write_text("10.0.0.1/24\nnope\n10.1.0.0/16\n10.1.2.0/24\n")
    with pytest.raises(ConfigError) as info:
        parse_cidrs([f"@{f}"])
    text = str(info.value)
    assert f"{f}:1" in text and f"{f}:2" in text and f"{f}:4: 10.1.2.0/24 overlaps" in text


def test_missing_file():
    with pytest.raises(ConfigError, match="cannot read CIDR file /nonexistent"):
        parse_cidrs(["@/nonexistent"])


def test_100k_lines_parse_quickly(tmp_path):
    f = tmp_path / "big"
    f.write_text(
        "".join(f"10.{i >> 8 & 255}.{i & 255}.{(i >> 16) * 16}/28\n" for i in range(100_000))
    )
    assert len(parse_cidrs([f"@{f}"])) == 100_000


def test_ipv4_mapped_zoned_and_bom_inputs(tmp_path):
    with pytest.raises(ConfigError) as info:
        parse_cidrs(["::ffff:10.10.10.0/120,fd00::%eth0/64"])
    assert "is IPv4-mapped IPv6 (did you mean 10.10.10.0/24?)" in str(info.value)
    assert "'fd00::%eth0/64' has a zone index" in str(info.value)
    listing = tmp_path / "cidrs.txt"
    listing.write_text("\ufeff10.0.0.0/24 # saved by Notepad, with a byte order mark\n")
    assert parse_cidrs([f"@{listing}"]).v4 == {ipaddress.ip_network("10.0.0.0/24")}
