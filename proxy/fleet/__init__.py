"""Fleet: many Turnout instances follow one rollout through etcd v3 (see member.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.fleet.member import FleetMember

if TYPE_CHECKING:
    from proxy.runtime import Proxy

__all__ = ["FleetMember", "join"]


def join(proxy: Proxy) -> FleetMember | None:
    """Make a started proxy a member of the fleet its configuration names (None without
    `fleet:`); it leaves the fleet at shutdown."""
    config = proxy.config.fleet
    if config is None:
        return None
    member = FleetMember(proxy, config)
    proxy.fleet = member
    member.start()
    return member
