"""Shared fixtures, and the rule that the dev extras are required under CI.

The oracles (transformers, datasets, ...) come with `pip install -e .[dev]`; a test reaches them through
`pytest.importorskip`. Locally a missing extra skips (and `-rs` lists the skip with its reason); under CI (`CI`
set to 1/true/yes, as GitHub Actions and most runners do) a missing extra fails the test instead, so a broken dev
install can never silently drop the Hugging Face parity tests.
"""

import os

import pytest


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def import_or_fail(modname: str, minversion: str | None = None, reason: str | None = None, **kwargs):
    """pytest.importorskip under CI: the import must work, else the test fails naming the pip line."""
    try:
        return _importorskip(modname, minversion, reason, **kwargs)
    except pytest.skip.Exception as e:
        pytest.fail(f"CI: {modname} is a dev extra and must be installed ({e}); run pip install -e '.[dev]'.",
                    pytrace=False)


_importorskip = pytest.importorskip


def pytest_configure(config):
    if under_ci():
        pytest.importorskip = import_or_fail


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory):
    """The tiny hybrid after 100 steps on the built-in corpus (~15 s): its MTP head drafts well enough to be
    accepted and it has learned the chat format's <think>...</think> answer shape (windows of 128 bytes hold a whole
    ~110-byte chat-form sum)."""
    from nemotron3.train.pretrain import TrainConfig, train
    out = tmp_path_factory.mktemp("trained")
    return train(TrainConfig(out=str(out), max_steps=100, save_every=100, eval_every=100, seq_len=128, batch_size=4,
                             train_tokens=80_000), log=lambda *_: None)


@pytest.fixture(scope="session")
def trained(trained_dir):
    from nemotron3 import NemotronForCausalLM
    return NemotronForCausalLM.from_pretrained(trained_dir).eval()
