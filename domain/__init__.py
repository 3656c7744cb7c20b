"""The trial's domain: participants, their events and the protocol rules. No I/O."""
