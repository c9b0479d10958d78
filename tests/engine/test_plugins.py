"""Agents are chosen by name like backends: unknown or broken names fail at load with what is available."""

import pytest
from tidal.engine.agent import ChatAgent, create_agent
from tidal.engine.config import ChatAgentConfig, PluginAgentConfig
from tidal.protocol.errors import ConfigError


def test_the_chat_agent_is_the_default_and_an_unknown_plugin_names_the_available_ones():
    assert isinstance(create_agent(ChatAgentConfig()), ChatAgent)
    with pytest.raises(ConfigError, match=r"agent 'nope' is not registered \(group tidal.agents\); available: \[.*'chat'"):
        create_agent(PluginAgentConfig(name="nope"))


def test_a_plugin_agent_options_are_validated_against_its_config(monkeypatch):
    from tidal.engine import agent

    monkeypatch.setitem(agent.BUILTIN, "chat2", "tidal.engine.agent:ChatAgent")
    made = create_agent(PluginAgentConfig(name="chat2", options={"max_turns": 3}))
    assert isinstance(made, ChatAgent) and made.cfg.max_turns == 3
    with pytest.raises(ConfigError, match="agent 'chat2' options"):
        create_agent(PluginAgentConfig(name="chat2", options={"max_turns": "many"}))
    monkeypatch.setitem(agent.BUILTIN, "json", "json:dumps")
    with pytest.raises(ConfigError, match="not a subclass of tidal.engine.agent.Agent"):
        create_agent(PluginAgentConfig(name="json"))
