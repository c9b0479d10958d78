"""Adapters for environments no one here wrote: `gem:` (gem-llm envs), `agentgym:` (AgentGym servers).

Each adapter module registers an id prefix with `tidal.envs.registry.register_prefix` when imported.
"""
