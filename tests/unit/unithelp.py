"""Shared pieces of the unit tests (tests/unit)."""

from __future__ import annotations

from typing import Protocol

import pytest


class Creator(Protocol):
    """A scratch tree the test changes (test_updater's Recorder, test_resync's Env)."""

    def create(self, rel: bytes) -> int: ...

    def rename(self, old: bytes, new: bytes) -> object: ...

    def unlink(self, rel: bytes) -> object: ...


def create_reusing(tree: Creator, rel: bytes, ino: int, tries: int = 50) -> None:
    """Create ``rel`` so that it gets inode ``ino`` (freed just before); skip if the fs won't."""
    extra = []
    for i in range(tries):
        if tree.create(rel) == ino:
            break
        name = rel + b".%d" % i
        tree.rename(rel, name)
        extra.append(name)
    else:
        pytest.skip("the filesystem did not reuse the inode number")
    for name in extra:
        tree.unlink(name)
