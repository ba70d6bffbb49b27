"""Fine-tuning a local Hugging Face model folder: `train --from-checkpoint HF_DIR` (full, LoRA,
BitFit), resume, and the export of the fine-tuned checkpoint (it keeps what the import read:
eos ids, chat template, source).

The folders are tiny random models built with `transformers` from a config (tests/hf_support.py);
the references are transformers itself: its loss on the same texts, its greedy generate with the
fine-tuned weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hf_support import TEXTS, hf_tokenizer, save_hf, token_ids

transformers = pytest.importorskip("transformers", reason="the Hugging Face fine-tuning tests need transformers")
torch = pytest.importorskip("torch", reason="training tests need the [train] extra (torch)")
from safetensors.torch import load_file  # noqa: E402

from onnxformer.modeling import checkpoint as ckpt  # noqa: E402
from onnxformer.modeling.data import load_task_data  # noqa: E402
from onnxformer.modeling.hf_import import FAMILIES, _load_families, load_hf, read_hf_config  # noqa: E402
from onnxformer.modeling.train import TrainConfig, train  # noqa: E402
from onnxformer.runtime.errors import CheckpointError, ConfigError  # noqa: E402

CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
SECOND_EOS = 5  # generation_config.json lists two eos ids; the package must keep both


# --- folders and data ---------------------------------------------------------------------------


def _decoder_dir(directory: Path, config_class, **fields) -> Path:
    tokenizer = hf_tokenizer(300, pad=None, chat_template=CHAT_TEMPLATE)  # a decoder without a pad token
    config = config_class(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **fields)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, SECOND_EOS]
    return save_hf(model, tokenizer, directory)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    # untied embeddings with spare rows (vocab 320, tokenizer < 300), head size 16 (the built graph)
    return _decoder_dir(tmp_path_factory.mktemp("hf") / "llama", transformers.LlamaConfig, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory) -> Path:
    return _decoder_dir(tmp_path_factory.mktemp("hf") / "qwen2", transformers.Qwen2Config, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("data")
    (root / "train.txt").write_text("\n\n".join(TEXTS[:96]) + "\n", encoding="utf-8")
    (root / "valid.txt").write_text("\n\n".join(TEXTS[96:104]) + "\n", encoding="utf-8")
    pairs = [{"source": t.rsplit(" ", 1)[0], "target": t.rsplit(" ", 1)[1]} for t in TEXTS]
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs[:96]), encoding="utf-8")
    (root / "pairs_valid.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs[96:104]), encoding="utf-8")
    return {"text": str(root / "train.txt"), "text_valid": str(root / "valid.txt"),
            "pairs": str(root / "pairs.jsonl"), "pairs_valid": str(root / "pairs_valid.jsonl")}


def config(data, out: Path, source: Path, task: str = "causal-lm", **overrides) -> TrainConfig:
    kind = "text" if task == "causal-lm" else "pairs"
    kwargs = dict(arch="decoder", task=task, data=data[kind], valid_data=data[kind + "_valid"], out_dir=str(out),
                  from_checkpoint=str(source), steps=8, batch_size=8, lr=1e-2, eval_examples=8, max_len=32,
                  progress=False, threads=1)
    return TrainConfig(**{**kwargs, **overrides})


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _imported_weights(directory: Path) -> dict[str, torch.Tensor]:
    return ckpt.plain_state_dict(load_hf(directory).model)


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    assert set(before) == set(after)
    return {name for name in before if not torch.equal(before[name], after[name])}


def _as_transformers(checkpoint: Path, directory: Path):
    """The fine-tuned weights in transformers' own model class: the import's plan (our name ->
    the Hugging Face tensor it came from) run backwards."""
    family, hf, our_config = read_hf_config(directory)
    reference = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    ours = load_file(str(checkpoint / ckpt.MODEL_FILE))
    plan = family.tensors(our_config, hf, set(reference.state_dict()))
    state = {}
    for name, source in plan.items():
        assert source.convert is None and len(source.names) == 1, name  # Llama: every tensor taken as it is
        state[source.names[0]] = ours[name]
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected and all(n == "lm_head.weight" for n in missing), (missing, unexpected)  # tied: shared
    return reference


# --- full fine-tune, export --------------------------------------------------------------------


@pytest.mark.slow  # trains 8 steps, exports, runs transformers' generate: 5-15 s
def test_full_fine_tune_of_a_llama_folder_learns_and_exports(data, llama_dir, tmp_path):
    from onnxformer.export.exporter import export_checkpoint
    from onnxformer.runtime import GenerationConfig, load

    result = train(config(data, tmp_path / "run", llama_dir))
    lines = _metrics(tmp_path / "run")
    start = next(x["loss"] for x in lines if x["split"] == "valid" and x["step"] == 0)
    assert result.metrics["valid/loss"] < start - 1.0, (start, result.metrics)  # it learned

    # The step-0 validation loss is transformers' loss of the untouched model on the same texts
    # (HF tokenizer with its BOS, the eos id appended): the batches used the import's special ids.
    reference = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(llama_dir)
    total = count = 0.0
    for example in load_task_data(data["text"], valid=data["text_valid"]).valid[:8]:
        ids = torch.tensor([(token_ids(tokenizer, example.text) + [tokenizer.eos_token_id])[:32]])
        with torch.no_grad():
            total += float(reference(ids, labels=ids).loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    assert abs(start - total / count) < 1e-4, (start, total / count)

    # The checkpoint keeps what the package needs (covered by checksums.json).
    folder = result.checkpoint
    imported = load_hf(llama_dir)
    assert ckpt.read_package(folder) == imported.package
    assert ckpt.PACKAGE_FILE in json.loads((folder / ckpt.CHECKSUMS_FILE).read_text())["sha256"]

    report = export_checkpoint(folder, tmp_path / "pkg")
    manifest = report.manifest
    assert manifest.kv_cache == "shared"  # the fast built decoder graph, as for the folder itself
    assert manifest.generation["eos_token_ids"] == [tokenizer.eos_token_id, SECOND_EOS]
    assert manifest.special_tokens["pad"] == -1 and manifest.special_tokens["bos"] == tokenizer.bos_token_id
    assert manifest.chat_template == CHAT_TEMPLATE
    assert manifest.source["model_type"] == "llama"

    # The package's greedy tokens equal transformers' generate with the fine-tuned weights.
    tuned = _as_transformers(folder, llama_dir)
    package = load(tmp_path / "pkg")
    for text, eos in (("two green", None), ("seven", None), ("one red cat. five", None), ("seven", [319])):
        # eos None: the manifest's (both ids); [319], a spare row never produced: 16 tokens compared
        prompt = token_ids(tokenizer, text)
        ids = torch.tensor([prompt])  # the mask given: transformers would take the BOS (id 0) for padding
        with torch.no_grad():
            expected = tuned.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                                      eos_token_id=eos or [tokenizer.eos_token_id, SECOND_EOS],
                                      pad_token_id=0)[0, len(prompt):].tolist()
        options = {"eos_token_ids": tuple(eos)} if eos else {}
        got = package.generate_ids([prompt], GenerationConfig(strategy="greedy", max_new_tokens=16, **options))
        assert got[0].token_ids[0] == expected, text
        assert len(expected) == 16 or not eos
    assert _changed(_imported_weights(llama_dir), load_file(str(folder / ckpt.MODEL_FILE)))  # it was fine-tuned


# --- LoRA, BitFit, resume -----------------------------------------------------------------------


def test_lora_on_a_llama_folder_changes_only_the_adapted_projections(data, llama_dir, tmp_path, capsys):
    from onnxformer.runtime.cli import main

    run = tmp_path / "lora"
    rc = main(["train", "--arch", "decoder", "--task", "causal-lm", "--data", data["text"], "--valid", data["text_valid"],
               "--from-checkpoint", str(llama_dir), "--lora-rank", "4", "--lora-targets", "q_proj,v_proj",
               "--out", str(run), "--steps", "3", "--batch-size", "8", "--lr", "1e-2", "--max-len", "32",
               "--eval-examples", "8", "--no-progress"])
    assert rc == 0 and "trained 3 steps" in capsys.readouterr().out
    checkpoint = ckpt.latest_checkpoint(run)
    changed = _changed(_imported_weights(llama_dir), load_file(str(checkpoint / ckpt.MODEL_FILE)))
    assert changed and all(n.endswith(("attn.q_proj.weight", "attn.v_proj.weight")) for n in changed), changed
    state = json.loads((checkpoint / ckpt.TRAINER_STATE_FILE).read_text())
    # 2 layers x (q: 64->64, v: 64->32) with r=4: A (4, 64) + B (out, 4)
    assert state["parameters"]["trainable"] == 2 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4)


def test_bitfit_on_a_qwen2_folder_changes_only_biases(data, qwen2_dir, tmp_path):
    result = train(config(data, tmp_path / "bitfit", qwen2_dir, steps=3, bitfit=True))
    changed = _changed(_imported_weights(qwen2_dir), load_file(str(result.checkpoint / ckpt.MODEL_FILE)))
    assert changed and all(n.endswith(".bias") for n in changed), changed  # Qwen2's q/k/v biases


def test_resume_of_a_lora_sft_run_from_a_folder_reproduces_the_uninterrupted_run(data, llama_dir, tmp_path):
    kw = dict(task="sft", lora_rank=4, steps=4, save_every=2, keep_checkpoints=0, log_every=1)
    full = tmp_path / "full"
    train(config(data, full, llama_dir, **kw))
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full / "step-000002", part / "step-000002")
    (part / "latest").write_text("step-000002\n")
    shutil.copy(full / "metrics.jsonl", part / "metrics.jsonl")
    resumed = train(config(data, part, llama_dir, resume=True, **kw))
    assert resumed.step == 4
    for file in (ckpt.MODEL_FILE, ckpt.TRAINING_STATE_FILE):
        a, b = load_file(str(full / "step-000004" / file)), load_file(str(part / "step-000004" / file))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file
    assert ckpt.read_package(part / "step-000004") == load_hf(llama_dir).package
    assert [(x["step"], x["split"], x["loss"]) for x in _metrics(full)] == \
        [(x["step"], x["split"], x["loss"]) for x in _metrics(part)]


# --- what is refused -----------------------------------------------------------------------------


def test_a_folder_of_another_arch_or_bitfit_without_biases_is_refused_with_the_fix(data, llama_dir, tmp_path):
    with pytest.raises(ConfigError, match="holds a 'decoder' model but arch is 'encoder'; pass --arch decoder"):
        train(TrainConfig(arch="encoder", task="mlm", data=data["text"], out_dir=str(tmp_path / "a"),
                          from_checkpoint=str(llama_dir), steps=2, progress=False))
    with pytest.raises(ConfigError, match="has none; fine-tune it with LoRA"):
        train(config(data, tmp_path / "b", llama_dir, bitfit=True))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_fine_tune_of_the_fine_tune_keeps_the_package_and_a_lost_package_file_is_refused(data, llama_dir, tmp_path):
    first = train(config(data, tmp_path / "first", llama_dir, steps=2))
    second = train(config(data, tmp_path / "second", first.run_dir, task="sft", steps=2))  # our checkpoint now
    assert ckpt.read_package(second.checkpoint) == load_hf(llama_dir).package
    (first.checkpoint / ckpt.PACKAGE_FILE).unlink()  # export would silently lose the eos ids and the template
    with pytest.raises(CheckpointError, match="package.json is missing but checksums.json lists it"):
        ckpt.read_package(first.checkpoint)


# --- encoder-decoder: T5 and BART seq2seq ---------------------------------------------------------


def _seq2seq_dir(directory: Path, name: str) -> Path:
    """T5 with a tokenizer that does not append </s> (training appends it to targets), BART with
    its own template <s> $A </s>."""
    from tokenizers import processors

    if name == "t5":
        tokenizer = hf_tokenizer(300, bos=None)  # <pad> 0, </s> 1; no template
        config = transformers.T5Config(vocab_size=320, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                       pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        model = transformers.T5ForConditionalGeneration
    else:
        tokenizer = hf_tokenizer(300, add_bos=False)  # <pad> 0, <s> 1, </s> 2
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> $B </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
        config = transformers.BartConfig(vocab_size=320, d_model=32, encoder_layers=2, decoder_layers=2,
                                         encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                         decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=0,
                                         bos_token_id=1, eos_token_id=2, decoder_start_token_id=2,
                                         forced_eos_token_id=None)
        model = transformers.BartForConditionalGeneration
    torch.manual_seed(0)
    return save_hf(model(config), tokenizer, directory)


@pytest.mark.slow  # 6 steps with greedy exact match at evaluation, transformers' seq2seq modules: 2-3 s each
@pytest.mark.parametrize("name", ["t5", "bart"])
def test_seq2seq_fine_tune_of_an_encoder_decoder_folder(data, tmp_path, name):
    _load_families()
    if name not in FAMILIES:
        pytest.skip(f"the {name} import (modeling/hf_seq2seq.py) has not landed yet")
    folder = _seq2seq_dir(tmp_path / name, name)
    result = train(config(data, tmp_path / "run", folder, task="seq2seq", arch="encoder-decoder", steps=6))
    start = next(x["loss"] for x in _metrics(tmp_path / "run") if x["split"] == "valid" and x["step"] == 0)
    assert result.metrics["valid/loss"] < start - 1.0, (start, result.metrics)
    # step 0 is transformers' own loss with labels = the target ending with eos
    reference = transformers.AutoModelForSeq2SeqLM.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    eos, total, count = tokenizer.eos_token_id, 0.0, 0
    for row in map(json.loads, Path(data["pairs_valid"]).read_text().splitlines()):
        target = token_ids(tokenizer, row["target"])
        labels = torch.tensor([target if target[-1] == eos else target + [eos]])
        with torch.no_grad():
            loss = reference(torch.tensor([token_ids(tokenizer, row["source"])]), labels=labels).loss
        total, count = total + float(loss) * labels.shape[1], count + labels.shape[1]
    assert abs(start - total / count) < 1e-4, (start, total / count)
    assert ckpt.read_package(result.checkpoint) == load_hf(folder).package


# --- an encoder: BERT classification --------------------------------------------------------------


@pytest.mark.slow  # trains 30 steps and exports: about 3 s
def test_bert_folder_fine_tunes_a_classifier_and_the_package_scores_what_training_measured(tmp_path):
    _load_families()
    if "bert" not in FAMILIES:
        pytest.skip("the BERT import (modeling/hf_encoders.py) has not landed yet")
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    words = sorted({w.strip(".") for t in TEXTS for w in t.split()})
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, "."])}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                                     cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    bert = transformers.BertConfig(vocab_size=len(vocab) + 4, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=96, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    folder = save_hf(transformers.BertModel(bert), tokenizer, tmp_path / "bert")
    rows = [{"text": t, "label": "warm" if "red" in t or "sun" in t else "cold"} for t in TEXTS]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:160]), encoding="utf-8")
    (tmp_path / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[160:]), encoding="utf-8")
    result = train(TrainConfig(arch="encoder", task="classify", data=str(tmp_path / "train.jsonl"),
                               valid_data=str(tmp_path / "valid.jsonl"), out_dir=str(tmp_path / "run"),
                               from_checkpoint=str(folder), steps=30, batch_size=16, lr=3e-3, max_len=32,
                               progress=False, threads=1))
    start = next(x for x in _metrics(tmp_path / "run") if x["split"] == "valid" and x["step"] == 0)
    assert result.metrics["valid/loss"] < start["loss"], (start, result.metrics)
    saved = json.loads((result.checkpoint / ckpt.CONFIG_FILE).read_text())
    assert saved["num_labels"] == 2 and sorted(saved["label_names"]) == ["cold", "warm"]
    assert ckpt.read_package(result.checkpoint).special_tokens["cls"] == 2

    from onnxformer.export.exporter import export_checkpoint
    from onnxformer.runtime import load

    export_checkpoint(result.checkpoint, tmp_path / "pkg")
    package = load(tmp_path / "pkg")
    valid = rows[160:]
    answers = package.classify([r["text"] for r in valid])
    accuracy = sum(a.label == r["label"] for a, r in zip(answers, valid)) / len(valid)
    assert accuracy == result.metrics["valid/accuracy"] and accuracy > 0.9
    assert package.manifest.source["model_type"] == "bert"
