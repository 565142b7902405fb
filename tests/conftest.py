import os
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

from tiny import TINY_FAMILIES, tiny_model

FAMILIES = list(TINY_FAMILIES)


def families_by_default(*default: str) -> list:
    """Every family as a test parameter: the ``default`` ones run in the default suite, the
    others only under ``-m slow``."""
    return [f if f in default else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES]


def pytest_configure(config):
    """Latency and acceptance records of tiny test models go to a throw-away cache; the
    fetched models stay where they are (linked), so slow tests do not download again."""
    from msn.paths import cache_root

    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Parallel workers (scripts/test.sh): one thread each, and for the processes they start,
        # so that two workers on two cores do not contend for them.
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"
    models = cache_root() / "models"
    tmp = Path(tempfile.mkdtemp(prefix="msn-test-cache-"))
    models.mkdir(parents=True, exist_ok=True)
    (tmp / "models").symlink_to(models, target_is_directory=True)
    os.environ["MSN_CACHE_DIR"] = str(tmp)


@pytest.fixture(scope="session")
def models():
    cache = {}

    def get(family):
        if family not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cache[family] = tiny_model(family)
        return cache[family]

    return get


def hf_greedy(model, ids, max_new_tokens, eos, use_cache=True):
    """transformers' own greedy decoding: the ecosystem's reference (``use_cache=False``: each
    token from a forward over the whole sequence, the definition that cached decoding follows)."""
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, use_cache=use_cache,
                         max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture
def eager_fixed(monkeypatch):
    """Every greedy generation runs its steps on fixed buffers (eager, small capacity)."""
    from msn.decoding import static_steps

    made = {}

    def steps_for(model, capture=False, compiled=False):
        if id(model) not in made:
            made[id(model)] = static_steps.StaticSteps(model, capture=False, min_capacity=64)
        return made[id(model)]

    monkeypatch.setattr(static_steps, "wanted", lambda graphs, device, sampling: graphs != "off" and not sampling)
    monkeypatch.setattr(static_steps, "steps_for", steps_for)
    return made
