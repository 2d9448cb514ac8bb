"""Shared fixtures."""

import pytest

from nemotron3 import NemotronForCausalLM
from nemotron3.train.pretrain import TrainConfig, train


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory):
    """The tiny hybrid after 100 steps on the built-in corpus (~15 s): its MTP head drafts well enough to be
    accepted and it has learned the chat format's <think>...</think> answer shape (windows of 128 bytes hold a whole
    ~110-byte chat-form sum)."""
    out = tmp_path_factory.mktemp("trained")
    return train(TrainConfig(out=str(out), max_steps=100, save_every=100, eval_every=100, seq_len=128, batch_size=4,
                             train_tokens=80_000), log=lambda *_: None)


@pytest.fixture(scope="session")
def trained(trained_dir):
    return NemotronForCausalLM.from_pretrained(trained_dir).eval()
