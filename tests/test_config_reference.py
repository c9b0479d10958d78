"""docs/configuration.md is generated from the schemas and must match them (regenerate it with
`python -m tidal.config_reference --write`)."""

from tidal.config_reference import PAGE, render


def test_the_configuration_reference_is_up_to_date():
    assert PAGE.read_text() == render(), "docs/configuration.md is stale: run python -m tidal.config_reference --write"


def test_it_documents_every_command_and_required_key():
    text = render()
    for command in ("tidal run", "tidal engine", "tidal trainer", "tidal serve"):
        assert f"## `{command}`" in text
    assert "# required:" in text  # the trainer's model path has no default
    assert text.count("```toml") == 4
