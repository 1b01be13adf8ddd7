"""The saved AP list (sdnsup.savedlist): written safely, trusted only when it is safe."""

from __future__ import annotations

import json
import os
import stat

import pytest

from sdnsup.discovery import parse_answer
from sdnsup.savedlist import SavedList, SavedListError, path_for

CC = "https://cc.example:8443"
BODY = json.dumps(
    {"aps": [{"id": "ap-1", "addr": "10.77.0.11", "weight": 2}], "ttl": 120, "extra": 1}
).encode()


def saved(tmp_path, **kw):
    path = tmp_path / "state" / "aps.json"
    SavedList(parse_answer(BODY), kw.get("cc", CC), 1_764_645_000.0).save(path)
    return path


def test_round_trip_keeps_the_answer_and_its_time(tmp_path):
    path = saved(tmp_path)
    got = SavedList.load(path, CC)
    assert got is not None
    assert got.directory == parse_answer(BODY)
    assert got.directory.aps[0].weight == 2 and got.directory.ttl == 120
    assert got.fetched_at == 1_764_645_000.0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["aps.json"]  # no temporary left


def test_no_file_is_no_list(tmp_path):
    assert SavedList.load(tmp_path / "aps.json", CC) is None


def test_a_list_from_another_cc_is_refused(tmp_path):
    path = saved(tmp_path, cc="https://old-cc.example")
    with pytest.raises(SavedListError, match=r"came from CC 'https://old-cc.example'"):
        SavedList.load(path, CC)


def test_a_file_others_can_write_is_not_trusted(tmp_path):
    path = saved(tmp_path)
    path.chmod(0o622)
    with pytest.raises(SavedListError, match=r"not trusted .*mode 0622.*delete it"):
        SavedList.load(path, CC)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{", "not JSON"),
        (b'{"version": 2}', "not a version 1 saved list"),
        (b'{"version": 1, "cc": "%s", "fetched_at": "x", "answer": {}}', "not a time"),
        (
            b'{"version": 1, "cc": "%s", "fetched_at": 1, "answer": {"aps": []}}',
            "not a valid AP list: aps",
        ),
    ],
)
def test_a_damaged_file_is_refused_with_the_reason(tmp_path, content, message):
    path = tmp_path / "aps.json"
    path.write_bytes(content.replace(b"%s", CC.encode()))
    path.chmod(0o600)
    with pytest.raises(SavedListError, match=message):
        SavedList.load(path, CC)


def test_a_symlink_is_not_followed(tmp_path):
    real = saved(tmp_path)
    link = tmp_path / "link.json"
    link.symlink_to(real)
    with pytest.raises(SavedListError):
        SavedList.load(link, CC)


def test_an_unwritable_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SavedListError, match=r"cannot save the AP list to .*a restart will ask"):
        SavedList(parse_answer(BODY), CC, 0.0).save(blocker / "aps.json")


def test_the_file_is_named_for_the_network_namespace(tmp_path):
    # this test process runs in some namespace: the name is aps.json or aps-<something>.json
    name = path_for(tmp_path).name
    assert name == "aps.json" or (name.startswith("aps-") and name.endswith(".json"))
    assert os.path.dirname(path_for(tmp_path)) == str(tmp_path)
