"""The guest agent client the tests use is the product's own (adapters/qemu/agent.py)."""

from adapters.qemu.agent import AgentError, AgentTimeout, GuestAgent

__all__ = ["AgentError", "AgentTimeout", "GuestAgent"]
