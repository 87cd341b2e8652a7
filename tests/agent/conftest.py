"""The agent tests run real MiniWoB++ pages in headless Chromium. `make test` installs Chromium and
its driver (as root, as in CI): there a missing browser is a failure, elsewhere a skip that says
what to install."""
import os

import pytest
import torch

pytest.importorskip("miniwob")


@pytest.fixture(scope="session", autouse=True)
def chromium():
    from hybrid_lm.agent.env import find_chromium

    try:
        find_chromium()
    except RuntimeError as e:
        if os.geteuid() == 0:
            raise
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory):
    """(folder, tokenizer): a random tiny SambaY saved with a 512-token BPE trained for it."""
    import hybrid_lm
    from hybrid_lm.train import data

    folder = tmp_path_factory.mktemp("tiny-policy")
    tokenizer = data.train_tokenizer(data.load_documents(None, "train")[:200], 512)
    eos = tokenizer.eos_token_id
    torch.manual_seed(0)
    model = hybrid_lm.build(hybrid_lm.config("sambay", "tiny", vocab_size=len(tokenizer), eos_token_id=eos,
                                             bos_token_id=eos, pad_token_id=eos))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, tokenizer
