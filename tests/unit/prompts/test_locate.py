"""Tokenizer files are found offline: a path, or the Hugging Face cache layout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.prompts.locate import TokenizerNotFound, hub_cache_dir, locate_tokenizer
from tests.unit.prompts.build import write_model


def cached(hub: Path, repo: str, revision: str) -> Path:
    """A snapshot in the hub cache layout: models--org--name/snapshots/<revision>/."""
    return write_model(hub / f"models--{repo.replace('/', '--')}" / "snapshots" / revision)


def test_a_file_or_a_directory(tmp_path: Path) -> None:
    directory = write_model(tmp_path / "m")
    by_dir = locate_tokenizer(str(directory), environ={})
    assert by_dir.tokenizer_json == directory / "tokenizer.json"
    assert by_dir.config_json == directory / "tokenizer_config.json"
    by_file = locate_tokenizer(str(directory / "tokenizer.json"), environ={})
    assert by_file == by_dir


def test_a_hub_id_resolves_to_the_snapshot_refs_main_names(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    old = cached(hub, "org/model", "aaa")
    main = cached(hub, "org/model", "bbb")
    os.utime(old, (4e9, 4e9))  # the newest, but refs/main decides
    (hub / "models--org--model" / "refs").mkdir()
    (hub / "models--org--model" / "refs" / "main").write_text("bbb\n", encoding="utf-8")
    files = locate_tokenizer("org/model", environ={"HF_HUB_CACHE": str(hub)})
    assert files.directory == main


def test_without_refs_the_newest_snapshot_with_a_tokenizer_wins(tmp_path: Path) -> None:
    hub = tmp_path / "home" / "hub"
    first = cached(hub, "org/model", "aaa")
    second = cached(hub, "org/model", "bbb")
    os.utime(first, (1, 1))
    os.utime(second, (2, 2))
    (hub / "models--org--model" / "snapshots" / "ccc").mkdir()  # no tokenizer: ignored
    files = locate_tokenizer("org/model", environ={"HF_HOME": str(tmp_path / "home")})
    assert files.directory == second


def test_not_found_lists_every_place_tried(tmp_path: Path) -> None:
    environ = {"HF_HUB_CACHE": str(tmp_path / "hub")}
    with pytest.raises(TokenizerNotFound) as caught:
        locate_tokenizer("org/missing", environ=environ)
    assert caught.value.tried == [
        "org/missing",
        str(tmp_path / "hub" / "models--org--missing" / "snapshots" / "*" / "tokenizer.json"),
    ]
    assert "org/missing" in str(caught.value)


def test_names_from_requests_are_never_read_as_paths(tmp_path: Path) -> None:
    directory = write_model(tmp_path / "m")
    with pytest.raises(TokenizerNotFound) as caught:
        locate_tokenizer(str(directory), local=False, environ={"HF_HUB_CACHE": str(tmp_path)})
    assert caught.value.tried == []  # an absolute path is no hub id either
    with pytest.raises(TokenizerNotFound):
        locate_tokenizer("../m", local=False, environ={"HF_HUB_CACHE": str(tmp_path / "hub")})


def test_the_hub_cache_follows_the_environment() -> None:
    assert hub_cache_dir({"HF_HUB_CACHE": "/c"}) == Path("/c")
    assert hub_cache_dir({"HUGGINGFACE_HUB_CACHE": "/d"}) == Path("/d")
    assert hub_cache_dir({"HF_HOME": "/h"}) == Path("/h/hub")
    assert hub_cache_dir({"XDG_CACHE_HOME": "/x"}) == Path("/x/huggingface/hub")
    assert hub_cache_dir({"HOME": "/home/u"}) == Path("/home/u/.cache/huggingface/hub")
