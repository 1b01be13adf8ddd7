"""The sysctls sdnsup changes: read and written under /proc/sys, set only where needed, and
always restored, also by a process restarted after ``kill -9`` (the record file)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from sdnsup.errors import RoutesError
from sdnsup.sysctl import (
    NEXTHOP_COMPAT_MODE,
    ProcSysctl,
    SysctlGuard,
    strict_rp_filter,
    valid_mark_key,
)
from tests.fakes import FakeSysctl

ETH1 = valid_mark_key("eth1")


def test_proc_sysctl_reads_and_writes_under_its_root(tmp_path: Path) -> None:
    (tmp_path / "net/ipv4").mkdir(parents=True)
    (tmp_path / NEXTHOP_COMPAT_MODE).write_text("1\n")
    proc = ProcSysctl(tmp_path)
    assert proc.read(NEXTHOP_COMPAT_MODE) == 1
    assert proc.read("net/ipv4/conf/gone/rp_filter") is None  # no such interface
    proc.write(NEXTHOP_COMPAT_MODE, 0)
    assert (tmp_path / NEXTHOP_COMPAT_MODE).read_text() == "0\n"


def test_proc_sysctl_failures_name_the_key(tmp_path: Path) -> None:
    (tmp_path / "net/ipv4").mkdir(parents=True)
    (tmp_path / NEXTHOP_COMPAT_MODE).write_text("not a number\n")
    proc = ProcSysctl(tmp_path)
    with pytest.raises(RoutesError, match="cannot read sysctl net/ipv4/nexthop_compat_mode"):
        proc.read(NEXTHOP_COMPAT_MODE)
    with pytest.raises(
        RoutesError, match=r"cannot write sysctl net/ipv4/conf/eth1/src_valid_mark=1"
    ):
        proc.write(ETH1, 1)  # its directory does not exist


@pytest.mark.parametrize(
    ("all_", "iface", "strict"),
    [
        (0, 1, True),
        (1, 0, True),
        (1, 2, False),  # the kernel takes the higher value: loose wins over strict
        (2, 1, False),
        (0, 0, False),
        (None, 1, True),  # a value the kernel does not have counts as 0
        (1, None, True),
    ],
)
def test_strict_rp_filter_is_the_kernels_max_of_all_and_the_interface(
    all_: int | None, iface: int | None, strict: bool
) -> None:
    values = {}
    if all_ is not None:
        values["net/ipv4/conf/all/rp_filter"] = all_
    if iface is not None:
        values["net/ipv4/conf/eth1/rp_filter"] = iface
    assert strict_rp_filter(FakeSysctl(values), "eth1") is strict


def test_the_guard_sets_what_is_wanted_and_restores_the_original_when_it_is_not(
    tmp_path: Path,
) -> None:
    ctl = FakeSysctl({ETH1: 0, NEXTHOP_COMPAT_MODE: 1})
    guard = SysctlGuard(ctl, tmp_path / "sysctl.json")
    assert guard.ensure({ETH1: 1, NEXTHOP_COMPAT_MODE: 0}) == 2
    assert ctl.values == {ETH1: 1, NEXTHOP_COMPAT_MODE: 0}
    assert guard.ensure({ETH1: 1, NEXTHOP_COMPAT_MODE: 0}) == 0  # nothing to do twice
    assert guard.changed == {ETH1: 0, NEXTHOP_COMPAT_MODE: 1}
    # the AP moved to another interface: eth1 gets its value back
    assert guard.ensure({NEXTHOP_COMPAT_MODE: 0}) == 1
    assert ctl.values[ETH1] == 0 and guard.changed == {NEXTHOP_COMPAT_MODE: 1}
    # teardown: everything restored, the record file gone
    assert guard.ensure({}) == 1
    assert ctl.values == {ETH1: 0, NEXTHOP_COMPAT_MODE: 1}
    assert not (tmp_path / "sysctl.json").exists()


def test_a_value_already_right_or_a_vanished_interface_is_not_written() -> None:
    ctl = FakeSysctl({ETH1: 1})
    guard = SysctlGuard(ctl, None)
    assert guard.ensure({ETH1: 1, valid_mark_key("gone0"): 1}) == 0
    assert ctl.writes == 0 and guard.changed == {}  # nothing changed, nothing to restore


def test_a_process_restarted_after_kill_9_restores_what_its_predecessor_changed(
    tmp_path: Path,
) -> None:
    record = tmp_path / "run" / "sysctl.json"
    ctl = FakeSysctl({ETH1: 0, NEXTHOP_COMPAT_MODE: 1})
    SysctlGuard(ctl, record).ensure({ETH1: 1, NEXTHOP_COMPAT_MODE: 0})
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    # killed: the next process starts from the record, not from what the kernel shows now
    successor = SysctlGuard(ctl, record)
    assert successor.changed == {ETH1: 0, NEXTHOP_COMPAT_MODE: 1}
    assert successor.ensure({}) == 2
    assert ctl.values == {ETH1: 0, NEXTHOP_COMPAT_MODE: 1}


def test_records_of_older_versions_and_unreadable_ones(tmp_path: Path) -> None:
    record = tmp_path / "sysctl.json"
    record.write_text(json.dumps({"eth1": 0}))  # older versions: interface -> src_valid_mark
    assert SysctlGuard(FakeSysctl(), record).changed == {ETH1: 0}
    record.write_text("{not json")
    assert SysctlGuard(FakeSysctl(), record).changed == {}  # warned about, not fatal


def test_a_value_someone_else_set_back_meanwhile_is_not_written_again() -> None:
    ctl = FakeSysctl({ETH1: 0})
    guard = SysctlGuard(ctl, None)
    guard.ensure({ETH1: 1})
    ctl.values[ETH1] = 0  # an operator restored it by hand
    writes = ctl.writes
    assert guard.ensure({}) == 0 and ctl.writes == writes
