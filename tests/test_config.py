from __future__ import annotations

from pathlib import Path

import pytest

from joynode.config import (
    Config,
    ConfigError,
    SettingError,
    load_config,
    parse_config,
    render_default_config,
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "joynode.toml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    return str(info.value)


def test_empty_file_gives_embedded_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""))
    assert config.control.listen == "127.0.0.1:7760"
    assert config.http.enabled
    assert config.log.format == "text"


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "joynode.toml"
    path.write_text('[node]\ndata_dir = "d"\nkey_file = "/abs/node.key"\n')
    config = load_config(path)
    assert config.node.data_dir == (tmp_path / "sub" / "d").resolve()
    assert config.node.key_file == Path("/abs/node.key")
    assert config.control.token_file == (tmp_path / "sub" / "control.token").resolve()
    assert config.path == path.resolve()


def test_rendered_default_config_parses_to_the_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, render_default_config()))
    expected = parse_config({}, tmp_path.resolve())
    assert config.model_dump(exclude={"path"}) == expected.model_dump()
    # Sections without paths equal the schema defaults as they are.
    with_paths = {"node", "control", "chain"}
    assert Config().model_dump(exclude=with_paths) == config.model_dump(
        exclude=with_paths | {"path"}
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[control]\nlisten = "nope"', "control.listen: not host:port (got 'nope')"),
        ('[control]\nlisten = "example.com:80"', "control.listen: not an IP address"),
        ('[control]\nlisten = "127.0.0.1:99999"', "control.listen: not host:port"),
        ('[control]\nlisten = "0.0.0.0:7760"', "control.listen: 0.0.0.0 is not a loopback"),
        ("[control]\nmax_frame_bytes = 10", "control.max_frame_bytes: Input should be greater"),
        ('[control]\nmax_frame_bytes = "1024"', "control.max_frame_bytes: Input should be a valid"),
        ("[http]\nenabled = 1", "http.enabled: Input should be a valid boolean"),
        ("[http]\nlisen = 1", "http.lisen: unknown key"),
        ("[nodes]\nx = 1", "nodes: unknown key"),
        ('[log]\nlevel = "loud"', "log.level: Input should be 'debug', 'info'"),
        ("[node]\ndata_dir = 3", "node.data_dir: Input is not a valid path"),
        ("[control]\nlisten = [1, 2]", "control.listen: Input should be a valid string"),
        (
            '[[inference.models]]\nname = "m"\ncid = "nope"',
            "inference.models[0].cid: 'nope' is not a CID",
        ),
        ('[[inference.models]]\nname = "m"', "inference.models[0]: give either path or cid"),
        (
            '[[inference.models]]\nname = "m"\npath = "x"\n'
            'cid = "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH"',
            "inference.models[0]: give either path or cid",
        ),
        ("[storage]\nquota_gib = 0", "storage.quota_gib: Input should be greater than 0"),
        ("[storage]\ncid_version = 2", "storage.cid_version: Input should be 0 or 1"),
    ],
)
def test_invalid_config_names_the_key_path(tmp_path: Path, text: str, message: str) -> None:
    error = error_of(tmp_path, text)
    assert error.startswith(f"invalid config {tmp_path / 'joynode.toml'}:")
    assert message in error


def test_every_bad_key_is_reported_at_once(tmp_path: Path) -> None:
    error = error_of(tmp_path, '[control]\nlisten = "x"\n[http]\nfoo = 1\n')
    assert "control.listen:" in error
    assert "http.foo: unknown key" in error


def test_remote_control_needs_explicit_opt_in(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[control]\nlisten = "0.0.0.0:1"\nallow_remote = true\n'))
    assert config.control.listen == "0.0.0.0:1"


def test_toml_syntax_error_is_a_config_error(tmp_path: Path) -> None:
    assert "TOML syntax error" in error_of(tmp_path, "[control\nlisten=")


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.toml")


def test_section_of_the_wrong_type_is_named() -> None:
    with pytest.raises(ConfigError, match=r"control: Input should be a valid dictionary"):
        parse_config({"control": [1]}, Path("/"))


def test_a_setting_error_is_a_config_error_of_one_line_naming_its_key() -> None:
    error = SettingError("inference.models[0]", "vLLM could not load /m:\n  bad\tconfig.json")
    assert isinstance(error, ConfigError)
    assert error.key == "inference.models[0]"
    assert str(error) == "inference.models[0]: vLLM could not load /m: bad config.json"
    denied = PermissionError(13, "Denied")
    refused = SettingError.cannot_listen("http.listen", "127.0.0.1:1", denied)
    assert str(refused) == "http.listen: cannot listen on 127.0.0.1:1: Denied"
