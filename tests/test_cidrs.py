import ipaddress
import os

import pytest

from sdnsup import cidrs
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
        ("", "no CIDRs given"),
    ],
)
def test_bad_input_is_a_usage_error(spec, message):
    with pytest.raises(ConfigError) as info:
        parse_cidrs([spec])
    assert message in str(info.value)
    assert info.value.exit_code == EX_USAGE


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("10.0.0.0/24,10.0.0.0/24", "duplicates -r"),
        ("10.0.0.0/8,10.1.0.0/16", "10.1.0.0/16 overlaps 10.0.0.0/8"),
    ],
)
def test_strict_refuses_duplicates_and_nesting(spec, message):
    with pytest.raises(ConfigError) as info:
        parse_cidrs([spec], strict=True)
    assert message in str(info.value)
    assert info.value.exit_code == EX_USAGE


def test_duplicates_nested_and_adjacent_prefixes_are_merged_and_counted():
    s = parse_cidrs(
        [
            "10.0.0.0/24,10.0.0.0/24,10.0.0.128/25",  # a duplicate, a nested one
            "10.0.1.0/24",  # adjacent to 10.0.0.0/24: together 10.0.0.0/23
            "192.168.5.0/24,fd00::/64,fd00::/64,fd00:0:0:1::/64",
        ]
    )
    assert s.v4 == {N("10.0.0.0/23"), N("192.168.5.0/24")}
    assert s.v6 == {N("fd00::/63")}
    r = s.report
    assert (r.read, r.duplicates, r.merged, r.steered) == (8, 2, 3, 3)
    assert str(r) == (
        "8 CIDRs read: 2 duplicates, 3 merged into wider or adjacent prefixes; 3 prefixes steered"
    )
    # strict keeps adjacent prefixes as given (they never were an error)
    strict = parse_cidrs(["10.0.0.0/24,10.0.1.0/24"], strict=True)
    assert strict.v4 == {N("10.0.0.0/24"), N("10.0.1.0/24")}
    assert str(strict.report) == "2 CIDRs read, all steered as given"


def test_a_published_provider_list_collapses_to_its_union(tmp_path):
    """Shaped like the clouds' published ranges: regions announce a block and its halves,
    services repeat a region's prefixes, and neighbouring blocks meet."""
    lines = []
    for region in range(40):
        base = ipaddress.ip_network(f"52.{region}.0.0/16")
        lines.append(str(base))
        lines += [str(n) for n in base.subnets(new_prefix=20)]  # nested in the /16
        lines += [str(n) for n in base.subnets(new_prefix=18)][:2]  # again, under a service
        lines.append(f"2600:1f{region:02x}::/36")
        lines.append(f"2600:1f{region:02x}:800::/40")  # inside the /36
    lines += lines[:500]  # the same prefixes under a second service name
    f = tmp_path / "ip-ranges.txt"
    f.write_text("\n".join(lines) + "\n")
    s = parse_cidrs([f"@{f}"])
    want4 = set(ipaddress.collapse_addresses(N(f"52.{r}.0.0/16") for r in range(40)))
    assert s.v4 == want4 and len(s.v4) < 40  # 52.0-39: a few wide blocks
    assert len(s.v6) == 40
    assert s.report.read == len(lines) and s.report.duplicates == 500
    assert s.report.steered == len(s)
    assert s.report.read == s.report.duplicates + s.report.merged + s.report.steered


def test_a_cidr_file_must_be_a_regular_file_of_bounded_size(tmp_path):
    with pytest.raises(ConfigError, match="/dev/zero is not a regular file"):
        parse_cidrs(["@/dev/zero"])
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # nobody writes: opening it for reading would block forever
    with pytest.raises(ConfigError, match="fifo is not a regular file"):
        parse_cidrs([f"@{fifo}"])
    with pytest.raises(ConfigError, match="is not a regular file"):
        parse_cidrs([f"@{tmp_path}"])
    big = tmp_path / "big"
    big.write_text("10.0.0.0/24\n" * 100)
    with pytest.raises(ConfigError, match=r"big is larger than"):
        cidrs.read_cidr_file(big, max_bytes=1000)
    binary = tmp_path / "binary"
    binary.write_bytes(b"10.0.0.0/24\n\xff\xfe\n")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        parse_cidrs([f"@{binary}"])


def test_the_count_of_cidrs_is_bounded(tmp_path):
    f = tmp_path / "many"
    f.write_text("".join(f"10.0.{i}.0/24\n" for i in range(200)))
    assert parse_cidrs([f"@{f}"], max_cidrs=200).report.read == 200
    with pytest.raises(ConfigError, match=rf"{f}:101: more than 100 CIDRs given"):
        parse_cidrs([f"@{f}"], max_cidrs=100)
    with pytest.raises(ConfigError, match="more than 100 CIDRs"):
        parse_cidrs([f"@{f}", "10.1.0.0/24"], max_cidrs=100)


