"""Every record in benchmarks/results/ names the git commit it comes from (issue 36, item 15).

A record written since the environment helper records it carries ``git_commit`` (with
``git_dirty``) in its environment; an older one carries ``recorded_in_commit``, the last
commit that changed the file, read from ``git log -1 --follow`` when the field was added.
"""

import json
import pathlib
import re
import subprocess

import pytest

from overparam_experiments import timing

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results"
SHA = re.compile(r"[0-9a-f]{40}")
KEYS = ("git_commit", "recorded_in_commit")


def _commits(record) -> list[str]:
    """Every commit named anywhere in a record (a key of KEYS with a full sha as value)."""
    found = []
    if isinstance(record, dict):
        for key, value in record.items():
            if key in KEYS and isinstance(value, str) and SHA.fullmatch(value):
                found.append(value)
            else:
                found += _commits(value)
    elif isinstance(record, list):
        for value in record:
            found += _commits(value)
    return found


RECORDS = sorted(RESULTS.rglob("*.json"))


def test_there_are_records():
    assert len(RECORDS) > 20


@pytest.mark.parametrize("path", RECORDS, ids=lambda p: str(p.relative_to(RESULTS)))
def test_every_record_names_a_commit(path):
    assert _commits(json.loads(path.read_text())), (
        f"{path.name} names no commit: records written by the benchmarks carry git_commit "
        "(overparam_experiments.timing.environment); an older record needs recorded_in_commit"
    )


def test_named_commits_exist_where_history_is_available():
    """Each named commit is in this checkout's history (skipped without git or history)."""
    try:
        subprocess.run(["git", "rev-parse", "HEAD"], cwd=RESULTS, check=True,
                       capture_output=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    named = sorted({c for path in RECORDS for c in _commits(json.loads(path.read_text()))})
    out = subprocess.run(
        ["git", "cat-file", "--batch-check"],
        cwd=RESULTS,
        text=True,
        input="\n".join(named) + "\n",
        capture_output=True,
        check=True,
    )
    missing = [line.split()[0] for line in out.stdout.splitlines() if line.endswith("missing")]
    if missing and len(missing) == len(named):
        pytest.skip("a shallow checkout: none of the named commits is present")
    assert not missing, missing


def test_the_environment_record_names_the_commit_and_whether_the_tree_was_dirty(tmp_path):
    if timing.git_state(RESULTS)["git_commit"] is None:
        pytest.skip("not a git checkout")
    env = {**timing.environment(), **timing.git_state(RESULTS)}
    assert set(timing.git_state()) <= set(timing.environment())
    assert SHA.fullmatch(env["git_commit"]) and isinstance(env["git_dirty"], bool)
    assert timing.git_state(tmp_path) == {"git_commit": None, "git_dirty": None}
