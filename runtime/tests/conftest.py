"""Shared fixtures: tiny LLaMA models built in-process, the real tokenizer and C-Eval data from ../shared.

The shared folder sits beside the repository (CI has it); a missing fixture is a failure, not a skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("CLA2_SHARED", REPO.parent / "shared"))
REAL_TOKENIZER = SHARED / "fixtures" / "chinese-llama-2-tokenizer"
CEVAL_DIR = SHARED / "data" / "ceval-exam"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"test fixture {path} is missing: the tests need ../shared beside the repository "
                    "(or CLA2_SHARED pointing at it)")
    return path


@pytest.fixture(scope="session")
def real_tokenizer_dir() -> Path:
    """The real 55296-piece Chinese-LLaMA-2 tokenizer folder."""
    return _need(REAL_TOKENIZER)


@pytest.fixture(scope="session")
def ceval_dir() -> Path:
    """The real C-Eval validation + dev splits."""
    return _need(CEVAL_DIR)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, real_tokenizer_dir) -> Path:
    """Tiny random LLaMA (2 layers, hidden 64) with the real 55296 tokenizer, in several shards."""
    from cla2 import tiny

    return tiny.main(tmp_path_factory.mktemp("models") / "tiny-real-tok", tokenizer=real_tokenizer_dir, shards=3)


@pytest.fixture(scope="session")
def tiny_model_small_tok(tmp_path_factory) -> Path:
    """Tiny random LLaMA with a 1000-piece tokenizer trained in the test (fast to train on)."""
    from cla2 import tiny

    return tiny.main(tmp_path_factory.mktemp("models") / "tiny-small-tok", shards=2)
