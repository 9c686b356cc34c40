"""The fleet's shared records and the pure rules over them: keys, the state, who leads, and
whether a change moves traffic toward the candidate. No I/O."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from proxy.logic.routing import POOLS, PoolName


class StateError(ValueError):
    """A fleet record that cannot be read."""


@dataclass(frozen=True, slots=True)
class Keys:
    """Where a fleet keeps its records in etcd."""

    name: str

    @property
    def root(self) -> str:
        return f"/turnout/{self.name}/"

    @property
    def state(self) -> str:
        return f"{self.root}state"

    @property
    def election(self) -> str:
        return f"{self.root}election/"

    @property
    def members(self) -> str:
        return f"{self.root}members/"

    @property
    def commands(self) -> str:
        return f"{self.root}commands/"

    @property
    def results(self) -> str:
        return f"{self.root}results/"

    @property
    def outcomes(self) -> str:
        return f"{self.root}outcomes/"

    def kind(self, key: str) -> tuple[str, str]:
        """("state", ""), ("election", instance), ("members", instance), ... or ("", key)."""
        if not key.startswith(self.root):
            return "", key
        rest = key[len(self.root) :]
        if rest == "state":
            return "state", ""
        section, _, name = rest.partition("/")
        return section, name


@dataclass(frozen=True, slots=True)
class FleetRollout:
    """The rollout as the leader last wrote it."""

    state: str = "idle"
    strategy: str = "adaptive"
    step: int = 0  # 1-based, 0 when no step is held
    step_split: float | None = None
    steps: tuple[float, ...] = ()
    reason: str = "no rollout started"


@dataclass(frozen=True, slots=True)
class FleetState:
    """What every member applies: the split, the stable pool and the rollout."""

    split: float
    stable: PoolName
    rollout: FleetRollout = field(default_factory=FleetRollout)
    effective_at: float = 0.0  # wall clock: when a move toward the candidate takes effect
    writer: str = ""
    term: int = 0  # the writer's election key's create_revision

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> FleetState:
        try:
            data = json.loads(raw)
            rollout = data.get("rollout") or {}
            split = float(data["split"])
            stable = data["stable"]
            if not (0.0 <= split <= 100.0) or stable not in POOLS:
                raise StateError(f"fleet state out of range: split {split}, stable {stable!r}")
            step_split = rollout.get("step_split")
            return cls(
                split=split,
                stable=stable,
                rollout=FleetRollout(
                    state=str(rollout.get("state", "idle")),
                    strategy=str(rollout.get("strategy", "adaptive")),
                    step=int(rollout.get("step", 0)),
                    step_split=None if step_split is None else float(step_split),
                    steps=tuple(float(s) for s in rollout.get("steps", ())),
                    reason=str(rollout.get("reason", "")),
                ),
                effective_at=float(data.get("effective_at", 0.0)),
                writer=str(data.get("writer", "")),
                term=int(data.get("term", 0)),
            )
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            if isinstance(exc, StateError):
                raise
            raise StateError(f"unreadable fleet state: {exc}") from exc


def stable_share(split: float, stable: PoolName) -> float:
    """The percent of new requests the stable pool takes."""
    return 100.0 - split if stable == "blue" else split


def toward_candidate(split: float, stable: PoolName, new_split: float) -> bool:
    """Whether a new split takes traffic away from the pool that is stable now."""
    return stable_share(new_split, stable) < stable_share(split, stable) - 1e-9


def leader_of(campaigns: dict[str, int]) -> str | None:
    """The instance whose election key was created first (etcd's election recipe)."""
    if not campaigns:
        return None
    return min(campaigns.items(), key=lambda item: (item[1], item[0]))[0]


@dataclass(frozen=True, slots=True)
class MemberRecord:
    """What each member says about itself, under its lease."""

    instance: str
    admin: str
    applied_revision: int
    override: dict[str, Any] | None = None

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> MemberRecord:
        try:
            data = json.loads(raw)
            override = data.get("override")
            return cls(
                instance=str(data["instance"]),
                admin=str(data.get("admin", "")),
                applied_revision=int(data.get("applied_revision", 0)),
                override=override if isinstance(override, dict) else None,
            )
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise StateError(f"unreadable member record: {exc}") from exc


def finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
