"""Shared fixtures: tiny transformers models built from configs, saved with ``save_pretrained`` and loaded
back with ``from_pretrained``, the same path a 13B checkpoint takes."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    from qvlm.tiny import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    from qvlm.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    from qvlm.tiny import build_tiny_clip_vision

    return build_tiny_clip_vision(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    from qvlm.tiny import build_tiny_bert

    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def load_llava(path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


@pytest.fixture()
def llava(tiny_llava_dir):
    """A fresh model per test (quantize() modifies the model in place)."""
    return load_llava(tiny_llava_dir)


@pytest.fixture(scope="session")
def llava_batches(tiny_llava_dir):
    from transformers import AutoProcessor

    from qvlm.calibration import load_records, make_batches

    records = load_records("builtin:shapes", 8, seed=0)
    return make_batches(records, AutoProcessor.from_pretrained(tiny_llava_dir), max_length=64, batch_size=4)


@pytest.fixture(scope="session")
def llama_batches(tiny_llama_dir):
    from transformers import AutoTokenizer

    from qvlm.calibration import load_records, make_batches

    records = load_records("builtin:shapes", 8, seed=1)
    return make_batches(records, AutoTokenizer.from_pretrained(tiny_llama_dir), max_length=32, batch_size=4)


@pytest.fixture(scope="session")
def local_ray():
    """One embedded Ray for the whole session (starting Ray per test costs seconds)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=200 * 2**20, runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}})
    yield ray
    ray.shutdown()


from tests.s3_server import s3_bucket, s3_server  # noqa: E402,F401  (S3 on loopback for every test module)
