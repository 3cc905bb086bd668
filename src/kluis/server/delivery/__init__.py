"""Delivery signals between the mailbox and live connections: the bus protocol and its
in-process implementation."""

from kluis.server.delivery.memory import InProcessBus
from kluis.server.delivery.protocol import DeliveryBus, Subscriber

__all__ = ["DeliveryBus", "InProcessBus", "Subscriber"]
