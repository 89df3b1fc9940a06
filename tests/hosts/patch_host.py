"""A host to patch through a Prefect server: a real sshd host with a sandboxed real apt and dpkg
(tests/hosts/aptlab.py) on which one security update waits, and a config whose policy pauses
every run for approval.

    patchable_host   session   make(name) -> PatchableHost: a new host and its own config and store
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from connectors.stores import LocalBlobStore
from tasks.patching.history import history
from tasks.patching.models import HostPatchRecord
from tests.hosts.aptlab import AptLab
from tests.hosts.sshd import SshdFleet
from tests.hosts.sshd_server import SshdHost

ALWAYS_OPEN = [{"days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"], "start": "00:00", "duration_minutes": 1440}]
# What the patch-web-monthly deployment's form shows: its group and policy, which each config defines.
DEPLOYMENT = "patch-web-monthly"
POLICY = "monthly-web"


@dataclass
class PatchableHost:
    """A real sshd host whose apt sees demo-web 1.1 (a security update) over the installed 1.0."""

    sshd: SshdHost
    lab: AptLab
    config: Path

    def demo_web(self) -> str | None:
        return self.lab.installed_version("demo-web")

    def records(self) -> list[HostPatchRecord]:
        return history(LocalBlobStore(self.config.parent / "store"), self.sshd.name)


HostMaker = Callable[[str], PatchableHost]


@pytest.fixture(scope="session")
def patchable_host(sshd_fleet: SshdFleet, tmp_path_factory: pytest.TempPathFactory) -> HostMaker:
    def make(name: str) -> PatchableHost:
        base = tmp_path_factory.mktemp(f"ui-{name}")
        lab = AptLab(base / "apt").create()
        lab.install_base("demo-web", "1.0")
        lab.publish("security", "demo-web", "1.1")
        sshd = sshd_fleet.create(name, extra_config={"SetEnv": lab.env})
        host = sshd.host_config(groups=["web"], update_domain=1, maintenance_windows=ALWAYS_OPEN, connect_timeout=60)
        config = base / "fleet.yaml"
        config.write_text(yaml.safe_dump({
            "storage": {"kind": "local", "path": "store"},
            "hosts": [host.model_dump(mode="json", exclude_none=True)],
            "patch_policies": {POLICY: {"approval_required": True, "reboot": "Never",
                                        "baseline_months": list(range(1, 13))}}}))
        return PatchableHost(sshd, lab, config)

    return make