def test_errors_never_print_what_cannot_be_a_cidr(tmp_path):
    secret = tmp_path / "shadow"
    secret.write_text("root:$y$j9T$SECRETSALT$SECRETHASH:19000:0:99999:7:::\n10.0.0.256/24\n")
    link = tmp_path / "cidrs.txt"
    link.symlink_to(secret)
    with pytest.raises(ConfigError) as info:
        parse_cidrs([f"@{link}"])
    text = str(info.value)
    assert "SECRET" not in text and "root:" not in text
    assert f"{link}:1: an entry of 52 characters (not shown" in text
    assert f"{link}:2: '10.0.0.256/24' is not a CIDR" in text  # a typo is still quoted
    # a token file named by mistake: hex only, so never shown either
    token = tmp_path / "cc.token"
    token.write_text("3f9c2b7e4d1a8f6e0b5c3d2a1f9e8d7c\n")
    with pytest.raises(ConfigError) as info:
        parse_cidrs([f"@{token}"])
    assert "3f9c2b7e" not in str(info.value) and "an entry of 32 characters" in str(info.value)
    # what the operator typed is theirs to see
    with pytest.raises(ConfigError, match="'banana' is not a CIDR"):
        parse_cidrs(["banana"])


def test_allow_default():
    assert parse_cidrs(["0.0.0.0/0"], allow_default=True).v4 == {N("0.0.0.0/0")}


def test_all_problems_reported_with_line_numbers(tmp_path):
    f = tmp_path / "c"
    f.write_text("10.0.0.1/24\nnope\n10.1.0.0/16\n10.1.2.0/24\n")
    with pytest.raises(ConfigError) as info:
        parse_cidrs([f"@{f}"])
    text = str(info.value)
    assert f"{f}:1" in text and f"{f}:2" in text and "overlaps" not in text
    with pytest.raises(ConfigError) as info:
        parse_cidrs([f"@{f}"], strict=True)
    assert f"{f}:4: 10.1.2.0/24 overlaps" in str(info.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="cannot read CIDR file /nonexistent"):
        parse_cidrs(["@/nonexistent"])


def test_100k_lines_parse_quickly(tmp_path):
    f = tmp_path / "big"
    f.write_text(
        "".join(f"10.{i >> 8 & 255}.{i & 255}.{(i >> 16) * 16}/28\n" for i in range(100_000))
    )
    strict = parse_cidrs([f"@{f}"], strict=True)
    assert len(strict) == 100_000
    merged = parse_cidrs([f"@{f}"])
    assert merged.v4 == frozenset(ipaddress.collapse_addresses(strict.v4))


def test_ipv4_mapped_zoned_and_bom_inputs(tmp_path):
    with pytest.raises(ConfigError) as info:
        parse_cidrs(["::ffff:10.10.10.0/120,fd00::%eth0/64"])
    assert "is IPv4-mapped IPv6 (did you mean 10.10.10.0/24?)" in str(info.value)
    assert "'fd00::%eth0/64' has a zone index" in str(info.value)
    listing = tmp_path / "cidrs.txt"
    listing.write_text("\ufeff10.0.0.0/24 # saved by Notepad, with a byte order mark\n")
    assert parse_cidrs([f"@{listing}"]).v4 == {ipaddress.ip_network("10.0.0.0/24")}


def test_a_reload_keeps_the_running_sets_when_the_file_did_not_change(tmp_path):
    f = tmp_path / "cidrs.txt"
    f.write_text("10.1.0.0/16\n10.2.0.0/16\nfd00::/64\n")
    running = parse_cidrs([f"@{f}"])
    again = parse_cidrs([f"@{f}"], previous=running)
    assert again.v4 is running.v4 and again.v6 is running.v6
    f.write_text("10.1.0.0/16\n10.3.0.0/16\nfd00::/64\n")
    changed = parse_cidrs([f"@{f}"], previous=running)
    assert changed.v4 == {N("10.1.0.0/16"), N("10.3.0.0/16")}
    assert changed.v6 is running.v6
    kept = N("10.1.0.0/16")
    assert next(n for n in changed.v4 if n == kept) is next(n for n in running.v4 if n == kept)


def test_a_set_without_keys_is_never_reused():
    """A CidrSet built by hand (no keys) says nothing about what changed: parsed afresh."""
    hand = cidrs.CidrSet(v4=frozenset({N("10.9.0.0/16")}), v6=frozenset())
    assert parse_cidrs(["10.1.0.0/16"], previous=hand).v4 == {N("10.1.0.0/16")}


def test_known_networks_hands_out_its_own_objects_and_makes_equal_ones_otherwise():
    mine4, mine6 = N("10.1.0.0/16"), N("fd00::/64")
    known = cidrs.KnownNetworks([mine4], {mine6})
    assert known.ipv4(0x0A010000, 16) is mine4
    assert known.ipv6(int(mine6.network_address), 64) is mine6
    other = known.ipv4(0x0A020000, 16)
    assert other == N("10.2.0.0/16") and hash(other) == hash(N("10.2.0.0/16"))
    assert str(known.ipv4(0x0A010000, 24)) == "10.1.0.0/24"  # same address, other length
    assert known.ipv4(0x0A010001, 32) == N("10.1.0.1/32")
    assert list(known.ipv4(0x0A010002, 31).hosts()) == list(N("10.1.0.2/31").hosts())
