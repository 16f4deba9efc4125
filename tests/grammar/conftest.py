from __future__ import annotations

import pytest
from tdbql.query.context import ModelInfo

from tests.grammar.lang_helpers import fake_tokenize, tiny_model_info


@pytest.fixture
def tiny_info() -> ModelInfo:
    return tiny_model_info()


@pytest.fixture
def tokenize():
    return fake_tokenize
