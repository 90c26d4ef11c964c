"""Check mode on the converged host: `site.yml --check --diff` runs to the end, reports changed=0 and writes
no provision report (docs/runbook.md, "Check mode")."""

import os
from pathlib import Path

from _play import molecule_only, play, recap


def test_site_check_mode_changes_nothing_on_a_provisioned_host(host):
    molecule_only()
    history = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "reports" / host.backend.host / "provision-history.jsonl"
    before = history.read_text() if history.exists() else None
    res = play("site.yml", "--check", "--diff")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    hosts = recap(res.stdout)
    assert hosts, out[-2000:]
    for name, counts in hosts.items():
        assert counts["failed"] == 0 and counts["unreachable"] == 0, (name, counts)
        assert counts["changed"] == 0, "%s: check mode would change %d task(s):\n%s" % (name, counts["changed"], out[-4000:])
    assert "changed: [" not in res.stdout
    after = history.read_text() if history.exists() else None
    assert after == before, "site.yml --check wrote a provision report"
