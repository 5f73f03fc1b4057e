"""Connection budgets of one direction of a sidecar (SPEC §7).

Handshakes in progress have a budget of their own, in total and per source address,
apart from established connections: strangers that open connections and never finish
the TLS handshake fill only the handshake budget (and from one address only that
address's share of it), never the room of connections that passed the peer check. Each
direction (inbound, outbound) has its own budgets, so inbound strangers never starve
the app's outbound calls.

A connection takes a handshake slot when accepted (`admit`), trades it for an
established slot once its peer passed the check (`establish`), and gives back whatever
it holds when it ends (`release`). What does not fit is refused at once with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshshield.errors import MeshError, Reason


@dataclass
class Slot:
    budget: DirectionBudget
    source: str
    established: bool = False
    released: bool = False

    def establish(self) -> None:
        """Trade the handshake slot for an established one; MeshError when full (the
        handshake slot is given back either way)."""
        self.budget._establish(self)

    def release(self) -> None:
        self.budget._release(self)


@dataclass
class DirectionBudget:
    direction: str
    max_established: int
    max_handshakes: int
    max_handshakes_per_source: int | None  # None: no per-source budget
    handshakes: int = 0
    established: int = 0
    per_source: dict[str, int] = field(default_factory=dict)

    def handshakes_in_progress(self) -> float:
        return float(self.handshakes)

    def admit(self, source: str) -> Slot:
        """A handshake slot for a new connection from `source` (an IP address)."""
        if self.established >= self.max_established:
            raise MeshError(Reason.OVER_CONNECTION_BUDGET,
                            f"{self.established} {self.direction} connections established, "
                            f"the most allowed (--max-connections)")
        if self.handshakes >= self.max_handshakes:
            raise MeshError(Reason.OVER_HANDSHAKE_BUDGET,
                            f"{self.handshakes} {self.direction} handshakes in progress, "
                            f"the most allowed (--max-handshakes)")
        n = self.per_source.get(source, 0)
        if self.max_handshakes_per_source is not None and n >= self.max_handshakes_per_source:
            raise MeshError(Reason.OVER_HANDSHAKE_BUDGET_PER_SOURCE,
                            f"{n} {self.direction} handshakes in progress from {source}, the "
                            f"most allowed from one address (--max-handshakes-per-source)")
        self.handshakes += 1
        self.per_source[source] = n + 1
        return Slot(self, source)

    def _drop_handshake(self, slot: Slot) -> None:
        self.handshakes -= 1
        left = self.per_source[slot.source] - 1
        if left:
            self.per_source[slot.source] = left
        else:
            del self.per_source[slot.source]

    def _establish(self, slot: Slot) -> None:
        if slot.released or slot.established:
            return
        self._drop_handshake(slot)
        if self.established >= self.max_established:
            slot.released = True
            raise MeshError(Reason.OVER_CONNECTION_BUDGET,
                            f"{self.established} {self.direction} connections established, "
                            f"the most allowed (--max-connections)")
        slot.established = True
        self.established += 1

    def _release(self, slot: Slot) -> None:
        if slot.released:
            return
        slot.released = True
        if slot.established:
            self.established -= 1
        else:
            self._drop_handshake(slot)
